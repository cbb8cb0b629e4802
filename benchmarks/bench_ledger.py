"""What the usage ledger and budgets cost, per store, measured side by side in one run.

1. Per-turn time with budgets (session, user and overall caps: one atomic hold before the call,
   replaced by the entry after it) against the same turn without budgets (the entry alone),
   through `Chatbot.chat` and `FakeChatModel`, round-robin, ratio of medians.
2. `usage_total` (what budgets and `Chatbot.usage` read) with 100 and with 100,000 entries in
   the ledger: the totals are kept per scope, so the ratio should stay near 1.

Run: ``.venv/bin/python benchmarks/bench_ledger.py`` (about a minute; ``--quick`` for less).
Redis and PostgreSQL run on servers of our own on free loopback ports (``_servers.py``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import _servers

from chatchain import Budget, Chatbot, Settings
from chatchain.stores import HistoryStore, open_store
from chatchain.testing import FakeChatModel
from chatchain.usage import UsageEntry

STORES = ["memory", "sqlite", "redis", "postgres"]


@contextmanager
def store_urls(names: list[str]) -> Iterator[dict[str, str]]:
    with ExitStack() as stack:
        urls = {"memory": "memory://"}
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="chatchain-bench-"))
        urls["sqlite"] = f"sqlite:///{Path(folder) / 'ledger.db'}"
        if "redis" in names:
            urls["redis"] = stack.enter_context(_servers.redis_url())
        if "postgres" in names:
            urls["postgres"] = stack.enter_context(_servers.postgres_url())
        yield {name: urls[name] for name in names}


def settings() -> Settings:
    return Settings(
        api_key="sk-bench",
        model="gpt-4o-mini",
        max_tokens=200,
        window_turns=6,
        window_tokens=3000,
        summarize=False,
    )


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def bench_turns(store: HistoryStore, turns: int, warmup: int) -> dict[str, float]:
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
    return {name: median_ms(values) for name, values in samples.items()}


def fill(store: HistoryStore, count: int, session: str) -> None:
    now = datetime.now(timezone.utc)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--stores", default=",".join(STORES))
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="100 turns, 20,000 entries")
    args = parser.parse_args(argv)
    if args.quick:
        args.turns, args.entries = 100, 20_000
    names = [name for name in args.stores.split(",") if name]
    print(
        f"chatchain {version('chatchain')}, langchain-core {version('langchain-core')}, "
        f"genai-prices {version('genai-prices')} on Python {platform.python_version()}, "
        f"{platform.machine()}, {platform.system()}; {args.turns} turns per contender"
    )
    with store_urls(names) as urls:
        print("\n1. Per-turn time, budgets on vs off (median ms; ratio = on / off)")
        print(f"{'store':10} {'no budget':>10} {'budgets':>10} {'ratio':>7}")
        for name, url in urls.items():
            store = open_store(url, lock_timeout=30)
            try:
                turn = bench_turns(store, args.turns, warmup=20)
            finally:
                store.close()
            ratio = turn["budgets"] / turn["no budget"]
            print(f"{name:10} {turn['no budget']:10.3f} {turn['budgets']:10.3f} {ratio:7.3f}")

        print(f"\n2. usage_total with 100 vs {args.entries:,} entries (median ms of 2 reads)")
        print(f"{'store':10} {'100':>10} {args.entries:>10,} {'ratio':>7}")
        for name, url in urls.items():
            memory = open_store(url) if name == "memory" else None  # gone when dropped: keep one
            result = bench_totals(
                lambda url=url, memory=memory: memory or open_store(url), 100, args.entries, 300
            )
            ratio = result["large"] / result["small"]
            print(f"{name:10} {result['small']:10.3f} {result['large']:10.3f} {ratio:7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
