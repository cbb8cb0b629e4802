"""What only the SQLite store does: schema migrations, the file itself, leases across processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from multiprocessing.synchronize import Event as SyncEvent
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage

from chatchain import ConfigurationError, SessionBusyError, StoreError
from chatchain.budgets import BudgetHold, BudgetLimit
from chatchain.stores import Summary, _migrations, _sqlite, open_store
from chatchain.stores._sqlite import SQLiteStore, _path_from_url
from chatchain.usage import Scope, Usage, UsageEntry, total_of

spawn = multiprocessing.get_context("spawn")

# The schema steps this version ships, in order (append new ones; never edit or reorder).
SHIPPED = [
    "m001_initial",
    "m002_usage_ledger",
    "m003_estimated_totals",
    "m004_cached_turns",
    "m005_users",
    "m006_usage_days",
    "m007_pending_turns",
    "m008_session_titles",
    "m009_throttle",
]


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def lease_holders(path: Path) -> list[int]:
    """The process ids in the owners of the leases in the file (owner is host:pid:token)."""
    return [int(str(owner).split(":")[1]) for (owner,) in rows(path, "SELECT owner FROM locks")]


# -- schema ----------------------------------------------------------------------------------


def test_migrations_are_recorded_and_applied_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "chat.db"
    store = SQLiteStore(path)
    store.append("s", [HumanMessage("kept")])
    store.close()
    recorded = rows(path, "SELECT name, applied_at FROM _chatchain_migrations ORDER BY rowid")
    assert [name for name, _ in recorded] == SHIPPED

    SQLiteStore(path).close()  # reopening applies nothing again
    assert (
        rows(path, "SELECT name, applied_at FROM _chatchain_migrations ORDER BY rowid") == recorded
    )

    calls: list[str] = []

    def m999_add_tags(conn: sqlite3.Connection) -> None:
        calls.append("m999")
        conn.execute("CREATE TABLE tags (session_id TEXT, tag TEXT)")

    monkeypatch.setattr(_migrations, "MIGRATIONS", [*_migrations.MIGRATIONS, m999_add_tags])
    for _ in range(2):
        store = SQLiteStore(path)
        assert store.count("s") == 1  # the data survives migrations
        store.close()
    assert calls == ["m999"]
    names = rows(path, "SELECT name FROM _chatchain_migrations ORDER BY rowid")
    assert names == [(name,) for name in [*SHIPPED, "m999_add_tags"]]


def test_a_failing_migration_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "chat.db"
    SQLiteStore(path).close()

    def m999_broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half (x)")
        raise RuntimeError("migration bug")

    monkeypatch.setattr(_migrations, "MIGRATIONS", [*_migrations.MIGRATIONS, m999_broken])
    with pytest.raises(RuntimeError, match="migration bug"):
        SQLiteStore(path)
    assert rows(path, "SELECT name FROM sqlite_master WHERE name = 'half'") == []
    assert rows(path, "SELECT name FROM _chatchain_migrations ORDER BY rowid") == [
        (name,) for name in SHIPPED
    ]


def test_window_loads_and_counts_do_not_read_the_whole_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Count the SQLite VM steps each call takes: a scan of the session would grow with it.
    steps = [0]

    def counting(self: SQLiteStore) -> sqlite3.Connection:
        conn = open_connection(self)

        def tick() -> int:
            steps[0] += 1
            return 0

        conn.set_progress_handler(tick, 10)
        return conn

    open_connection = SQLiteStore._open_connection
    monkeypatch.setattr(SQLiteStore, "_open_connection", counting)
    store = SQLiteStore(tmp_path / "chat.db")
    store.append("small", [HumanMessage(f"m{i}") for i in range(30)])
    store.append("big", [HumanMessage(f"m{i}") for i in range(20_000)])

    def cost(call: Callable[[str], object], session_id: str) -> int:
        steps[0] = 0
        call(session_id)
        return steps[0]

    calls: list[Callable[[str], object]] = [
        lambda sid: store.load(sid, -20),
        lambda sid: store.load(sid, 5, 25),
        store.count,
        store.info,
    ]
    for call in calls:
        small, big = cost(call, "small"), cost(call, "big")
        assert big <= 2 * small + 5, (small, big)
    assert [m.content for m in store.load("big", -2)] == ["m19998", "m19999"]
    store.close()


# -- the usage ledger ----------------------------------------------------------------------------

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def in_a_minute(session_id: str, tokens: int, user_id: str | None = None) -> BudgetHold:
    return BudgetHold(
        session_id, tokens, 0.0, datetime.now(UTC) + timedelta(minutes=1), user_id=user_id
    )


def test_the_ledger_survives_closing_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    store = SQLiteStore(path)
    entries = [
        UsageEntry(
            "a",
            "gpt-4o-mini",
            prompt_tokens=7,
            completion_tokens=3,
            total_tokens=10,
            cached_tokens=2,
            reasoning_tokens=1,
            requests=1,
            cost_usd=1.5e-5,
            price_source="genai-prices",
            latency_s=0.3,
            first_token_s=0.1,
            user_id="u",
            at=T0,
        ),
        # Unpriced, a summary, estimated, no user; recorded in another time zone.
        UsageEntry(
            "a",
            None,
            prompt_tokens=5,
            total_tokens=5,
            summary=True,
            estimated=True,
            at=datetime(2026, 1, 1, 14, 0, 1, 7, tzinfo=timezone(timedelta(hours=2))),
        ),
        UsageEntry("b", "m", total_tokens=4, cost_usd=0.1 + 0.2, user_id="u", at=T0 + timedelta(1)),
    ]
    held = in_a_minute("a", 50)
    assert store.hold_budget(held, []) is None
    for entry in entries:
        store.record_usage(entry)
    scopes: list[tuple[Scope, str]] = [
        ("session", "a"),
        ("session", "b"),
        ("user", "u"),
        ("all", ""),
    ]
    before = {scope: store.usage_total(*scope) for scope in scopes}
    store.close()

    store = SQLiteStore(path)
    listed = store.usage_entries()
    assert listed == entries
    assert all(e.at.utcoffset() == timedelta(0) for e in listed)  # aware, in UTC
    assert listed[2].cost_usd == 0.1 + 0.2  # floats exactly as recorded
    after = {scope: store.usage_total(*scope) for scope in scopes}
    assert after == before
    assert after[("all", "")] == replace(total_of(entries), model=None)
    assert after[("session", "a")].cost_usd is None and after[("session", "a")].unpriced == 1
    assert after[("user", "u")].cost_usd == 1.5e-5 + (0.1 + 0.2)
    # The hold was kept in the file too: it still counts against the session.
    refusal = store.hold_budget(in_a_minute("a", 1), [BudgetLimit("session", "a", max_tokens=65)])
    assert refusal is not None and (refusal.spent_tokens, refusal.held_tokens) == (15, 50)
    store.close()


def test_a_file_of_the_schema_before_the_ledger_is_migrated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "chat.db"
    with monkeypatch.context() as patch:  # the release before the ledger
        patch.setattr(_migrations, "MIGRATIONS", _migrations.MIGRATIONS[:1])
        old = SQLiteStore(path)
        old.append("s", [HumanMessage("before the ledger")])
        old.set_summary("s", Summary("a summary", 1))
        old.close()
    assert rows(path, "SELECT name FROM _chatchain_migrations") == [("m001_initial",)]
    assert rows(path, "SELECT name FROM sqlite_master WHERE name = 'usage'") == []

    store = SQLiteStore(path)
    assert [m.content for m in store.load("s")] == ["before the ledger"]
    assert store.get_summary("s") == Summary("a summary", 1)
    assert store.usage_total("all", "") == Usage()
    entry = UsageEntry("s", "m", total_tokens=3, cost_usd=0.001, at=T0)
    store.record_usage(entry)
    assert store.usage_entries(session_id="s") == [entry]
    assert store.usage_total("session", "s").total_tokens == 3
    store.close()
    names = rows(path, "SELECT name FROM _chatchain_migrations ORDER BY rowid")
    assert names == [(name,) for name in SHIPPED]


def test_a_ledger_before_day_sums_gets_them_for_its_entries(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    day = datetime(2026, 1, 31, tzinfo=UTC)
    entries = [
        UsageEntry("a", "m", total_tokens=3, cost_usd=0.5, user_id="u", at=day),
        UsageEntry(
            "a", "m", total_tokens=4, cost_usd=None, user_id="u", at=day + timedelta(hours=23)
        ),
        UsageEntry("b", "m", total_tokens=5, cost_usd=0.25, at=day - timedelta(microseconds=1)),
    ]
    old = SQLiteStore(path)
    for entry in entries:
        old.record_usage(entry)
    old.close()
    conn = sqlite3.connect(path)  # back to the file the release before m006 wrote
    with conn:
        conn.execute("DROP TABLE usage_days")
        conn.execute("DELETE FROM _chatchain_migrations WHERE name = 'm006_usage_days'")
    conn.close()
    SQLiteStore(path).close()
    assert sorted(rows(path, "SELECT * FROM usage_days")) == [
        ("all", "", "2026-01-30", 5, 0.25),
        ("all", "", "2026-01-31", 7, 0.5),
        ("session", "a", "2026-01-31", 7, 0.5),
        ("session", "b", "2026-01-30", 5, 0.25),
        ("user", "u", "2026-01-31", 7, 0.5),
    ]


def test_totals_of_a_ledger_before_estimated_totals_count_its_estimates(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    entries = [
        UsageEntry("a", "m", total_tokens=3, estimated=True, user_id="u", at=T0),
        UsageEntry("a", "m", total_tokens=4, at=T0),
        UsageEntry("b", "m", total_tokens=5, estimated=True, at=T0),
    ]
    old = SQLiteStore(path)
    for entry in entries:
        old.record_usage(entry)
    old.close()
    conn = sqlite3.connect(path)  # back to the file the release before m003 wrote
    with conn:
        conn.execute("ALTER TABLE usage_totals DROP COLUMN estimated")
        conn.execute("DELETE FROM _chatchain_migrations WHERE name = 'm003_estimated_totals'")
    conn.close()

    store = SQLiteStore(path)
    counts = {
        (scope, key): store.usage_total(scope, key).estimated
        for scope, key in [("all", ""), ("session", "a"), ("session", "b"), ("user", "u")]
    }
    assert counts == {("all", ""): 2, ("session", "a"): 1, ("session", "b"): 1, ("user", "u"): 1}
    store.record_usage(UsageEntry("b", "m", total_tokens=1, estimated=True, at=T0))
    assert store.usage_total("all", "") == replace(total_of(store.usage_entries()), model=None)
    store.close()


def test_a_ledger_before_cached_turns_reads_as_no_hits_and_takes_them(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    old = SQLiteStore(path)
    before = UsageEntry("a", "m", total_tokens=3, requests=1, cost_usd=1e-6, user_id="u", at=T0)
    old.record_usage(before)
    old.close()
    conn = sqlite3.connect(path)  # back to the file the release before m004 wrote
    with conn:
        dropped = ["usage.cached", "usage.saved_usd", "usage_totals.cached_turns"]
        for table, column in (name.split(".") for name in [*dropped, "usage_totals.saved_usd"]):
            conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        conn.execute("DELETE FROM _chatchain_migrations WHERE name = 'm004_cached_turns'")
    conn.close()

    store = SQLiteStore(path)
    assert store.usage_entries() == [before]
    hit = UsageEntry("a", "m", cost_usd=0.0, cached=True, saved_usd=2e-6, user_id="u", at=T0)
    store.record_usage(hit)
    assert store.usage_entries() == [before, hit]
    total = store.usage_total("user", "u")
    assert (total.turns, total.cached_turns, total.saved_usd) == (2, 1, 2e-6)
    assert store.usage_total("all", "") == replace(total_of(store.usage_entries()), model=None)
    store.close()


def test_a_failed_record_keeps_nothing_and_not_even_drops_the_hold(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "chat.db")
    limit = BudgetLimit("session", "s", max_tokens=100)
    held = in_a_minute("s", 60)
    assert store.hold_budget(held, [limit]) is None
    # Fault injection: cap the file at its current size on the (only) pooled connection; the
    # hold's DELETE fits, the entry (with overflow pages) does not.
    (conn,) = store._idle
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    entry = UsageEntry("s", "m" * 50_000, total_tokens=30, cost_usd=0.0, at=T0)
    with pytest.raises(StoreError, match="disk is full") as caught:
        store.record_usage(entry, release=held.id)
    assert str(store.path) in str(caught.value)
    assert store.usage_entries() == []
    assert store.usage_total("session", "s") == Usage()
    assert store.hold_budget(in_a_minute("s", 41), [limit]) is not None  # 60 still held
    # The failed connection was dropped; recording again works, and replaces the hold.
    store.record_usage(replace(entry, model="m"), release=held.id)
    assert store.usage_total("session", "s").total_tokens == 30
    assert store.hold_budget(in_a_minute("s", 70), [limit]) is None
    store.close()


def test_totals_do_not_read_the_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = [0]

    def counting(self: SQLiteStore) -> sqlite3.Connection:
        conn = open_connection(self)

        def tick() -> int:
            steps[0] += 1
            return 0

        conn.set_progress_handler(tick, 10)
        return conn

    open_connection = SQLiteStore._open_connection
    monkeypatch.setattr(SQLiteStore, "_open_connection", counting)
    store = SQLiteStore(tmp_path / "chat.db")
    for i in range(600):
        session = "small" if i % 100 == 0 else "big"
        store.record_usage(UsageEntry(session, "m", total_tokens=1, user_id=session, at=T0))

    def cost(scope: Scope, key: str) -> int:
        steps[0] = 0
        store.usage_total(scope, key)
        return steps[0]

    small = cost("session", "small")
    others: list[tuple[Scope, str]] = [("session", "big"), ("user", "big"), ("all", "")]
    for scope, key in others:
        assert cost(scope, key) <= 2 * small + 5, (scope, small)
    assert store.usage_total("session", "big").turns == 594
    assert store.usage_total("all", "").turns == 600
    store.close()


# -- the file ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///chat.db", "chat.db"),
        ("sqlite:///data/chat.db", "data/chat.db"),
        ("sqlite:////var/lib/chat.db", "/var/lib/chat.db"),
        ("SQLITE:///chat.db", "chat.db"),
        ("sqlite:///~/chat.db", "{home}/chat.db"),
    ],
)
def test_urls_follow_sqlalchemy(
    url: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _path_from_url(url) == Path(expected.format(home=tmp_path))


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///",
        "sqlite:///:memory:",
        "sqlite://host/chat.db",
        "sqlite:///x.db?mode=ro",
    ],
)
def test_urls_that_name_no_file_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="sqlite:///"):
        open_store(url)


def test_file_is_created_with_its_folder_readable_by_its_owner_only() -> None:
    old = os.umask(0)  # even when the process would create files world-writable
    try:
        store = open_store("sqlite:///data/chat.db")  # relative to the working directory
        store.append("s", [HumanMessage("secret")])
        path = Path.cwd() / "data" / "chat.db"
        for name in ("chat.db", "chat.db-wal", "chat.db-shm"):
            assert stat.S_IMODE((path.parent / name).stat().st_mode) == 0o600, name
        assert rows(path, "PRAGMA journal_mode") == [("wal",)]
        store.close()
    finally:
        os.umask(old)


def test_a_corrupted_file_gives_a_store_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    path.write_bytes(b"this is not a database, just some text\n" * 200)
    with pytest.raises(StoreError, match="not a SQLite database or is damaged") as caught:
        SQLiteStore(path)
    assert str(path) in str(caught.value)
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)


def test_a_full_disk_stores_nothing_and_the_store_recovers(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "chat.db")
    store.append("s", [HumanMessage("before")])
    # Fault injection: cap the file at its current size on the (only) pooled connection.
    (conn,) = store._idle
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StoreError, match="disk is full") as caught:
        store.append("s", [HumanMessage("x" * 2000) for _ in range(100)])
    assert str(store.path) in str(caught.value)
    assert store.count("s") == 1  # all or none
    assert [m.content for m in store.load("s")] == ["before"]
    store.append("s", [HumanMessage("after")])  # the failed connection was dropped
    assert [m.content for m in store.load("s")] == ["before", "after"]
    store.close()


def test_a_file_locked_past_the_busy_timeout_gives_a_store_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_sqlite._connection, "_BUSY_TIMEOUT_S", 0.1)
    store = SQLiteStore(tmp_path / "chat.db")
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writing, and stuck
    with pytest.raises(StoreError, match=r"locked.*check for a stuck process"):
        store.append("s", [HumanMessage("hi")])
    other.execute("ROLLBACK")
    other.close()
    store.append("s", [HumanMessage("hi")])
    assert store.count("s") == 1
    store.close()


def test_a_closed_store_says_so(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "chat.db")
    store.close()
    store.close()
    with pytest.raises(StoreError, match="is closed"):
        store.count("s")


# -- several processes ---------------------------------------------------------------------------


def _writer(url: str, name: str, turns: int, start: SyncEvent) -> None:
    store = open_store(url, lock_timeout=30.0)
    start.wait(30)
    for i in range(turns):
        store.append("a" if i % 2 else "b", [HumanMessage(f"{name}-{i}")])
        with store.lock("turns"):  # read, then write: only safe if one process at a time
            n = store.count("turns")
            time.sleep(0.003)  # the model answering
            store.append("turns", [HumanMessage(str(n))])
    store.close()


@pytest.mark.slow  # processes
def test_two_processes_on_one_file_lose_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'chat.db'}"
    open_store(url).close()  # migrate once, so the workers start writing at once
    start = spawn.Event()
    workers = [spawn.Process(target=_writer, args=(url, name, 40, start)) for name in "xy"]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    store = open_store(url)
    for sid, parity in (("a", 1), ("b", 0)):
        contents = [str(m.content) for m in store.load(sid)]
        for name in "xy":
            assert [c for c in contents if c.startswith(name)] == [
                f"{name}-{i}" for i in range(40) if i % 2 == parity
            ]
        assert store.count(sid) == len(contents) == 40
    # Each locked turn saw the one before it, whichever process ran it.
    assert [m.content for m in store.load("turns")] == [str(n) for n in range(80)]
    store.close()


def _lock_and_die(path: Path, locked: SyncEvent) -> None:
    store = SQLiteStore(path, lease=1.0)
    lock = store.lock("s")  # kept referenced: collecting it would release the lock
    lock.__enter__()
    locked.set()
    os._exit(0)  # no release, no close: as if killed


@pytest.mark.slow  # a process, and a lease running out
def test_a_dead_holders_lease_expires(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    SQLiteStore(path).close()
    locked = spawn.Event()
    holder = spawn.Process(target=_lock_and_die, args=(path, locked))
    holder.start()
    assert locked.wait(30)
    holder.join(30)
    assert lease_holders(path) == [holder.pid]

    impatient = SQLiteStore(path, lock_timeout=0.2)
    with pytest.raises(SessionBusyError, match="busy"), impatient.lock("s"):
        pass  # the dead holder's lease still counts
    impatient.close()

    store = SQLiteStore(path, lock_timeout=5.0)
    began = time.monotonic()
    with store.lock("s"):
        waited = time.monotonic() - began
        assert lease_holders(path) == [os.getpid()]
    assert waited < 3.0  # the lease's 1 s, not the 5 s timeout
    assert lease_holders(path) == []  # released
    store.close()


@pytest.mark.slow  # waits past a lease
def test_a_live_holder_keeps_its_lease_beyond_its_length(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    holder = SQLiteStore(path, lease=0.5)  # renewed every 1/6 s while held
    other = SQLiteStore(path, lock_timeout=1.5)  # another process, as far as locks go
    inside, release = threading.Event(), threading.Event()

    def long_turn() -> None:
        with holder.lock("s"):
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=long_turn)
    thread.start()
    assert inside.wait(2)
    try:
        with pytest.raises(SessionBusyError), other.lock("s"):
            pass
        with other.lock("t"):  # other sessions are free meanwhile
            pass
    finally:
        release.set()
        thread.join()
    with other.lock("s"):
        pass
    holder.close()
    other.close()


def test_a_cancelled_async_wait_gives_back_the_lease_it_was_taking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "chat.db"
    slow = SQLiteStore(path, lock_timeout=5.0)
    take = slow._take_lease

    def slow_take(session_id: str, owner: str) -> bool:
        time.sleep(0.3)  # the task is cancelled while this thread is taking the lease
        return take(session_id, owner)

    monkeypatch.setattr(slow, "_take_lease", slow_take)

    async def cancelled_turn() -> None:
        task = asyncio.create_task(slow.alock("s").__aenter__())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled_turn())
    other = SQLiteStore(path, lock_timeout=2.0)
    with other.lock("s"):
        pass
    other.close()
    slow.close()


def _take_holds(url: str, attempts: int, start: SyncEvent) -> None:
    store = open_store(url, lock_timeout=30.0)
    limit = BudgetLimit("all", "", max_tokens=100)
    start.wait(30)
    for i in range(attempts):
        store.hold_budget(in_a_minute(f"{os.getpid()}-{i}", 10), [limit])
    store.close()


@pytest.mark.slow  # processes
def test_holds_from_several_processes_cannot_overspend(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'chat.db'}"
    open_store(url).close()
    start = spawn.Event()
    workers = [spawn.Process(target=_take_holds, args=(url, 15, start)) for _ in range(4)]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    # 60 attempts at 10 tokens under a cap of 100: exactly ten kept, whoever won them.
    assert rows(tmp_path / "chat.db", "SELECT count(*), sum(tokens) FROM budget_holds") == [
        (10, 100)
    ]


@pytest.mark.parametrize(
    ("scope", "index"),
    [("user", "usage_by_user"), ("session", "usage_by_session"), ("all", "usage_by_at")],
)
def test_part_of_a_day_reads_a_range_of_an_index(tmp_path: Path, scope: Scope, index: str) -> None:
    SQLiteStore(tmp_path / "chat.db").close()
    start = datetime(2026, 1, 1, 6, tzinfo=UTC)
    sql, params = _sqlite._part_query(scope, "u", start, start + timedelta(hours=18))
    conn = sqlite3.connect(tmp_path / "chat.db")
    try:
        plan = " ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
    finally:
        conn.close()
    assert f"SEARCH usage USING INDEX {index}" in plan and "SCAN" not in plan
