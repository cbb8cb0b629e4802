"""Billed but not recorded? Endpoint calls against ledger entries across a store outage.

N sessions stream turns at once (``Chatbot.astream``, the service's path) from a
`FakeChatModel` that takes about a second per reply, on a Redis or PostgreSQL server of the
script's own. A few seconds in, the server is stopped (PostgreSQL: ``immediate``, like a
crash) for ``--outage`` seconds, then started again. Once the load ends, every session runs
one more turn (which saves what its journal holds, where there is one) and the script prints:
calls that reached the endpoint, entries in the ledger, and the difference (billed, not
recorded), with the errors the callers saw.

Run (about 20 s per store; bounded by ``--duration``):
``.venv/bin/python benchmarks/store_outage.py --store redis`` (or ``--store postgres``).
The same file runs against another checkout's package (e.g. the code before the journal), with
that checkout's interpreter: ``OLD/.venv/bin/python benchmarks/store_outage.py``. Settings come
from the script; the journal goes to a temporary folder (``CHATCHAIN_DATA_DIR``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from chatchain import Chatbot, Settings, StoreError, open_store
from chatchain.testing import FakeChatModel, PostgresCluster, redis_server, redis_url_of


@contextmanager
def server(kind: str, folder: Path) -> Iterator[tuple[str, Callable[[], None], Callable[[], None]]]:
    """The store URL, and how to stop and start its server."""
    if kind == "redis":
        (folder / "redis").mkdir()
        with redis_server(folder / "redis", appendonly=True) as redis:
            try:
                yield redis_url_of(redis), redis.stop, redis.start
            finally:
                redis.stop()  # the restarted process: leaving the context does not stop it
        return
    cluster = PostgresCluster()
    cluster.start()
    try:
        yield (
            cluster.url + "?connect_timeout=2",
            lambda: cluster.stop("immediate"),
            cluster.start,
        )
    finally:
        cluster.destroy()


async def stream_turn(bot: Chatbot, session_id: str, text: str) -> None:
    async for _ in bot.astream(text, session_id=session_id):
        pass


async def load(bot: Chatbot, sessions: int, until: float, seen: Counter[str]) -> None:
    async def worker(i: int) -> None:
        turn = 0
        while time.monotonic() < until:
            turn += 1
            try:
                await stream_turn(bot, f"s{i}", f"turn {turn} of session {i}")
                seen["ok"] += 1
            except StoreError as exc:
                seen[type(exc).__name__] += 1
                await asyncio.sleep(0.1)

    await asyncio.gather(*(worker(i) for i in range(sessions)))


async def settle(bot: Chatbot, sessions: int, seen: Counter[str]) -> None:
    """One more turn per session, once the store is back (retried while it comes up)."""

    async def last(i: int) -> None:
        for _ in range(50):
            try:
                await stream_turn(bot, f"s{i}", "are you back?")
                return
            except StoreError as exc:
                seen[f"settle {type(exc).__name__}"] += 1
                await asyncio.sleep(0.2)

    await asyncio.gather(*(last(i) for i in range(sessions)))


def pending(bot: Chatbot) -> int | None:
    journal = getattr(bot.chain._spec, "journal", None)  # None before the journal existed
    return None if journal is None else len(journal.pending())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", choices=["redis", "postgres"], default="redis")
    parser.add_argument("--streams", type=int, default=10, help="sessions streaming at once")
    parser.add_argument("--outage", type=float, default=3.0, help="seconds the server is down")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="chatchain-outage-") as tmp,
        server(args.store, Path(tmp)) as (url, stop, start),
    ):
        os.environ["CHATCHAIN_DATA_DIR"] = str(Path(tmp) / "data")
        settings = Settings(
            api_key="sk-test",
            model="gpt-4o-mini",
            store_url=url,
            summarize=False,
            window_turns=4,
            lock_timeout=10.0,  # bounded: a stuck lock fails the turn rather than the run
        )
        reply = " ".join(f"word{i}" for i in range(20))
        fake = FakeChatModel(respond=lambda messages: reply, delay=0.05)  # ~1 s a reply
        # A lock the outage kept from being released frees itself within its lease (Redis):
        # a short one keeps the run short.
        options = {"lease": 2.0} if args.store == "redis" else {}
        bot = Chatbot(settings, llm=fake, store=open_store(url, **options))
        seen: Counter[str] = Counter()
        try:

            async def run() -> None:
                began = time.monotonic()
                traffic = asyncio.create_task(load(bot, args.streams, began + args.duration, seen))
                await asyncio.sleep(2.0)
                await asyncio.to_thread(stop)
                await asyncio.sleep(args.outage)
                await asyncio.to_thread(start)
                await traffic
                await settle(bot, args.streams, seen)
                for _ in range(50):  # other sessions' journaled turns, saved in the background
                    if not pending(bot):
                        break
                    await asyncio.sleep(0.1)

            asyncio.run(run())
            calls, entries = len(fake.calls), len(bot.usage_entries())
            left = pending(bot)
        finally:
            bot.close()

    print(f"store: {args.store}, {args.streams} streams, server down {args.outage:g} s")
    print(f"callers saw: {dict(sorted(seen.items()))}")
    print(f"endpoint calls: {calls}")
    print(f"ledger entries: {entries}")
    print(f"billed, not recorded: {calls - entries}")
    print("journal: " + ("none (this version has none)" if left is None else f"{left} left"))


if __name__ == "__main__":
    main()
