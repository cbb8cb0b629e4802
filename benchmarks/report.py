"""Run every benchmark and write the report: docs/benchmarks.md and its plots in docs/img/.

Usage::

    .venv/bin/python benchmarks/report.py            # the full run, `make bench`
    .venv/bin/python benchmarks/report.py --quick    # fewer samples, for development

Each benchmark runs as a child process (``bench_memory.py``, ``bench_concurrency.py``,
``bench_turn.py``, ``bench_ledger.py``, ``bench_stream.py``, in that order), prints its own
tables as it goes and writes its results as JSON; this script then draws the plots (matplotlib,
Agg backend) and writes the page. Every server a benchmark uses runs on 127.0.0.1 and is
started and stopped by that benchmark, even on errors. A benchmark that fails or passes its
time limit is stopped (SIGINT, so its clean-up runs; then SIGTERM, then SIGKILL), and the page
says it was not measured; the script then exits with status 1.

``--json-dir DIR`` keeps the JSON files (a temporary directory otherwise), and
``--render-only`` writes the page from the files already in that directory, without running
anything: handy when changing the page.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The targets, kept where their benchmarks define them.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import bench_instances  # noqa: E402
from bench_memory import HISTORY_TARGET, TOKENS_TARGET  # noqa: E402
from bench_server import BEGIN, END, TARGET_RELAY, insert_section, section_of  # noqa: E402
from bench_stream import CHUNK_TARGET, MEMORY_TARGET  # noqa: E402
from bench_turn import TARGET as TURN_TARGET  # noqa: E402
from bench_turn import machine  # noqa: E402

PACKAGES = (
    "chatchain",
    "langchain-core",
    "langchain-openai",
    "langchain-community",
    "openai",
    "genai-prices",
    "redis",
    "psycopg",
    "matplotlib",
)


LABELS = {"redis": "redis (Python client)", "psycopg": "psycopg (PostgreSQL driver)"}


@dataclass(frozen=True)
class Bench:
    key: str
    script: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    limit_s: float  # full run; a quarter of it with --quick (at least 5 minutes)


BENCHES = (
    Bench("memory", "bench_memory.py", (), ("--quick",), 1200),
    Bench("concurrency", "bench_concurrency.py", (), ("--quick",), 900),
    Bench("turn", "bench_turn.py", (), ("--turns", "60", "--warmup", "5"), 600),
    Bench("ledger", "bench_ledger.py", (), ("--quick",), 900),
    Bench(
        "stream",
        "bench_stream.py",
        ("--chunks", "2000", "--rounds", "5", "--memory-chunks", "20000"),
        ("--chunks", "1000", "--rounds", "2", "--memory-chunks", "5000"),
        600,
    ),
    # Server CPU per relayed chunk; against a LiteLLM proxy when BENCH_LITELLM names its
    # `litellm` command (not a dependency: see benchmarks/README.md).
    Bench(
        "relay",
        "bench_server.py",
        ("--parts", "4", "--no-docs", "--relay-rounds", "3"),
        ("--parts", "4", "--no-docs", "--relay-rounds", "1"),
        900,
    ),
)
# Issue 19: a non-streamed turn of the bot at most this many times the plain chain's (invoke).
INVOKE_TARGET = 1.0


# -- running ---------------------------------------------------------------------------------


class _Terminated(Exception):
    """SIGTERM, turned into an exception so that the clean-up below runs."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def _stop(process: subprocess.Popen[bytes], interrupted: bool) -> None:
    """Stop a benchmark so that its own clean-up (servers, files) runs.

    After Ctrl-C the child got the terminal's SIGINT too: give it time before sending another,
    which would interrupt its clean-up.
    """
    waits = ([(None, 10.0)] if interrupted else []) + [
        (signal.SIGINT, 90.0),
        (signal.SIGTERM, 10.0),
        (signal.SIGKILL, 10.0),
    ]
    for sig, wait in waits:
        if process.poll() is not None:
            return
        if sig is not None:
            process.send_signal(sig)  # our own child, by its handle
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def run_bench(bench: Bench, quick: bool, out: Path, number: int) -> None:
    """Run one benchmark script; its results, or ``{"error": ...}``, go to ``out``."""
    found = _run_bench(bench, quick, out, number)
    out.write_text(json.dumps(found, indent=2) + "\n")


def _run_bench(bench: Bench, quick: bool, out: Path, number: int) -> dict[str, Any]:
    args = bench.quick if quick else bench.full
    command = [sys.executable, str(HERE / bench.script), *args, "--json", str(out)]
    limit = max(300.0, bench.limit_s / 4) if quick else bench.limit_s
    shown = shlex.join([f"benchmarks/{bench.script}", *args])
    print(f"\n=== {number}/{len(BENCHES)}: {shown} (time limit {_minutes(limit)})\n", flush=True)
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT)
    interrupted = False
    try:
        code = process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        _stop(process, interrupted=False)
        return {"error": f"stopped at its time limit of {_minutes(limit)}"}
    except KeyboardInterrupt:  # Ctrl-C: the child got the terminal's SIGINT too
        interrupted = True
        raise
    finally:
        if process.poll() is None:
            _stop(process, interrupted)
    elapsed = time.perf_counter() - started
    if code != 0:
        return {"error": f"{bench.script} exited with status {code}"}
    try:
        found: dict[str, Any] = json.loads(out.read_text())
    except (OSError, ValueError) as exc:
        return {"error": f"{bench.script} wrote no results: {exc}"}
    found["wall_s"] = elapsed
    return found


@contextmanager
def json_dir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="chatchain-report-") as folder:
        yield Path(folder)


# -- the machine -------------------------------------------------------------------------------


def _os_name() -> str:
    release = Path("/etc/os-release")
    pretty = ""
    if release.exists():
        for line in release.read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                pretty = line.split("=", 1)[1].strip().strip('"')
    kernel = f"{platform.system()} {platform.release()} {platform.machine()}"
    return f"{pretty}, {kernel}" if pretty else kernel


def _ram() -> str:
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    return "unknown"


def environment(command: str, quick: bool) -> dict[str, Any]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "quick": quick,
        "machine": machine(),
        "ram": _ram(),
        "os": _os_name(),
        "packages": found,
    }


def _command(argv: Sequence[str]) -> str:
    """The command line that ran this script, with paths relative to the repository."""

    def relative(path: str) -> str:
        try:
            return str(Path(path).absolute().relative_to(ROOT))
        except ValueError:
            return path

    return shlex.join([relative(sys.executable), relative(sys.argv[0]), *argv])


# -- numbers -----------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def _ratio(cell: dict[str, float], digits: int = 2) -> str:
    return f"{cell['ratio']:.{digits}f} [{cell['ci95_low']:.2f}, {cell['ci95_high']:.2f}]"


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("**met**" if met else "**not met**")


def _size(size: int) -> str:
    return f"{size:,}"


def _error(section: dict[str, Any] | None) -> str | None:
    if section is None:
        return "not run"
    if "error" in section:
        return str(section["error"])
    return None


# -- plots -------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    fig.clear()
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot_history(table: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for store, row in table.items():
        if "stats" not in row:
            continue
        sizes = sorted(row["stats"], key=int)
        ax.plot(
            [int(s) for s in sizes],
            [row["stats"][s]["median_ms"] for s in sizes],
            marker="o",
            label=store,
        )
    ax.set_xscale("log")
    sizes = sorted({int(s) for row in table.values() for s in row.get("stats", {})})
    ax.set_xticks(sizes, [f"{s:,}" for s in sizes])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("messages stored in the session (log scale)")
    ax.set_ylabel("median time per turn (ms)")
    ax.set_title("Chatbot.chat per turn against stored history")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path)


def plot_tokens(series: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    turns = [t["turn"] for t in series]
    plain = [t["plain"] for t in series]
    chat = [t["chatchain"] + t["chatchain_summary"] for t in series]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(turns, plain, label="plain chain (whole history)")
    left.plot(turns, chat, label="chatchain (window + summary)")
    left.set_xlabel("turn")
    left.set_ylabel("prompt tokens in the turn")
    left.set_title("per turn")
    left.legend()
    cum_plain, cum_chat = [], []
    a = b = 0
    for p, c in zip(plain, chat, strict=True):
        a, b = a + p, b + c
        cum_plain.append(a / 1e6)
        cum_chat.append(b / 1e6)
    right.plot(turns, cum_plain, label="plain chain")
    right.plot(turns, cum_chat, label="chatchain")
    right.set_xlabel("turn")
    right.set_ylabel("prompt tokens so far (millions)")
    right.set_title("cumulative")
    right.legend()
    _save(fig, path)


def plot_concurrency(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    levels = [int(c) for c in data["config"]["concurrency"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, row in data["cells"].items():
        left.plot(levels, [row[str(c)]["turns_per_s"] for c in levels], marker="o", label=name)
    for label, by_level in data["ratios"].items():
        if not label.startswith("chatchain"):
            continue
        cells = [by_level[str(c)] for c in levels]
        mid = [cell["ratio"] for cell in cells]
        right.errorbar(
            levels,
            mid,
            yerr=[
                [m - cell["ci95_low"] for m, cell in zip(mid, cells, strict=True)],
                [cell["ci95_high"] - m for m, cell in zip(mid, cells, strict=True)],
            ],
            marker="o",
            capsize=3,
            label=label,
        )
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.axhline(1 / TURN_TARGET, color="grey", linewidth=0.8, linestyle="--")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent sessions (one process, asyncio)")
    left.set_ylim(bottom=0)
    left.set_ylabel("turns per second")
    left.set_title("throughput")
    left.legend()
    right.set_ylim(bottom=0)
    right.set_ylabel("turns/s ratio (95% interval)")
    right.set_title(f"chatchain relative (dashed: 1/{TURN_TARGET:.2f})")
    right.legend(loc="center right")
    _save(fig, path)


def plot_turn(summary: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    names = list(summary)
    modes = (("invoke", "invoke"), ("ttft", "time to first token"))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for index, (mode, label) in enumerate(modes):
        xs = [i + (index - 0.5) * width for i in range(len(names))]
        ax.bar(xs, [summary[n][mode]["median_ms"] for n in names], width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("median ms")
    ax.set_title("One turn against a loopback server")
    ax.legend()
    _save(fig, path)


# -- the page ------------------------------------------------------------------------------------


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], right: int = 1) -> list[str]:
    """A Markdown table; columns from ``right`` on are right-aligned."""
    align = ["---" if i < right else "---:" for i in range(len(head))]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _turn_target(turn: dict[str, Any]) -> tuple[bool | None, str]:
    if _error(turn):
        return None, "not measured"
    worst = {
        label: max(turn["ratios"][label]["invoke"]["ratio"], turn["ratios"][label]["ttft"]["ratio"])
        for label in ("chatchain bot / plain chain", "chatchain chain / plain chain")
    }
    return all(v <= TURN_TARGET for v in worst.values()), "; ".join(
        f"{label.split(' /')[0]} {value:.3f}x" for label, value in worst.items()
    )


def _history_target(memory: dict[str, Any]) -> tuple[bool | None, str]:
    table = {} if _error(memory) or "history" not in memory else memory["history"]["table"]
    ratios = {
        store: row["ratios"][max(row["ratios"], key=int)]["ratio"]
        for store, row in table.items()
        if "ratios" in row
    }
    if not ratios:
        return None, "not measured"
    missing = [store for store, row in table.items() if "ratios" not in row]
    worst = max(ratios, key=lambda s: ratios[s])
    met = all(r <= HISTORY_TARGET for r in ratios.values()) and not missing
    text = f"worst {ratios[worst]:.3f}x ({worst})"
    if missing:
        text += f"; not measured: {', '.join(missing)}"
    return met, text


def _tokens_target(memory: dict[str, Any]) -> tuple[bool | None, str]:
    if _error(memory) or "tokens" not in memory:
        return None, "not measured"
    tokens = memory["tokens"]
    ratio = tokens["chatchain_prompt_tokens"] / tokens["plain_prompt_tokens"]
    return ratio <= TOKENS_TARGET, f"{ratio:.1%} over {len(memory['tokens_series'])} turns"


def _invoke_target(turn: dict[str, Any]) -> tuple[bool | None, str]:
    if _error(turn):
        return None, "not measured"
    cell = turn["ratios"]["chatchain bot / plain chain"]["invoke"]
    raw = turn["ratios"].get("chatchain bot / raw client", {}).get("invoke")
    text = f"{_ratio(cell, 3)}" + (f"; {raw['ratio']:.2f}x the raw client" if raw else "")
    return cell["ratio"] <= INVOKE_TARGET, text


def _chunk_target(stream: dict[str, Any]) -> tuple[bool | None, str]:
    if _error(stream) or "time" not in stream:
        return None, "not measured"
    ratios = stream["time"]["ratios"]
    pair = ("chatchain bot / plain chain", "chatchain bot async / plain chain async")
    return all(ratios[p] <= CHUNK_TARGET for p in pair), (
        f"sync {ratios[pair[0]]:.2f}x; async {ratios[pair[1]]:.2f}x"
    )


def _memory_target(stream: dict[str, Any]) -> tuple[bool | None, str]:
    if _error(stream) or "memory" not in stream:
        return None, "not measured"
    memory = stream["memory"]
    ours = ("chatchain bot", "chatchain bot async")
    return all(memory[n] <= MEMORY_TARGET for n in ours), (
        f"sync {memory[ours[0]]:.1f}x; async {memory[ours[1]]:.1f}x "
        f"(plain chain {memory['plain chain']:.0f}x)"
    )


def render(env: dict[str, Any], results: dict[str, dict[str, Any]], img: Path) -> str:
    memory, conc, turn, ledger, stream, relay = (
        results.get(b.key) or {"error": "not run"} for b in BENCHES
    )
    m = env["machine"]
    servers = {**ledger.get("servers", {}), **memory.get("servers", {})}
    out: list[str] = ["# Benchmarks", ""]
    out += [
        f"Written by `{env['command']}` ({env['date']}, {env['elapsed_min']:.1f} min; "
        "`make bench` runs `.venv/bin/python benchmarks/report.py`). Do not edit: run it "
        "again. Every figure on this page was measured in that one run; the scripts "
        "are in [`benchmarks/`](../benchmarks/) and each prints the same tables on its own "
        "(see [its README](../benchmarks/README.md)).",
        "",
    ]
    if env["quick"]:
        out += [
            "> **Quick run** (`--quick`): few samples, for development only. The intervals are "
            "wide and the verdicts can flip; run `make bench` for the numbers to quote.",
            "",
        ]

    # -- targets
    checks = [
        (
            f"chatchain at most {TURN_TARGET:.2f}x the plain chain per turn "
            "(median invoke and TTFT; §4)",
            *_turn_target(turn),
        ),
        (
            f"100,000 stored messages: per-turn time within {HISTORY_TARGET:.2f}x of 10, "
            "on every store (§1)",
            *_history_target(memory),
        ),
        (
            f"chatchain's prompt tokens at most {TOKENS_TARGET:.0%} of the plain chain's "
            "over a 200-turn conversation (§2)",
            *_tokens_target(memory),
        ),
        (
            f"a non-streamed turn of the bot at most {INVOKE_TARGET:.2f}x the plain chain "
            "(median invoke; §4; issue 19)",
            *_invoke_target(turn),
        ),
        (
            f"a streamed chunk at most {CHUNK_TARGET:.2f}x the plain chain's, sync and async "
            "(2,000-chunk reply; §8; issue 19)",
            *_chunk_target(stream),
        ),
        (
            f"peak memory of a streamed turn at most {MEMORY_TARGET:.0f}x the reply's bytes "
            "(§8; issue 19)",
            *_memory_target(stream),
        ),
        (
            f"server CPU per relayed chunk at most {TARGET_RELAY:.1f}x a LiteLLM proxy's, "
            "native and OpenAI routes (§9; issue 19)",
            *_relay_target(relay),
        ),
    ]
    out += ["## Targets", ""]
    out += _table(
        ["target", "measured", "verdict"],
        [[name, text, _verdict(met)] for name, met, text in checks],
        right=3,
    )

    # -- machine
    p = env["packages"]
    rows = [
        ["CPU", f"{m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable)"],
        ["RAM", env["ram"]],
        ["OS", env["os"]],
        ["Python", m["python"]],
        *[[LABELS.get(name, name), p[name]] for name in PACKAGES],
        ["redis-server", servers.get("redis-server", "not measured")],
        ["PostgreSQL", servers.get("PostgreSQL", "not measured")],
        ["SQLite", servers.get("SQLite", "not measured")],
        ["date", env["date"]],
        ["command", f"`{env['command']}`"],
    ]
    out += ["## The machine and the software", ""]
    out += _table(["", ""], rows, right=2)
    out += [
        "Every server runs on 127.0.0.1 and is started by the benchmark that uses it: "
        "chatchain's `OpenAITestServer` (echo or scripted replies, SSE streaming with a usage "
        "chunk), a redis-server without persistence, and a PostgreSQL cluster with `fsync`, "
        "`synchronous_commit` and `full_page_writes` off (the test suite's launchers).",
        "",
    ]

    # -- how to read
    out += [
        "## How to read this",
        "",
        "- **Compare ratios, not absolute times.** The endpoint is a test server on loopback "
        "that answers in well under a millisecond, so each time here is the cost of the "
        "client side and a loopback floor. A real model takes hundreds of milliseconds to "
        "seconds per call: against it, the same absolute differences are a much smaller share.",
        "- **Side by side.** Contenders that are compared run in the same process and the same "
        "run, interleaved round-robin with the order rotated every round, after warm-up "
        "rounds, so that drift and background load fall on all of them alike.",
        "- **Medians, with p90 for the tail.** `[a, b]` is a 95% bootstrap interval of a ratio "
        "of medians: a difference counts when the interval excludes 1.0 (and, on a shared "
        "machine, in more than one run).",
        "- **Which way is better.** A ratio of *times* above 1 means the first contender is "
        "slower; a ratio of *turns per second* below 1 means it completes fewer turns.",
        "- **Contenders.** *raw client* is `openai.OpenAI`/`AsyncOpenAI` with the history kept "
        "by hand; *plain chain* is a bare LangChain `prompt | ChatOpenAI` in "
        "`RunnableWithMessageHistory`, metered with `get_openai_callback()`; *chatchain bot* is "
        "`Chatbot.chat`/`achat`/`stream`; *chatchain chain* is `create_chat_chain()` called "
        "like any runnable. chatchain does more per turn (validation, the session lock, the "
        "window, the usage ledger): the targets bound what that costs.",
        "",
    ]

    out += _history_section(memory, img)
    out += _tokens_section(memory, img)
    out += _concurrency_section(conc, img)
    out += _turn_section(turn, img)
    out += _ledger_section(ledger)
    out += _processes_section(memory)
    # Where `bench_server.py` writes its section 7 (kept from the page this run replaces).
    out += [BEGIN, END, ""]
    out += _stream_section(stream)
    out += _relay_section(relay)
    # Where `bench_instances.py` writes its section 10 (kept from the page this run replaces).
    out += [bench_instances.BEGIN, bench_instances.END, ""]

    out += [
        "## Running it",
        "",
        "```sh",
        "make bench                                       # this page, ~18 min on 2 cores",
        ".venv/bin/python benchmarks/report.py --quick    # fewer samples, ~4 min",
        "BENCH_LITELLM=LITELLM_VENV/bin/litellm make bench  # with §9's LiteLLM proxy",
        "```",
        "",
        "Each benchmark also runs on its own (`--help` lists the options); "
        "[`benchmarks/README.md`](../benchmarks/README.md) describes the method of each.",
        "",
    ]
    return "\n".join(out)


def _history_section(memory: dict[str, Any], img: Path) -> list[str]:
    out = ["## 1. Per-turn time against stored history", ""]
    if (reason := _error(memory)) or "history" not in memory:
        return [*out, f"Not measured: {reason or 'part 1 not run'}.", ""]
    table = memory["history"]["table"]
    config = memory["config"]
    measured = {s: r for s, r in table.items() if "stats" in r}
    sizes = sorted({int(size) for r in measured.values() for size in r["stats"]})
    plot_history(table, img / "bench-history.png")
    out += [
        f"`Chatbot.chat` with `FakeChatModel` (no delay: the model costs next to nothing, so "
        f"the store and the chain show) on sessions pre-filled with "
        f"{', '.join(_size(s) for s in sizes)} messages, per store. Default window "
        f"({config['window_turns']} turns / {config['window_tokens']:,} tokens), running "
        f"summary off so that no summary call is timed; every timed turn sends the same prompt "
        f"(checked). {config['history_turns']} timed turns per store and size after "
        f"{config['history_warmup']} warm-up rounds, the sizes round-robin. A turn reads only "
        "the window, so the lines should be flat.",
        "",
        "![Median per-turn time against stored messages, a line per store](img/bench-history.png)",
        "",
    ]
    rows = []
    for store, row in table.items():
        if "stats" not in row:
            rows.append([store, *(["not available"] + [""] * (len(sizes) - 1))])
            continue
        rows.append(
            [store]
            + [
                f"{_ms(row['stats'][str(s)]['median_ms'])} ({_ms(row['stats'][str(s)]['p90_ms'])})"
                for s in sizes
            ]
        )
    out += ["Median (p90) ms per turn, by messages stored before the run:", ""]
    out += _table(["store", *(_size(s) for s in sizes)], rows)
    rows = []
    for store, row in table.items():
        if "ratios" not in row:
            rows.append([store, "not available: " + row.get("error", ""), "", ""])
            continue
        last = row["ratios"][str(sizes[-1])]
        rows.append(
            [store]
            + [_ratio(row["ratios"][str(s)], 3) for s in sizes[1:]]
            + [_verdict(last["ratio"] <= HISTORY_TARGET)]
        )
    head = ["store", *(f"{_size(s)} / {sizes[0]}" for s in sizes[1:])]
    out += [f"Ratios of medians to the {sizes[0]}-message session [95% interval]:", ""]
    out += _table([*head, f"{_size(sizes[-1])} / {sizes[0]} ≤ {HISTORY_TARGET:.2f}"], rows)
    out += [
        "Every turn adds two messages, so a session holds more when timed than its pre-fill "
        "(the 10-message one is put back every few rounds); the plot and tables are labelled "
        "by pre-fill, and the sessions held, when timed: "
        + "; ".join(
            f"{_size(int(s))}: {_size(low)} to {_size(high)}"
            for s, (low, high) in next(iter(measured.values()))["held"].items()
        )
        + ".",
        "",
    ]
    return out


def _tokens_section(memory: dict[str, Any], img: Path) -> list[str]:
    out = ["## 2. Prompt tokens over a long conversation", ""]
    if (reason := _error(memory)) or "tokens" not in memory:
        return [*out, f"Not measured: {reason or 'part 2 not run'}.", ""]
    tokens, series = memory["tokens"], memory["tokens_series"]
    config = memory["config"]
    plot_tokens(series, img / "bench-tokens.png")
    ratio = tokens["chatchain_prompt_tokens"] / tokens["plain_prompt_tokens"]
    out += [
        f"The same {len(series)} user messages (about 30 words; answers and summaries about 60 "
        "words, deterministic) through the plain chain, which sends the whole history every "
        f"turn, and through `Chatbot` with its default settings (a window of "
        f"{config['window_turns']} turns / {config['window_tokens']:,} tokens and a running "
        "summary of older turns). Prompt tokens as the endpoint reported them, chatchain's "
        "summary calls included; both totals equal the server's own count"
        + ("" if tokens["checks"]["equal"] else " (**they did not: see the script's output**)")
        + ". No timing: the same numbers on every run.",
        "",
        "![Prompt tokens per turn and cumulative, plain chain and chatchain](img/bench-tokens.png)",
        "",
    ]
    rows = [
        [
            "plain chain",
            f"{tokens['plain_prompt_tokens']:,}",
            str(tokens["requests"]["plain"]),
            f"{tokens['plain_max_turn_tokens']:,}",
            "",
        ],
        [
            "chatchain bot",
            f"{tokens['chatchain_prompt_tokens']:,}",
            str(tokens["requests"]["chatchain"]),
            f"{tokens['chatchain_max_turn_tokens']:,}",
            str(tokens["summary_calls"]),
        ],
    ]
    out += _table(
        ["contender", "prompt tokens", "requests", "most in one turn", "summary calls"], rows
    )
    marks = sorted({len(series) // 4, len(series) // 2, 3 * len(series) // 4, len(series)})
    cum, a, b = {}, 0, 0
    for t in series:
        a += t["plain"]
        b += t["chatchain"] + t["chatchain_summary"]
        if t["turn"] in marks:
            cum[t["turn"]] = b / a
    out += ["chatchain / plain chain, cumulative prompt tokens after each turn:", ""]
    out += _table(
        ["after turn", *(str(k) for k in cum)], [["ratio", *(f"{v:.1%}" for v in cum.values())]]
    )
    out += [
        f"Target: at most {TOKENS_TARGET:.0%} over {len(series)} turns: {ratio:.1%}, "
        f"{_verdict(ratio <= TOKENS_TARGET)}. The ratio keeps falling with a longer "
        "conversation: chatchain's prompt stays bounded while the plain chain's grows "
        "with every turn.",
        "",
    ]
    return out


def _concurrency_section(conc: dict[str, Any], img: Path) -> list[str]:
    out = ["## 3. Turns per second against concurrency", ""]
    if reason := _error(conc):
        return [*out, f"Not measured: {reason}.", ""]
    config = conc["config"]
    levels = [str(c) for c in config["concurrency"]]
    plot_concurrency(conc, img / "bench-concurrency.png")
    out += [
        f"{', '.join(levels)} sessions at once in one process (one asyncio event loop), each "
        "running conversations of 3 turns: `Chatbot.achat`, the plain chain's `ainvoke` and "
        "`openai.AsyncOpenAI`, against one `OpenAITestServer` in a process of its own (so "
        f"that it does not share the clients' GIL). A run is {config['turns']} turns; "
        f"{config['rounds']} rounds after {config['warmup']} warm-up, every contender and "
        "concurrency once per round, contenders rotated. Cells are medians over the rounds.",
        "",
        "![Turns per second against concurrent sessions, and chatchain's ratios]"
        "(img/bench-concurrency.png)",
        "",
    ]
    cells = conc["cells"]
    head = ["concurrent sessions", *levels]
    rows = [
        [name, *(f"{row[c]['turns_per_s']:,.0f}" for c in levels)] for name, row in cells.items()
    ]
    out += ["Turns per second:", ""]
    out += _table(head, rows)
    rows = [
        [label, *(_ratio(by_level[c]) for c in levels)]
        for label, by_level in conc["ratios"].items()
    ]
    out += ["Ratios of turns per second [95% interval]:", ""]
    out += _table(head, rows)
    rows = [
        [
            name,
            *(
                f"{row[c]['cpu_ms_per_turn']:.2f} / {row[c]['server_cpu_ms_per_turn']:.2f}"
                for c in levels
            ),
        ]
        for name, row in cells.items()
    ]
    out += ["CPU ms per turn, client process / server process:", ""]
    out += _table(head, rows)
    rows = [
        [name, *(f"{_ms(row[c]['median_ms'])} ({_ms(row[c]['p90_ms'])})" for c in levels)]
        for name, row in cells.items()
    ]
    out += ["Median (p90) ms per turn, waiting for the loop included:", ""]
    out += _table(head, rows)
    busiest = max(row[c]["server_core_share"] for row in cells.values() for c in levels)
    time_ratios = [1 / conc["ratios"]["chatchain bot / plain chain"][c]["ratio"] for c in levels]
    worst = max(time_ratios)
    out += [
        f"The server process used at most {busiest:.0%} of a core during any contender's runs, "
        "so each contender's turns per second are bounded by its own CPU per turn in this "
        "one process (one event loop, one GIL), which the CPU table shows directly and less "
        "noisily. Read as time per turn (plain turns/s over chatchain turns/s), chatchain is "
        f"at worst {worst:.3f}x the plain chain here: "
        f"{'within' if worst <= TURN_TARGET else 'beyond'} the per-turn target of "
        f"{TURN_TARGET:.2f}x (dashed line above; that target is §4's, for one turn, and is not "
        "counted in the table of targets).",
        "",
    ]
    return out


def _turn_section(turn: dict[str, Any], img: Path) -> list[str]:
    out = ["## 4. One turn: latency against the plain chain and the raw client", ""]
    if reason := _error(turn):
        return [*out, f"Not measured: {reason}.", ""]
    config = turn["config"]
    plot_turn(turn["summary"], img / "bench-turn.png")
    out += [
        f"`bench_turn.py`: {config['turns']} samples per contender and mode after "
        f"{config['warmup']} warm-up rounds, round-robin. A sample is a fresh session: an "
        "untimed priming turn, then the timed turn, so every timed request carries the same "
        "messages (checked: all contenders send the same request body). *invoke* is a whole "
        "non-streamed turn; *TTFT* the time to the first text of a streamed one; *stream* the "
        "whole streamed turn. Server in the same process.",
        "",
        "![Median invoke and time to first token per contender](img/bench-turn.png)",
        "",
    ]
    modes = ("invoke", "ttft", "stream")
    rows = [
        [name, *(f"{_ms(row[m]['median_ms'])} ({_ms(row[m]['p90_ms'])})" for m in modes)]
        for name, row in turn["summary"].items()
    ]
    out += ["Median (p90) ms:", ""]
    out += _table(["contender", "invoke", "TTFT", "stream"], rows)
    rows = [
        [label, *(_ratio(by_mode[m], 3) for m in modes)]
        for label, by_mode in turn["ratios"].items()
    ]
    out += ["Ratios of medians [95% interval]:", ""]
    out += _table(["", "invoke", "TTFT", "stream"], rows)
    met, text = _turn_target(turn)
    out += [
        f"Target: chatchain at most {TURN_TARGET:.2f}x the plain chain on median invoke and "
        f"median TTFT: worst {text}, {_verdict(met)}.",
        "",
    ]
    return out


def _stream_section(stream: dict[str, Any]) -> list[str]:
    out = ["## 8. A long streamed reply: per chunk and peak memory", ""]
    if reason := _error(stream):
        return [*out, f"Not measured: {reason}.", ""]
    config = stream["config"]
    out += [
        f"`bench_stream.py`: the test server (in a process of its own) echoes a "
        f"{config['chunks']:,}-word message back one word per SSE chunk, with a usage chunk at "
        f"the end. Per chunk: the wall time of a whole streamed turn on a fresh session divided "
        f"by the chunks received, median of {config['rounds']} interleaved rounds after a "
        "warm-up round. Memory: one turn of "
        f"{config['memory_chunks']:,} chunks per contender under `tracemalloc`, after a short "
        "untraced turn (what a process loads once is not the turn's); the peak of traced "
        "allocations during the turn over the reply's UTF-8 bytes.",
        "",
    ]
    if "time" in stream:
        rows = [[name, f"{us:.1f}"] for name, us in stream["time"]["us_per_chunk"].items()]
        out += _table(["contender", "µs per chunk (median)"], rows)
        rows = [[label, f"{ratio:.2f}x"] for label, ratio in stream["time"]["ratios"].items()]
        out += _table(["ratio of medians", ""], rows)
    if "memory" in stream:
        rows = [[name, f"{value:.1f}x"] for name, value in stream["memory"].items()]
        out += _table(["contender", "peak traced memory / reply bytes"], rows)
    for met_text in (_chunk_target(stream), _memory_target(stream)):
        met, text = met_text
        out += [f"- {text}: {_verdict(met)}"]
    return [*out, ""]


def _relay_target(relay: dict[str, Any]) -> tuple[bool | None, str]:
    if _error(relay) or "relay" not in relay:
        return None, "not measured"
    ratios = relay["relay"].get("ratio_to_litellm")
    if not ratios:
        return None, "not measured: no LiteLLM proxy (set BENCH_LITELLM)"
    text = "; ".join(f"{route} {ratio:.2f}x" for route, ratio in ratios.items())
    return all(r <= TARGET_RELAY for r in ratios.values()), text


def _relay_section(found: dict[str, Any]) -> list[str]:
    out = ["## 9. The chat service: server CPU per relayed chunk", ""]
    if reason := _error(found):
        return [*out, f"Not measured: {reason}.", ""]
    relay = found["relay"]
    out += [
        f"`bench_server.py --parts 4`: the test server streams a {relay['chunks']:,}-chunk "
        f"reply as fast as it can; {relay['streams']} turns at once on one route of a real "
        "`chatchain serve` (one worker, SQLite store), the routes interleaved over "
        f"{relay['rounds']} rounds after a warm-up. The figure is the serving process's CPU "
        "(from `/proc`) over the chunks streamed, turn start and end included; each relayed "
        "text is checked to be exactly the reply. A LiteLLM proxy (its own virtual "
        "environment, `BENCH_LITELLM`) relays the same stream from the same test server in the "
        "same rounds, read by the same client as the OpenAI route.",
        "",
    ]
    rows = [[name, f"{us:.0f}"] for name, us in relay["us_per_chunk"].items()]
    out += _table(["relayed by", "µs of server CPU per chunk (median)"], rows)
    met, text = _relay_target(found)
    out += [f"Target: at most {TARGET_RELAY:.1f}x LiteLLM: {text}, {_verdict(met)}.", ""]
    return out


def _ledger_section(ledger: dict[str, Any]) -> list[str]:
    out = ["## 5. What the usage ledger and budgets cost", ""]
    if reason := _error(ledger):
        return [*out, f"Not measured: {reason}.", ""]
    config = ledger["config"]
    out += [
        f"`bench_ledger.py`: {config['turns']} turns of `Chatbot.chat` + `FakeChatModel` with "
        "budgets (session, user and overall caps: the prompt is counted, priced and held "
        "atomically in the store before the call, the hold replaced by the entry after it) "
        "and without (the ledger entry alone), alternating, per store. With a fake model the "
        "ratio is an upper bound: against a real endpoint the same absolute overhead is a "
        "small fraction of a call.",
        "",
    ]
    rows = []
    for store, row in ledger["turns"].items():
        if "error" in row:
            rows.append([store, "not available: " + row["error"], "", ""])
            continue
        rows.append([store, _ms(row["no_budget_ms"]), _ms(row["budgets_ms"]), _ratio(row, 3)])
    out += _table(["store", "no budget (ms)", "budgets (ms)", "budgets / no budget"], rows)
    small, large = config["entries_small"], config["entries_large"]
    out += [
        f"`usage_total` (what every budget check and `Chatbot.usage` read: a session's and the "
        f"overall total) with {small:,} and with {large:,} entries in the ledger; totals are "
        "kept per scope, so the ratio should stay near 1:",
        "",
    ]
    rows = []
    for store, row in ledger["totals"].items():
        if "error" in row:
            rows.append([store, "not available: " + row["error"], "", ""])
            continue
        rows.append(
            [store, f"{row['small_ms']:.3f}", f"{row['large_ms']:.3f}", f"{row['ratio']:.2f}"]
        )
    out += _table(["store", f"{small:,} entries (ms)", f"{large:,} entries (ms)", "ratio"], rows)
    return out


def _processes_section(memory: dict[str, Any]) -> list[str]:
    out = ["## 6. Throughput across processes", ""]
    if (reason := _error(memory)) or "throughput" not in memory:
        return [*out, f"Not measured: {reason or 'part 3 not run'}.", ""]
    config = memory["config"]
    cores = memory["machine"]["usable_cores"]
    out += [
        f"`bench_memory.py` part 3: 1 and 4 worker processes, {config['throughput_turns']} "
        "turns each of `Chatbot.chat` with `FakeChatModel(delay=0.002)`, summary off, on one "
        "shared store; either 4 sessions of each process's own (*own*) or 4 sessions shared by "
        f"all (*shared*: turns on one session wait for its lock). Median of "
        f"{config['throughput_reps']} runs. No target: {cores} cores run the workers, the "
        "servers and the parent alike, which bounds 4 processes / 1.",
        "",
    ]
    rows = []
    for store, by_scenario in memory["throughput"].items():
        if "error" in by_scenario:
            rows.append([store, "not available: " + by_scenario["error"], "", "", ""])
            continue
        for scenario, data in by_scenario.items():
            one, four = data["cells"]["1"], data["cells"]["4"]
            rows.append(
                [
                    store,
                    scenario,
                    f"{one['turns_per_s']:,.0f}",
                    f"{four['turns_per_s']:,.0f}",
                    f"{data['ratio']:.2f}",
                ]
            )
    out += _table(["store", "sessions", "1 process (turns/s)", "4 processes", "4 / 1"], rows, 2)
    return out


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (about 4 minutes)")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "docs" / "benchmarks.md",
        help="the page to write (default: docs/benchmarks.md); plots go to img/ beside it",
    )
    parser.add_argument("--json-dir", type=Path, help="keep the benchmarks' JSON results here")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="run nothing: write the page from the results in --json-dir",
    )
    args = parser.parse_args(argv)
    if args.render_only and args.json_dir is None:
        parser.error("--render-only needs --json-dir")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with json_dir(args.json_dir) as folder:
            meta_path = folder / "report.json"
            if args.render_only:
                env = json.loads(meta_path.read_text())
            else:
                env = environment(_command(argv), args.quick)
                started = time.perf_counter()
                for number, bench in enumerate(BENCHES, start=1):
                    run_bench(bench, args.quick, folder / f"{bench.key}.json", number)
                env["elapsed_min"] = (time.perf_counter() - started) / 60
                meta_path.write_text(json.dumps(env, indent=2) + "\n")
            results = {}
            for bench in BENCHES:
                path = folder / f"{bench.key}.json"
                try:
                    results[bench.key] = json.loads(path.read_text())
                except (OSError, ValueError) as exc:
                    results[bench.key] = {"error": f"no results ({type(exc).__name__})"}
            page = render(env, results, args.out.parent / "img")
    except _Terminated:
        print("report.py: stopped by SIGTERM", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    before = args.out.read_text() if args.out.exists() else ""
    kept = section_of(before)
    page = page if kept is None else insert_section(page, kept)
    instances = bench_instances.section_of(before)
    if instances is not None:
        page = bench_instances.insert_section(page, instances)
    args.out.write_text(page)
    failed = [key for key, found in results.items() if "error" in found]
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_absolute() else args.out}")
    if failed:
        print(f"not measured: {', '.join(failed)} (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
