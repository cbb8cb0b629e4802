"""The instances benchmark: its section in docs/benchmarks.md (kept by report.py), its CPU
readings from /proc, and a quick run of the real thing (nginx, two stores, one instance)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> Any:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_instances

        yield bench_instances
    finally:
        sys.path.remove(str(BENCHMARKS))


def _row(count: int, rate: float) -> dict[str, Any]:
    cores = {"instances": 0.9, "nginx": 0.05, "store server": 0.1, "test server": 0.05}
    cores |= {"client (this process)": 0.4, "machine": 1.95}
    return {
        "instances": count,
        "turns": 128,
        "turns_per_s": rate,
        "p50_ms": 500.0,
        "p99_ms": 900.0,
        "cores_used": cores,
        "store_per_turn": {"statements": 18.0, "statement: SELECT": 8.0, "transactions": 1.0},
    }


def _data() -> dict[str, Any]:
    rows = {"1": _row(1, 40.0), "2": _row(2, 44.0)}
    redis = {k: {**v, "store_per_turn": {"hget": 13.0, "hincrby": 36.0}} for k, v in rows.items()}
    return {
        "concurrency": 64,
        "results": {"postgres": rows, "redis": redis},
        "machine": {"cores": 2},
        "date": "2026-12-08 02:00 UTC",
        "minutes": 4.0,
        "load_average": 2.0,
        "command": ".venv/bin/python benchmarks/bench_instances.py",
    }


def test_the_section_names_what_saturates_and_replaces_itself(bench: Any, tmp_path: Path) -> None:
    text = bench.section(_data())
    page = "# Benchmarks\n\n## 9. Before\n\n## Running it\n\nmake bench\n"

    once = bench.insert_section(page, text)
    twice = bench.insert_section(once, text.replace("44 with 2", "45 with 2"))

    assert "40 turns/s with 1 instance, 44 with 2 (1.10x)" in text
    assert "busy 1.95 of its 2 cores (saturated)" in text
    assert "the busiest process was instances (0.90 cores)" in text
    assert "18.0 statements (SELECT 8.0), 1.0 explicit transactions" in text
    assert "49.0 commands (hincrby 36.0, hget 13.0)" in text
    assert once.index(bench.BEGIN) < once.index("## Running it")
    assert twice.count(bench.BEGIN) == 1 and "45 with 2" in twice
    assert bench.section_of(twice) is not None and bench.section_of(page) is None
    bench.plot(_data(), tmp_path / "instances.png")
    assert (tmp_path / "instances.png").stat().st_size > 0


def test_cpu_seconds_count_a_process_and_the_children_it_reaped(bench: Any) -> None:
    child = subprocess.run(
        [sys.executable, "-c", "sum(i * i for i in range(3_000_000))"], check=True
    )
    assert child.returncode == 0

    own = bench.cpu_seconds(os.getpid())
    with_reaped = bench.cpu_seconds(os.getpid(), reaped=True)

    assert own > 0
    assert with_reaped - own > 0.05  # the child's work, reaped by this process
    assert bench.cpu_seconds(2**22 + 1) == 0.0  # no such process


@pytest.mark.slow
@pytest.mark.services
def test_a_quick_run_measures_turns_cpu_and_the_stores_work(tmp_path: Path) -> None:
    out = tmp_path / "instances.json"
    argv = [sys.executable, str(BENCHMARKS / "bench_instances.py"), "--quick", "--no-docs"]
    argv += ["--instances", "1", "--turns", "32", "--json", str(out)]
    subprocess.run(argv, check=True, timeout=600, capture_output=True)

    data = json.loads(out.read_text())
    for store in ("postgres", "redis"):
        found = data["results"][store]["1"]
        assert found["turns"] == 32 and found["turns_per_s"] > 0
        assert 0 < found["p50_ms"] <= found["p99_ms"]
        assert found["cores_used"]["instances"] > 0 and found["cores_used"]["nginx"] >= 0
    assert data["results"]["postgres"]["1"]["store_per_turn"]["statements"] >= 3
    assert sum(data["results"]["redis"]["1"]["store_per_turn"].values()) >= 3
