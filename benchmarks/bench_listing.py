"""What listing one user's sessions (``GET /v1/sessions``) costs in a SQLite store full of
other users' sessions: the old way (every id of the store, then `info` for the caller's)
against `HistoryStore.session_infos` (one range of the id index).

Run: ``.venv/bin/python benchmarks/bench_listing.py`` (``--others N`` for the other users'
sessions, 10,000 by default; about 30 s on 2 cores, most of it filling the store).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from langchain_core.messages import AIMessage, HumanMessage

from chatchain.stores import HistoryStore, SessionInfo, SQLiteStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def every_session_then_info(store: HistoryStore, prefix: str) -> list[SessionInfo]:
    """The listing before `session_infos`: read every id, keep the caller's, `info` each."""
    infos = [
        info
        for session_id in store.sessions()
        if session_id.startswith(prefix) and (info := store.info(session_id)) is not None
    ]
    return sorted(infos, key=lambda info: info.updated_at, reverse=True)


def by_prefix(store: HistoryStore, prefix: str) -> list[SessionInfo]:
    return store.session_infos(prefix, limit=500)


def median_ms(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--others", type=int, default=10_000, help="other users' sessions")
    parser.add_argument("--repeat", type=int, default=30, help="timed runs of each way")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "listing.db")
        messages = [HumanMessage("hi"), AIMessage("hello")]
        for i in range(args.others):  # 10 sessions per other user
            store.replace_session(
                f"user{i // 10:05}:s{i % 10}", messages, updated_at=T0 + timedelta(seconds=i)
            )
        for i in range(10):
            store.replace_session(f"ann:s{i}", messages, updated_at=T0 + timedelta(minutes=i))
        old, new = every_session_then_info(store, "ann:"), by_prefix(store, "ann:")
        if old != new or len(new) != 10:
            raise SystemExit(f"The two ways disagree: {old} != {new}")
        ways = {"every session, then info": every_session_then_info, "session_infos": by_prefix}
        results = {
            name: median_ms(lambda way=way: way(store, "ann:"), args.repeat)  # type: ignore[misc]
            for name, way in ways.items()
        }
        store.close()
    print(f"one user's 10 sessions among {args.others:,} others', median of {args.repeat}:")
    for name, ms in results.items():
        print(f"  {name:<26} {ms:9.3f} ms")


if __name__ == "__main__":
    main()
