"""The server benchmark's own logic on tiny inputs: counting open streams, the turns a run
makes, and the section it writes into docs/benchmarks.md (kept by report.py)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> Any:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_server

        yield bench_server
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_most_open_counts_streams_between_their_first_text_and_done(bench: Any) -> None:
    log = bench.StreamLog
    logs = [
        log(texts=[0.0, 1.0], done=2.0),
        log(texts=[1.5], done=3.0),
        log(texts=[2.5], done=4.0),
        log(error="status 429"),  # never open
    ]

    assert bench.most_open(logs) == 2


def test_a_run_makes_its_turns_in_sessions_of_three(bench: Any) -> None:
    seen: list[tuple[str, str]] = []

    async def turn(session_id: str, text: str) -> None:
        seen.append((session_id, text))

    latencies = asyncio.run(bench.run(turn, concurrency=2, turns=7, prefix="p"))

    assert len(latencies) == len(seen) == 7
    sessions: dict[str, list[str]] = {}
    for session_id, text in seen:
        sessions.setdefault(session_id, []).append(text)
    assert all(texts == list(bench.TEXTS[: len(texts)]) for texts in sessions.values())


def _data(bench: Any) -> dict[str, Any]:
    route = {"median_ms": 12.0, "p90_ms": 20.0, "ratio": 1.2, "low": 1.1, "high": 1.3}
    row = {"in-process": {"median_ms": 10.0, "p90_ms": 15.0}}
    row |= {"native API": route, "OpenAI API": route}
    return {
        "overhead": {"1": row, "16": row, "64": row},
        "streams": {
            "streams": 1000,
            "interval_s": 3.0,
            "chunks": 14,
            "ramp_s": 30.0,
            "wall_s": 80.0,
            "most_open": 1000,
            "server_cpu_s": 40.0,
            "server_cpu_ms_per_event": 1.5,
            "errors": {},
            "gap_p50_s": 3.0,
            "gap_p99_s": 3.4,
            "gap_max_s": 4.0,
            "gaps_s": [3.0, 3.1, 3.4],
        },
        "workers": {
            "concurrency": 64,
            "turns": 256,
            "runs": {"1": [50.0], "2": [80.0]},
            "turns_per_s": {"1": 50.0, "2": 80.0},
        },
        "machine": {"cores": 2},
        "date": "2026-12-01 12:00 UTC",
        "minutes": 4.0,
        "command": ".venv/bin/python benchmarks/bench_server.py",
    }


def test_the_section_states_the_targets_and_replaces_itself_in_the_page(
    bench: Any, tmp_path: Path
) -> None:
    text = bench.section(_data(bench))
    page = "# Benchmarks\n\n## 6. Before\n\n## Running it\n\nmake bench\n"

    once = bench.insert_section(page, text)
    twice = bench.insert_section(once, text.replace("1.20x", "1.25x"))

    assert "**met**" in text and "not met" not in text
    assert once.index(bench.BEGIN) < once.index("## Running it")
    assert twice.count(bench.BEGIN) == 1 and "1.25x" in twice and "1.20x" not in twice
    assert bench.section_of(twice) is not None and "1.25x" in bench.section_of(twice)
    assert bench.section_of(page) is None
    bench.plot(_data(bench), tmp_path / "server.png")
    assert (tmp_path / "server.png").stat().st_size > 0
