"""Third-party stores named by URL, through entry points of the ``chatchain.stores`` group.

Each test installs real distributions: folders on ``sys.path`` (and on ``PYTHONPATH`` for
the CLI and ``chatchain serve`` in processes of their own) holding a package and its
``.dist-info`` with ``entry_points.txt``, read by `importlib.metadata` as any installed
package is. The package ``tiny_store`` is the example store of docs/writing-a-store.md with
the entry point that page shows, word for word, and a few more for what can go wrong.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner
from langchain_core.messages import AIMessage, HumanMessage

from chatchain import Chatbot, Settings
from chatchain.cli._commands import cli
from chatchain.errors import ConfigurationError, SessionBusyError, StoreError
from chatchain.stores import SQLiteStore, _schemes, open_store
from chatchain.stores._composed import ComposedStore
from chatchain.testing import FakeChatModel
from tests.server.conftest import start_service
from tests.stores.example_store import TinyStore

ROOT = Path(__file__).resolve().parents[2]
PAGE = (ROOT / "docs" / "writing-a-store.md").read_text(encoding="utf-8")


def _docs_block(language: str, holding: str) -> str:
    """The code block of docs/writing-a-store.md in ``language`` that holds ``holding``."""
    blocks = re.findall(rf"```{language}\n(.*?)```", PAGE, flags=re.DOTALL)
    (block,) = [block for block in blocks if holding in block]
    return str(block)


# The docs' entry point, and more of the same package's for what can go wrong.
ENTRY_POINTS = {
    **tomllib.loads(_docs_block("toml", "chatchain.stores"))["project"]["entry-points"][
        "chatchain.stores"
    ],
    "mystore": "tiny_store:open_mystore",
    "notastore": "tiny_store:not_a_store",
    "unreachable": "tiny_store:unreachable",
    "uncallable": "tiny_store:NOT_CALLABLE",
    "missing": "tiny_store.nosuch:open_store",
}

PACKAGE = f'''"""A third party's stores, named by URL (written by {Path(__file__).name})."""

from __future__ import annotations

from chatchain.stores import SQLiteStore
from tests.stores.example_store import TinyStore


class MyStore(SQLiteStore):
    """A third party's store with users, as chatchain serve needs: SQLite underneath."""


def open_mystore(url: str, *, lock_timeout: float = 120.0, lease: float = 30.0) -> MyStore:
    return MyStore(url.removeprefix("mystore://"), lock_timeout=lock_timeout, lease=lease)


def not_a_store(url: str) -> dict[str, str]:
    return {{"url": url}}


def unreachable(url: str) -> TinyStore:
    raise OSError("the tiny cloud is unreachable")


NOT_CALLABLE = 42


{_docs_block("python", "def open_tiny_store")}'''


def install(
    site: Path, package: str, source: str, entry_points: Mapping[str, str], version: str = "0.1"
) -> None:
    """Install ``package`` (one module, ``source``) into the folder ``site``, as pip would:
    the distribution ``package`` (``_`` read as ``-``) with ``entry_points`` in our group."""
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text(source, encoding="utf-8")
    info = site / f"{package}-{version}.dist-info"
    info.mkdir()
    name = package.replace("_", "-")
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = [f"{scheme} = {value}" for scheme, value in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join([f"[{_schemes.GROUP}]", *lines, ""]))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder where ``tiny-store 0.1`` is installed (the module's tests put it on sys.path)."""
    folder = tmp_path_factory.mktemp("site")
    install(folder, "tiny_store", PACKAGE, ENTRY_POINTS)
    yield folder
    for name in [name for name in sys.modules if name.partition(".")[0] == "tiny_store"]:
        del sys.modules[name]


@pytest.fixture
def installed(site: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tiny-store`` installed in this process for the test."""
    monkeypatch.syspath_prepend(str(site))
    return site


def python_path(*folders: Path) -> str:
    """``PYTHONPATH`` for a child process: ``folders``, this checkout (for ``tests``), and
    what the parent had."""
    inherited = os.environ.get("PYTHONPATH")
    return os.pathsep.join([*map(str, folders), str(ROOT), *([inherited] if inherited else [])])


def test_the_docs_entry_point_opens_the_docs_store_by_url(installed: Path, tmp_path: Path) -> None:
    url = f"tiny://{tmp_path / 'chats.db'}"
    with closing(open_store(url, lock_timeout=1.0)) as store:
        assert isinstance(store, ComposedStore) and isinstance(store.backend, TinyStore)
        store.append("s", [HumanMessage("hi"), AIMessage("hello")])

    with closing(open_store(url)) as again:  # the file the URL names, not memory
        assert [m.content for m in again.load("s")] == ["hi", "hello"]


def test_an_installed_store_takes_its_options_like_a_built_in(
    installed: Path, tmp_path: Path
) -> None:
    with closing(open_store(f"mystore://{tmp_path / 'chat.db'}", lock_timeout=2.0, lease=7.0)) as s:
        assert (type(s).__name__, s.lease, isinstance(s, SQLiteStore)) == ("MyStore", 7.0, True)

    with pytest.raises(ConfigurationError, match=r"mystore:// store has no option prefix \(its op"):
        open_store(f"mystore://{tmp_path / 'chat.db'}", prefix="x")
    with pytest.raises(ConfigurationError, match=r"tiny:// store has no option lease .*: none\)"):
        open_store("tiny://", lease=1.0)


@pytest.mark.parametrize("scheme", ["mystore", "tiny"])
def test_the_lock_timeout_reaches_an_installed_store_whether_its_opener_takes_it_or_not(
    installed: Path, tmp_path: Path, scheme: str
) -> None:
    # mystore's opener takes lock_timeout; tiny's does not, and as_store's lock gets it.
    store = open_store(f"{scheme}://{tmp_path / 'chat.db'}", lock_timeout=0.2)
    release, inside = threading.Event(), threading.Event()

    def holder() -> None:
        with store.lock("s"):
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    inside.wait(2)
    try:
        with pytest.raises(SessionBusyError, match=r"for more than 0\.2 s"), store.lock("s"):
            pass
    finally:
        release.set()
        thread.join()
        store.close()


def test_chatchain_store_names_an_installed_store_for_the_library(
    installed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"mystore://{tmp_path / 'chat.db'}"
    monkeypatch.setenv("CHATCHAIN_STORE", url)
    bot = Chatbot(Settings.load(None), llm=FakeChatModel())
    try:
        assert type(bot.store).__name__ == "MyStore"
        assert bot.chat("hi", session_id="s").text == "Echo: hi"
    finally:
        bot.close()

    with closing(open_store(url)) as store:
        assert [m.content for m in store.load("s")] == ["hi", "Echo: hi"]


def test_an_unknown_scheme_lists_the_known_ones_and_how_to_add_one(installed: Path) -> None:
    with pytest.raises(ConfigurationError) as raised:
        open_store("nosuch://host/db")

    message = str(raised.value)
    assert message.startswith("Unknown store URL nosuch://... (CHATCHAIN_STORE or --store).")
    assert all(f"{scheme}://" in message for scheme in _schemes._BUILT_IN)
    assert "installed: tiny:// (tiny-store 0.1), mystore:// (tiny-store 0.1)" in message
    assert 'entry point in the "chatchain.stores" group' in message
    assert "docs/writing-a-store.md" in message


def test_a_store_installed_while_the_process_runs_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigurationError, match="Unknown store URL late://"):
        open_store("late://")

    source = (
        "from chatchain.stores import MemoryStore\n\ndef late(url):\n    return MemoryStore()\n"
    )
    install(tmp_path, "late_store", source, {"late": "late_store:late"})
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with closing(open_store("late://")) as store:
            assert type(store).__name__ == "MemoryStore"
    finally:
        sys.modules.pop("late_store", None)


@pytest.mark.parametrize(
    ("scheme", "error", "says"),
    [
        ("missing", ConfigurationError, "could not be loaded (entry point missing = "
         "tiny_store.nosuch:open_store of tiny-store 0.1): ModuleNotFoundError: "),
        ("uncallable", ConfigurationError, "names an int, not a callable (entry point uncallable = "
         "tiny_store:NOT_CALLABLE of tiny-store 0.1)"),
        ("notastore", ConfigurationError, "returned a dict, not a chatchain.stores.HistoryStore "
         "or HistoryBackend (entry point notastore = tiny_store:not_a_store of tiny-store 0.1)"),
        ("unreachable", StoreError, "could not be opened (entry point unreachable = "
         "tiny_store:unreachable of tiny-store 0.1): OSError: the tiny cloud is unreachable."),
    ],
)  # fmt: skip
def test_a_broken_entry_point_names_its_package_and_the_cause(
    installed: Path, scheme: str, error: type[Exception], says: str
) -> None:
    with pytest.raises(error) as raised:
        open_store(f"{scheme}://somewhere")

    assert str(raised.value).startswith(f"The {scheme}:// store")
    assert says in str(raised.value)
    assert type(raised.value) is error  # not a subclass that hides what went wrong


def test_a_built_in_scheme_stays_chatchains_and_the_claim_is_named(
    installed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hijack = tmp_path / "site"
    source = "def grab(url):\n    raise AssertionError('a built-in scheme was taken over')\n"
    install(hijack, "hijack", source, {"sqlite": "hijack:grab", "SQLite": "hijack:grab"})
    monkeypatch.syspath_prepend(str(hijack))

    with closing(open_store(f"sqlite:///{tmp_path / 'chat.db'}")) as store:
        assert type(store) is SQLiteStore  # resolved without reading the entry points
    with (
        pytest.warns(RuntimeWarning, match=r"point (sqlite|SQLite) = hijack:grab of hijack "
                     r"0.1 claims the built-in store scheme sqlite://, which stays chatchain's "
                     r"own: uninstall hijack 0.1"),
        closing(open_store(f"mystore://{tmp_path / 'other.db'}")) as mine,
    ):  # fmt: skip
        assert type(mine).__name__ == "MyStore"  # an installed scheme still opens


def test_two_packages_that_claim_one_scheme_are_both_named(
    installed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(tmp_path, "rival", "def tiny(url):\n    return None\n", {"tiny": "rival:tiny"})
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(ConfigurationError) as raised:
        open_store("tiny://")
    assert str(raised.value) == (
        "tiny:// is claimed by entry point tiny = rival:tiny of rival 0.1 and by entry point "
        "tiny = tiny_store:open_tiny_store of tiny-store 0.1: uninstall all but one of those "
        "packages."
    )


def test_the_cli_reports_a_broken_installed_store_in_one_line(installed: Path) -> None:
    result = CliRunner().invoke(cli, ["sessions", "list", "--store", "missing://x"])

    assert result.exit_code == 1
    assert result.output.startswith("error: The missing:// store could not be loaded ")
    assert "tiny-store 0.1" in result.output and "Traceback" not in result.output


@pytest.mark.slow  # runs the CLI in a process of its own
def test_the_cli_opens_an_installed_store_from_chatchain_store(
    site: Path, installed: Path, tmp_path: Path
) -> None:
    url = f"tiny://{tmp_path / 'chats.db'}"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CHATCHAIN_"))}
    env = {**clean, "PYTHONPATH": python_path(site), "CHATCHAIN_STORE": url}
    env["CHATCHAIN_DATA_DIR"] = str(tmp_path / "data")
    result = subprocess.run(
        [sys.executable, "-m", "chatchain", "ask", "--offline", "--session", "s1", "hello"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "hello" in result.stdout
    with closing(open_store(url)) as store:
        human, ai = store.load("s1")
    assert (human.content, ai.type) == ("hello", "ai")
    assert "hello" in str(ai.content)  # the offline echo


@pytest.mark.slow  # runs chatchain serve
def test_serve_opens_an_installed_store(site: Path, installed: Path, tmp_path: Path) -> None:
    url = f"mystore://{tmp_path / 'chat.db'}"
    service = start_service(url, None, tmp_path, env={"PYTHONPATH": python_path(site)})
    try:
        name, token = service.add_user()  # in this process, through the same entry point
        reply = service.client(token).post("/v1/sessions/s/messages", json={"text": "hi there"})
    finally:
        service.stop()

    assert reply.status_code == 200, reply.text
    assert "hi there" in reply.json()["text"]
    with closing(open_store(url)) as store:
        assert type(store).__name__ == "MyStore"
        assert store.count(f"{name}:s") == 2
