"""Before/after figures for issue 11's store items: fenced writes, atomic turns, hold clocks.

Runs one checkout of the ``chatchain`` package (``--code``, a folder holding ``chatchain/``)
against throwaway SQLite, Redis and PostgreSQL servers, so that an older commit can be measured
with the same script::

    git archive fdea8c0 chatchain | tar -x -C /tmp/before      # the code before the fix
    python benchmarks/safety_figures.py fence --code /tmp/before
    python benchmarks/safety_figures.py fence --code .
    python benchmarks/safety_figures.py kills --code . --kills 30
    python benchmarks/safety_figures.py clock --code .

- ``fence``: turns whose lock is lost mid-turn (lease expired, key expired, connection
  killed) while another process writes the session: how many still wrote their messages.
- ``kills``: a process running turns is killed (``kill -9``) at a random moment, again and
  again: how many kills left a billed turn without its messages.
- ``clock``: how long a hold meant to live 1 s lives by the server's clock, when the client
  that took it has a clock one hour fast or slow.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _servers import postgres_url, redis_url

# Prepended to any code run here: import chatchain from --code, not the installed one.
_USE_CODE = """
import os, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path.insert(0, os.environ["CHATCHAIN_CODE"])
"""

_KILLED_CHILD = """
from chatchain import Chatbot, Settings
from chatchain.testing import FakeChatModel
url, session_id = sys.argv[1], sys.argv[2]
bot = Chatbot(Settings(api_key="sk-test", store_url=url, summarize=False, window_turns=2),
              llm=FakeChatModel())
bot.chat("warm up", session_id=session_id + "-warm")
print("ready", flush=True)
while True:
    bot.chat("hello", session_id=session_id)
"""


def use_code(code: str) -> None:
    os.environ["CHATCHAIN_CODE"] = str(Path(code).resolve())
    exec(_USE_CODE)  # our own constant


@contextmanager
def servers(tmp: Path) -> Iterator[dict[str, str]]:
    with ExitStack() as stack:
        urls = {
            "sqlite": f"sqlite:///{tmp / 'chat.db'}",
            "redis": stack.enter_context(redis_url()),
            "postgres": stack.enter_context(postgres_url()),
        }
        yield urls


def loser(name: str, store: Any, url: str) -> Callable[[str], None]:
    """How a session's lock is lost on each backend, as in production."""
    import psycopg
    import redis

    def sqlite_lease_expires(session_id: str) -> None:
        conn = sqlite3.connect(store.path)
        with conn:
            conn.execute("UPDATE locks SET expires_at = 0 WHERE session_id = ?", (session_id,))
        conn.close()

    def redis_key_expires(session_id: str) -> None:
        key = store._key("lock", session_id)
        with redis.Redis.from_url(url) as client:
            client.pexpire(key, 1)
            while client.exists(key):
                pass

    def postgres_connection_killed(session_id: str) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks"
                " WHERE locktype = 'advisory' AND granted AND objsubid = 1"
                " AND classid = ((hashtextextended(%(k)s, 0) >> 32) & 4294967295)::oid"
                " AND objid = (hashtextextended(%(k)s, 0) & 4294967295)::oid",
                {"k": f"{store.table_prefix}:{session_id}"},
            )

    return {
        "sqlite": sqlite_lease_expires,
        "redis": redis_key_expires,
        "postgres": postgres_connection_killed,
    }[name]


def fence(urls: dict[str, str], turns: int) -> None:
    for name, url in urls.items():
        fence_one(name, url, turns)


def fence_one(name: str, url: str, turns: int) -> None:
    from chatchain import Chatbot, Settings
    from chatchain.stores import open_store
    from chatchain.testing import FakeChatModel

    settings = Settings(api_key="sk-test", summarize=False)
    store, other = open_store(url, lock_timeout=10), open_store(url, lock_timeout=10)
    lose = loser(name, store, url)
    session = [""]

    def stalled(messages: list[Any]) -> str:
        lose(session[0])  # the turn stalls past its lock; another process writes
        Chatbot(settings, llm=FakeChatModel(), store=other).chat("other", session_id=session[0])
        return "late reply"

    bot = Chatbot(settings, llm=FakeChatModel(respond=stalled), store=store)
    wrote = refused = billed = 0
    for i in range(turns):
        session[0] = f"fenced-{time.time_ns()}-{i}"
        try:
            bot.chat("late", session_id=session[0])
        except Exception as exc:
            refused += type(exc).__name__ == "SessionLockLostError"
        wrote += "late reply" in [m.text for m in store.load(session[0])]
        billed += len(store.usage_entries(session_id=session[0])) == 2
    print(
        f"{name}: {wrote} of {turns} turns that lost their lock wrote beside the other "
        f"writer; {refused} raised SessionLockLostError; {billed} had both turns billed",
        flush=True,
    )
    store.close()
    other.close()


def kills(urls: dict[str, str], count: int) -> None:
    from chatchain.stores import open_store

    for name, url in urls.items():
        open_store(url).close()  # the tables, before the first child races to make them
        rng = random.Random(11)
        broken = saved = 0
        started = time.monotonic()
        for i in range(count):
            session_id = f"killed-{time.time_ns()}-{i}"
            command = [sys.executable, "-c", _USE_CODE + _KILLED_CHILD, url, session_id]
            with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
                try:
                    assert child.stdout is not None
                    assert child.stdout.readline() == "ready\n"
                    time.sleep(rng.uniform(0.05, 0.5))
                finally:
                    child.kill()
                    child.wait(30)
            store = open_store(url)
            try:
                billed = [e for e in store.usage_entries(session_id=session_id) if not e.summary]
                pairs = store.count(session_id) // 2
            finally:
                store.close()
            broken += len(billed) > pairs
            saved += pairs
        print(
            f"{name}: {broken} of {count} kills left a billed turn without its messages "
            f"({saved} turns saved, {time.monotonic() - started:.0f} s)",
            flush=True,
        )


def clock(urls: dict[str, str]) -> None:
    import psycopg
    import redis

    from chatchain import stores
    from chatchain.budgets import BudgetHold
    from chatchain.stores import _base
    from chatchain.stores._postgres import _ledger as _postgres_ledger
    from chatchain.stores._redis import _ledger as _redis_ledger

    for hours in (1, -1):
        skew = timedelta(hours=hours)

        def skewed(skew: timedelta = skew) -> datetime:
            return datetime.now(UTC) + skew

        for module in (_base, _redis_ledger, _postgres_ledger):
            if hasattr(module, "utcnow"):
                module.utcnow = skewed  # type: ignore[attr-defined]
        for name in ("redis", "postgres"):
            store = stores.open_store(urls[name])
            hold = BudgetHold("crashed", 10, 0.0, skewed() + timedelta(seconds=1))
            store.hold_budget(hold, [])
            if name == "redis":
                with redis.Redis.from_url(urls[name]) as client:
                    seconds, micros = client.time()
                    expiry = client.zscore(f"{store.prefix}:holds:expiry", hold.id)
                    lives = (expiry - (seconds * 1e6 + micros)) / 1e6
            else:
                with psycopg.connect(urls[name]) as conn:
                    row = conn.execute(
                        "SELECT extract(epoch FROM expires_at - clock_timestamp())"
                        f" FROM {store.table_prefix}_budget_holds WHERE id = %s",
                        (hold.id,),
                    ).fetchone()
                    assert row is not None
                    lives = float(row[0])
            print(
                f"{name}, client clock {hours:+d} h: a hold meant to live 1 s lives "
                f"{lives:.1f} s by the server's clock",
                flush=True,
            )
            store.release_budget(hold.id)
            store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figure", choices=["fence", "kills", "clock"])
    parser.add_argument("--code", default=".", help="folder holding the chatchain package")
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--turns", type=int, default=10)
    args = parser.parse_args()
    use_code(args.code)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, servers(Path(tmp)) as urls:
        if args.figure == "fence":
            fence(urls, args.turns)
        elif args.figure == "kills":
            kills(urls, args.kills)
        else:
            clock(urls)


if __name__ == "__main__":
    main()
