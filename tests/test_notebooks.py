"""The notebooks in ``notebooks/``, run top to bottom in a Jupyter kernel, as a newcomer would.

Each notebook runs in a fresh ``python3`` kernel against chatchain's own OpenAI-compatible test
server on 127.0.0.1, given to the kernel the way a user gives it: ``OPENAI_BASE_URL`` in the
environment. Notebook 5 also gets the Redis and PostgreSQL servers the store tests start, so its
shared-memory cells really run. A failing cell fails the test (nbclient raises
`CellExecutionError`); executed notebooks are never written back into the repository.

The kernel runs in a copy of the repository's layout in a temporary directory (``config.py``
next to ``notebooks/``), so that ``sys.path.insert(0, "..")`` finds ``config.py`` as it does in
the repository, while a developer's own ``.env`` (which could hold a real key or another store)
is not read and nothing the notebooks write lands in the repository.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
import redis
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from traitlets.config import Config as TraitletsConfig

from chatchain.testing import OpenAITestServer

# The store tests' servers, registered here by name (as tests/stores/conftest.py does); only
# notebook 5 asks for them, through `request.getfixturevalue`.
from tests.stores.fixtures_postgres import postgres_url, wipe  # noqa: F401
from tests.stores.fixtures_redis import redis_url  # noqa: F401

pytestmark = pytest.mark.slow  # runs every notebook in a kernel

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SERIES = [
    "01_first_chain",
    "02_streaming_and_async",
    "03_tokens_and_costs",
    "04_long_conversations",
    "05_persistent_and_shared_memory",
    "06_tools_and_structured_output",
]

# The test server calls a tool only when told to: the rules each notebook's turns need.
TOOL_RULES: dict[str, list[tuple[str, dict[str, str]]]] = {
    "06_tools_and_structured_output": [("get_weather", {"city": "Oslo"})],
}

# Environment variables a notebook reads besides chatchain's settings, and the fixture of each.
SERVERS = {
    "05_persistent_and_shared_memory": {
        "CHATCHAIN_REDIS_URL": "redis_url",
        "CHATCHAIN_POSTGRES_URL": "postgres_url",
    },
}

# Seconds: a notebook should run in well under a minute against the local test server.
NOTEBOOK_SECONDS = 60

# What may appear on a cell's stderr; anything else (a Python warning, a traceback, a log line)
# fails the test, because users must not see messages they cannot act on.
ALLOWED_STDERR: dict[str, list[re.Pattern[str]]] = {
    # matplotlib's own notice when it builds its font cache on first use (fresh CI machines),
    # written through its logger; it is not chatchain's and cannot be avoided from a notebook.
    "*": [re.compile(r"Matplotlib is building the font cache; this may take a moment\.")],
}

# Outputs that show each notebook did what it says (the test server echoes the last message).
EXPECTED_OUTPUT = {
    "01_first_chain": [
        "bot> Echo: What's my name?",
        "alice:\n  human: What's my name?\n     ai: Echo: What's my name?\n",
        "Echo: ¿Cómo me llamo?",
        "dp123: 6 messages\nalice: 2 messages",
    ],
    "02_streaming_and_async": [
        "first text after",
        "stored: 'Echo: Count from', interrupted=True",
        "5 replies in",
        "user-eli: Echo: What's my name?",
        "human: My favourite colour is green.",
    ],
    "03_tokens_and_costs": [
        "Successful Requests: 2",
        "TOTAL",
        "'prompt_tokens':",
        "genai-prices",
        ": settings, $",
        "my-local-model               no price       cost unknown",
        "BudgetExceeded: Budget exceeded: the cap for session 'capped' is 400 tokens",
        "the refused question was stored: False",
        "same reply: True",
        "again: 0 prompt + 0 completion = 0 tokens, $0.00,",
        ", cached, saved $",
    ],
    "04_long_conversations": ["60 messages stored, 30 turns"],
    "06_tools_and_structured_output": [
        "called get_weather({'city': 'Oslo'}) -> 'sunny, 21 °C in Oslo' [success]",
        "bot> Echo: What's the weather in Oslo? [tool results: sunny, 21 °C in Oslo]",
        "stored: ['human', 'ai', 'tool', 'ai']",
        "[calling get_weather({'city': 'Oslo'})]",
        "[get_weather answered 'sunny, 21 °C in Oslo']",
        "Trip: Trip(city=",
        "stored as: {",
        "same reply: True",
        "again: 0 prompt + 0 completion = 0 tokens, $0.00,",
        ", cached, saved $",
    ],
    "05_persistent_and_shared_memory": [
        "sessions: ['dp123']",
        "Echo: ¿Cómo me llamo?\nnow 6 messages, 3 turns",
    ],
}


@pytest.fixture
def test_server() -> Iterator[OpenAITestServer]:
    """A fresh chatchain test server (it echoes the last user message)."""
    with OpenAITestServer() as server:
        yield server


@pytest.fixture
def endpoint(test_server: OpenAITestServer) -> str:
    """The base URL of `test_server`."""
    return test_server.base_url


def copy_layout(tmp_path: Path, notebook: Path) -> Path:
    """``config.py`` and ``notebooks/<notebook>`` under ``tmp_path``; returns the copy."""
    shutil.copy(ROOT / "config.py", tmp_path / "config.py")
    (tmp_path / "notebooks").mkdir()
    return Path(shutil.copy(notebook, tmp_path / "notebooks" / notebook.name))


def kernel_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """The kernel's environment: this one without chatchain's settings, plus ``variables``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OPENAI_", "CHATCHAIN_")) and name != "MPLBACKEND"
    }
    # A developer's IPython profile (startup scripts, config) must not change what runs.
    env["IPYTHONDIR"] = str(tmp_path / "ipython")
    env.update(variables)
    return env


def execute(notebook: nbformat.NotebookNode, cwd: Path, env: dict[str, str]) -> None:
    """Run every cell in a new ``python3`` kernel started in ``cwd`` with ``env``."""
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=NOTEBOOK_SECONDS,
        startup_timeout=60,
        resources={"metadata": {"path": str(cwd)}},
        # IPC rather than TCP, for which ipykernel warns (on its own stderr) that it is not
        # encrypted. The sockets need an absolute path: kernel and client differ in cwd.
        config=TraitletsConfig(
            {"KernelManager": {"transport": "ipc", "ip": str(cwd.parent / "kernel")}}
        ),
    )
    client.execute(env=env)


def text_of(notebook: nbformat.NotebookNode, stream: str = "stdout") -> str:
    """What the cells printed on ``stream``, plus (for stdout) the text of their results."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream" and output.name == stream:
                parts.append(output.text)
            elif stream == "stdout" and output.output_type in ("execute_result", "display_data"):
                parts.append(output.data.get("text/plain", ""))
    return "".join(parts)


def _clean_servers(servers: dict[str, str], variables: dict[str, str]) -> None:
    # Leave the shared servers as the store tests expect them: empty.
    for variable, fixture in servers.items():
        if fixture == "redis_url":
            with redis.Redis.from_url(variables[variable]) as client:
                client.flushdb()
        elif fixture == "postgres_url":
            wipe(variables[variable])


def _assert_clean_stderr(stem: str, notebook: nbformat.NotebookNode) -> None:
    allowed = ALLOWED_STDERR["*"] + ALLOWED_STDERR.get(stem, [])
    unexpected = [
        line
        for line in text_of(notebook, "stderr").splitlines()
        if line.strip() and not any(pattern.fullmatch(line) for pattern in allowed)
    ]
    assert unexpected == []
    everything = text_of(notebook) + text_of(notebook, "stderr")
    assert "Traceback" not in everything
    assert not re.search(r"\b\w*Warning: ", everything)


def _check_long_conversations(notebook: nbformat.NotebookNode) -> None:
    images = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == 1  # the plot
    found = re.findall(
        r"^ *(whole history|window \+ summary): ([\d,]+) prompt tokens", text_of(notebook), re.M
    )
    totals = {name: int(count.replace(",", "")) for name, count in found}
    assert totals["window + summary"] < 0.7 * totals["whole history"]
    summaries = re.search(r"(\d+) summary calls", text_of(notebook))
    assert summaries is not None
    assert int(summaries.group(1)) > 0
    # The summary reads as one: no nested echoes of the summary requests.
    summary = text_of(notebook).split("as the next turn's prompt carries it:\n", 1)[1]
    assert summary.startswith("  The user said: Note 1: my lucky number today is 7."), summary
    assert "[chatchain summary request]" not in summary and "Echo:" not in summary


def _check_shared_memory(notebook: nbformat.NotebookNode) -> None:
    out = text_of(notebook)
    assert "Skipped" not in out
    assert out.count("worker B: Echo: What's my name?") == 2  # Redis, then PostgreSQL
    assert out.count("after delete: 0 messages, 2 turns in the ledger") == 2


MORE_CHECKS = {
    "04_long_conversations": _check_long_conversations,
    "05_persistent_and_shared_memory": _check_shared_memory,
}


def test_the_series_is_complete() -> None:
    assert [path.stem for path in NOTEBOOKS] == SERIES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_top_to_bottom(
    path: Path,
    test_server: OpenAITestServer,
    endpoint: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    for name, args in TOOL_RULES.get(path.stem, []):
        test_server.add_tool_rule(name, args)
    variables = {"OPENAI_BASE_URL": endpoint, "OPENAI_MODEL": "gpt-4o-mini"}
    servers = SERVERS.get(path.stem, {})
    for variable, fixture in servers.items():
        variables[variable] = request.getfixturevalue(fixture)
    copy = copy_layout(tmp_path, path)
    notebook = nbformat.read(copy, as_version=4)

    started = time.perf_counter()
    try:
        execute(notebook, copy.parent, kernel_env(tmp_path, **variables))
    finally:
        _clean_servers(servers, variables)
    seconds = time.perf_counter() - started

    assert seconds < NOTEBOOK_SECONDS, f"{path.name} took {seconds:.0f} s"
    out = text_of(notebook)
    assert f"Talking to gpt-4o-mini at {endpoint}." in out  # the first cell says where
    for expected in EXPECTED_OUTPUT.get(path.stem, []):
        assert expected in out
    _assert_clean_stderr(path.stem, notebook)
    if path.stem in MORE_CHECKS:
        MORE_CHECKS[path.stem](notebook)


def test_shared_memory_cells_skip_with_a_note_without_servers(
    endpoint: str, tmp_path: Path
) -> None:
    copy = copy_layout(tmp_path, ROOT / "notebooks" / "05_persistent_and_shared_memory.ipynb")
    notebook = nbformat.read(copy, as_version=4)
    execute(notebook, copy.parent, kernel_env(tmp_path, OPENAI_BASE_URL=endpoint))

    out = text_of(notebook)
    assert "Skipped: set CHATCHAIN_REDIS_URL" in out
    assert "Skipped: set CHATCHAIN_POSTGRES_URL" in out
    assert "worker B:" not in out


def setup_cell(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook's first code cell: it says what the notebook talks to."""
    return next(cell for cell in notebook.cells if cell.cell_type == "code")


def test_every_notebook_starts_with_the_same_setup_cell() -> None:
    sources = {
        path.stem: setup_cell(nbformat.read(path, as_version=4)).source for path in NOTEBOOKS
    }
    assert len(set(sources.values())) == 1, sources


def test_without_an_endpoint_the_setup_cell_says_how_to_run_offline_and_stops(
    tmp_path: Path,
) -> None:
    copy = copy_layout(tmp_path, NOTEBOOKS[0])
    notebook = nbformat.read(copy, as_version=4)
    notebook.cells = [setup_cell(notebook)]

    with pytest.raises(CellExecutionError) as raised:
        execute(notebook, copy.parent, kernel_env(tmp_path))  # no OPENAI_* at all

    assert raised.value.ename == "MissingAPIKeyError"
    out = text_of(notebook)
    assert out.startswith("No OPENAI_API_KEY and no OPENAI_BASE_URL")
    assert "python -m chatchain.testing --port 8000" in out
    assert "OPENAI_BASE_URL=http://127.0.0.1:8000/v1" in out


def repository_notebooks() -> list[Path]:
    """Every notebook in the repository, outside hidden folders (.venv, .git) and builds."""
    found = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [
            name
            for name in subfolders
            if not name.startswith((".", "_"))
            and not name.endswith(".egg-info")
            and name not in ("build", "dist", "node_modules")
        ]
        found += [Path(folder, name) for name in files if name.endswith(".ipynb")]
    return sorted(found)


@pytest.mark.parametrize(
    "path", repository_notebooks(), ids=lambda path: str(path.relative_to(ROOT))
)
def test_notebook_is_stored_clean(path: Path) -> None:
    notebook = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(notebook)
    assert notebook.nbformat == 4
    assert notebook.metadata.kernelspec.name == "python3"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == []
            assert cell.execution_count is None
        assert "execution" not in cell.metadata  # timings that nbclient records
    assert notebook.cells[0].cell_type == "markdown"
