"""What the usage ledger and budgets cost, per store, measured side by side in one run.

1. Per-turn time with budgets (session, user and overall caps: one atomic hold before the call,
   replaced by the entry after it) against the same turn without budgets (the entry alone),
   through `Chatbot.chat` and `FakeChatModel`, round-robin, ratio of medians with a 95%
   bootstrap interval.
2. `usage_total` (what budgets and `Chatbot.usage` read) with 100 and with 100,000 entries in
   the ledger: the totals are kept per scope, so the ratio should stay near 1.

Run: ``.venv/bin/python benchmarks/bench_ledger.py`` (about 3 minutes; ``--quick`` for less;
``--json PATH`` also writes the results). Redis and PostgreSQL run on servers of our own on
free loopback ports (``_servers.py``); a server that cannot start leaves its rows marked "not
available", with the reason. Settings come from the script, never from the environment or a
``.env`` file.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import _servers
from bench_turn import clean_environment, machine, ratio_ci

from chatchain import Budget, Chatbot, Settings
from chatchain.stores import HistoryStore, open_store
from chatchain.testing import FakeChatModel
from chatchain.usage import UsageEntry

STORES = ["memory", "sqlite", "redis", "postgres"]
WARMUP = 20
READS = 300
SMALL = 100


@contextmanager
def store_urls(names: list[str]) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """The URL of each store that could be started, and the reason for each that could not."""
    with ExitStack() as stack:
        urls = {"memory": "memory://"}
        errors: dict[str, str] = {}
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="chatchain-bench-"))
        urls["sqlite"] = f"sqlite:///{Path(folder) / 'ledger.db'}"
        for name, launch in (("redis", _servers.redis_url), ("postgres", _servers.postgres_url)):
            if name not in names:
                continue
            try:  # a launcher that fails cleans up after itself; the rows say why
                urls[name] = stack.enter_context(launch())
            except Exception as exc:
                lines = str(exc).strip().splitlines()
                errors[name] = f"{type(exc).__name__}: {lines[0] if lines else ''}"
        yield {name: urls[name] for name in names if name in urls}, errors


def settings() -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        api_key="sk-bench",
        model="gpt-4o-mini",
        max_tokens=200,
        window_turns=6,
        window_tokens=3000,
        summarize=False,
    )


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def bench_turns(store: HistoryStore, turns: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per turn with budgets and without, alternating which goes first."""
    big = Budget(
        session_usd=1e6, session_tokens=10**12, user_usd=1e6, total_usd=1e6, total_tokens=10**12
    )
    bots: dict[str, Chatbot] = {
        "no budget": Chatbot(settings(), llm=FakeChatModel(model_name="gpt-4o-mini"), store=store),
        "budgets": Chatbot(
            settings(), llm=FakeChatModel(model_name="gpt-4o-mini"), store=store, budget=big
        ),
    }
    samples: dict[str, list[float]] = {name: [] for name in bots}
    for round_ in range(warmup + turns):
        order = list(bots.items()) if round_ % 2 == 0 else list(reversed(bots.items()))
        for name, bot in order:
            sid = f"{name}-{round_ % 20}"
            start = time.perf_counter()
            bot.chat(f"question number {round_}", session_id=sid, user_id="bench-user")
            if round_ >= warmup:
                samples[name].append(time.perf_counter() - start)
    return samples


def fill(store: HistoryStore, count: int, session: str) -> None:
    now = datetime.now(UTC)
    for i in range(count):
        store.record_usage(
            UsageEntry(session, "gpt-4o-mini", 10, 5, 15, cost_usd=1e-5, user_id="u", at=now)
        )
        if i and i % 20_000 == 0:
            print(f"      {i:,} entries", file=sys.stderr)


def bench_totals(
    make: Callable[[], HistoryStore], small: int, large: int, reads: int
) -> dict[str, float]:
    results = {}
    for label, count in (("small", small), ("large", large)):
        store = make()
        try:
            fill(store, count, f"ledger-{label}")
            samples = []
            for _ in range(reads):
                start = time.perf_counter()
                store.usage_total("session", f"ledger-{label}")
                store.usage_total("all", "")
                samples.append(time.perf_counter() - start)
            results[label] = median_ms(samples)
        finally:
            store.close()
    return results


def server_versions(urls: dict[str, str]) -> dict[str, str]:
    found = {"SQLite": sqlite3.sqlite_version}
    if "redis" in urls:
        found["redis-server"] = _servers.redis_version(urls["redis"])
    if "postgres" in urls:
        found["PostgreSQL"] = _servers.postgres_version(urls["postgres"])
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--stores", default=",".join(STORES))
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="100 turns, 20,000 entries")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.turns, args.entries = 100, 20_000
    names = [name for name in args.stores.split(",") if name]
    clean_environment()
    print(
        f"chatchain {version('chatchain')}, langchain-core {version('langchain-core')}, "
        f"genai-prices {version('genai-prices')} on Python {platform.python_version()}, "
        f"{platform.machine()}, {platform.system()}; {args.turns} turns per contender"
    )
    started = time.perf_counter()
    rng = random.Random(0)
    turns: dict[str, dict[str, Any]] = {}
    totals: dict[str, dict[str, Any]] = {}
    with store_urls(names) as (urls, errors):
        servers = server_versions(urls)
        print("\n1. Per-turn time, budgets on vs off (median ms; ratio = on / off)")
        print(f"{'store':10} {'no budget':>10} {'budgets':>10} {'ratio':>7} {'95% CI':>14}")
        for name in names:
            if name not in urls:
                turns[name] = {"error": errors[name]}
                print(f"{name:10} not available: {errors[name]}")
                continue
            store = open_store(urls[name], lock_timeout=30)
            try:
                samples = bench_turns(store, args.turns, warmup=WARMUP)
            finally:
                store.close()
            off, on = samples["no budget"], samples["budgets"]
            low, high = ratio_ci(on, off, rng)
            turns[name] = {
                "no_budget_ms": median_ms(off),
                "budgets_ms": median_ms(on),
                "ratio": statistics.median(on) / statistics.median(off),
                "ci95_low": low,
                "ci95_high": high,
            }
            row = turns[name]
            print(
                f"{name:10} {row['no_budget_ms']:10.3f} {row['budgets_ms']:10.3f} "
                f"{row['ratio']:7.3f} {f'[{low:.2f}, {high:.2f}]':>14}"
            )

        print(f"\n2. usage_total with {SMALL} vs {args.entries:,} entries (median ms of 2 reads)")
        print(f"{'store':10} {SMALL:>10} {args.entries:>10,} {'ratio':>7}")
        for name in names:
            if name not in urls:
                totals[name] = {"error": errors[name]}
                print(f"{name:10} not available: {errors[name]}")
                continue
            url = urls[name]
            memory = open_store(url) if name == "memory" else None  # gone when dropped: keep one
            result = bench_totals(
                lambda url=url, memory=memory: memory or open_store(url), SMALL, args.entries, READS
            )
            ratio = result["large"] / result["small"]
            totals[name] = {
                "small_ms": result["small"],
                "large_ms": result["large"],
                "ratio": ratio,
            }
            print(f"{name:10} {result['small']:10.3f} {result['large']:10.3f} {ratio:7.3f}")
    elapsed = time.perf_counter() - started
    if args.json is not None:
        payload = {
            "machine": machine(),
            "servers": servers,
            "profile": "quick" if args.quick else "default",
            "config": {
                "turns": args.turns,
                "warmup": WARMUP,
                "entries_small": SMALL,
                "entries_large": args.entries,
                "reads": READS,
                "elapsed_s": elapsed,
            },
            "unavailable": errors,
            "turns": turns,
            "totals": totals,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
