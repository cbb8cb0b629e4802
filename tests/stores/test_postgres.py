"""What only the PostgreSQL store does: migrations, advisory locks, pools, outages."""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from multiprocessing.synchronize import Barrier, Event

import psycopg
import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

from chatchain.budgets import BudgetHold, BudgetLimit
from chatchain.errors import ConfigurationError, SessionBusyError, StoreError
from chatchain.stores import Summary, _postgres, open_store
from chatchain.stores._postgres import _MIGRATIONS, PostgresStore
from chatchain.testing import PostgresCluster
from chatchain.testing._stores import free_port
from chatchain.usage import Scope, UsageEntry, total_of

spawn = multiprocessing.get_context("spawn")


def conversation(n: int) -> list[BaseMessage]:
    return [HumanMessage(f"q{i}") if i % 2 == 0 else AIMessage(f"a{i}") for i in range(n)]


@pytest.fixture
def prefix(postgres_url: str) -> Iterator[str]:
    """A table prefix of this test's own, whose tables are dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    yield name
    tables = ["messages", "sessions", "migrations", "usage", "usage_totals", "budget_holds"]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {', '.join(f'{name}_{t}' for t in tables)}")


def applied_migrations(url: str, prefix: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [
            name for (name,) in conn.execute(f"SELECT name FROM {prefix}_migrations ORDER BY name")
        ]


# -- schema --------------------------------------------------------------------------------


def test_reopening_applies_no_migration_twice_and_keeps_the_data(
    postgres_url: str, prefix: str
) -> None:
    first = PostgresStore(postgres_url, table_prefix=prefix)
    first.append("s", conversation(3))
    first.close()
    again = PostgresStore(postgres_url, table_prefix=prefix)
    try:
        assert applied_migrations(postgres_url, prefix) == [name for name, _ in _MIGRATIONS]
        assert [m.content for m in again.load("s")] == ["q0", "a1", "q2"]
    finally:
        again.close()


def _ledger_entries() -> list[UsageEntry]:
    t0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    return [
        UsageEntry("s", "m", 6, 4, 10, 1, 2, 1, 1e-5, "settings", 0.5, 0.125, user_id="u", at=t0),
        UsageEntry("s", None, 3, 0, 3, requests=1, summary=True, estimated=True, at=t0),
        UsageEntry("t", "m", total_tokens=7, cost_usd=0.1 + 0.2, at=t0 + timedelta(hours=1)),
    ]


def test_the_ledger_survives_a_new_store_object(postgres_url: str, prefix: str) -> None:
    entries = _ledger_entries()
    hold = BudgetHold("s", 50, 0.0, datetime.now(UTC) + timedelta(minutes=5))
    limit = BudgetLimit("all", "", max_tokens=100)
    first = PostgresStore(postgres_url, table_prefix=prefix)
    try:
        for entry in entries:
            first.record_usage(entry)
        assert first.hold_budget(hold, [limit]) is None
        scopes: list[tuple[Scope, str]] = [("all", ""), ("session", "s"), ("user", "u")]
        totals = [first.usage_total(*scope) for scope in scopes]
    finally:
        first.close()
    again = PostgresStore(postgres_url, table_prefix=prefix)
    try:
        assert again.usage_entries() == entries
        assert [again.usage_total(*scope) for scope in scopes] == totals
        assert again.usage_total("all", "") == replace(total_of(entries), model=None)
        assert again.usage_total("session", "s").cost_usd is None  # one unpriced entry
        assert again.usage_total("user", "u").cost_usd == 1e-5
        assert again.usage_total("session", "t").cost_usd == 0.1 + 0.2  # floats kept exactly
        # The hold is in the database too: 20 spent + 50 held leaves room for 30.
        assert again.hold_budget(replace(hold, id="h2", tokens=31), [limit]) is not None
        assert again.hold_budget(replace(hold, id="h3", tokens=30), [limit]) is None
        again.record_usage(entries[0])  # already recorded: changes nothing
        assert again.usage_total("all", "").total_tokens == 20
    finally:
        again.close()


def test_a_database_of_the_previous_schema_gets_the_ledger(
    postgres_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:  # a store as the release before the ledger made it
        patch.setattr(_postgres._sql, "_MIGRATIONS", _MIGRATIONS[:1])
        old = PostgresStore(postgres_url, table_prefix=prefix)
        old.append("s", conversation(2))
        old.close()
    assert applied_migrations(postgres_url, prefix) == ["0001_sessions_and_messages"]
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT to_regclass(%s)", (f"{prefix}_usage",)).fetchone() == (None,)
    store = PostgresStore(postgres_url, table_prefix=prefix)
    try:
        assert applied_migrations(postgres_url, prefix) == [
            "0001_sessions_and_messages",
            "0002_usage_ledger",
            "0003_estimated_totals",
            "0004_cached_turns",
            "0005_users",
            "0006_usage_days",
            "0007_sessions_by_id",
            "0008_pending_turns",
            "0009_session_titles",
            "0010_throttle",
        ]
        assert [m.content for m in store.load("s")] == ["q0", "a1"]  # the data survives
        entries = _ledger_entries()
        for entry in entries:
            store.record_usage(entry)
        assert store.usage_entries(session_id="s") == entries[:2]
        assert store.usage_total("session", "s").total_tokens == 13
    finally:
        store.close()


SCOPES: list[tuple[Scope, str]] = [("all", ""), ("session", "s"), ("session", "t"), ("user", "u")]


def test_a_ledger_before_day_sums_gets_them_for_its_entries(postgres_url: str, prefix: str) -> None:
    day = datetime(2026, 1, 31, tzinfo=UTC)
    entries = [
        UsageEntry("a", "m", total_tokens=3, cost_usd=0.5, user_id="u", at=day),
        UsageEntry(
            "a", "m", total_tokens=4, cost_usd=None, user_id="u", at=day + timedelta(hours=23)
        ),
        UsageEntry("b", "m", total_tokens=5, cost_usd=0.25, at=day - timedelta(microseconds=1)),
    ]
    old = PostgresStore(postgres_url, table_prefix=prefix)
    for entry in entries:
        old.record_usage(entry)
    old.close()
    with psycopg.connect(postgres_url) as conn:  # back to the release before 0006
        conn.execute(f"DROP TABLE {prefix}_usage_days")
        conn.execute(f"DELETE FROM {prefix}_migrations WHERE name = '0006_usage_days'")
    PostgresStore(postgres_url, table_prefix=prefix).close()
    with psycopg.connect(postgres_url) as conn:
        found = conn.execute(
            f"SELECT scope, key, day::text, total_tokens, cost_usd FROM {prefix}_usage_days"
        ).fetchall()
    assert sorted(found) == [
        ("all", "", "2026-01-30", 5, 0.25),
        ("all", "", "2026-01-31", 7, 0.5),
        ("session", "a", "2026-01-31", 7, 0.5),
        ("session", "b", "2026-01-30", 5, 0.25),
        ("user", "u", "2026-01-31", 7, 0.5),
    ]


def test_totals_of_a_ledger_before_estimated_totals_count_its_estimates(
    postgres_url: str, prefix: str
) -> None:
    old = PostgresStore(postgres_url, table_prefix=prefix)
    for entry in _ledger_entries():  # one estimated entry, of session "s"
        old.record_usage(entry)
    old.close()
    with psycopg.connect(postgres_url) as conn:  # back to the release before 0003
        conn.execute(f"ALTER TABLE {prefix}_usage_totals DROP COLUMN estimated")
        conn.execute(f"DELETE FROM {prefix}_migrations WHERE name = '0003_estimated_totals'")
    store = PostgresStore(postgres_url, table_prefix=prefix)
    try:
        assert "0003_estimated_totals" in applied_migrations(postgres_url, prefix)
        counts = [store.usage_total(scope, key).estimated for scope, key in SCOPES]
        assert counts == [1, 1, 0, 0]
    finally:
        store.close()


def test_a_ledger_before_cached_turns_reads_as_no_hits_and_takes_them(
    postgres_url: str, prefix: str
) -> None:
    old = PostgresStore(postgres_url, table_prefix=prefix)
    entries = _ledger_entries()
    for entry in entries:
        old.record_usage(entry)
    old.close()
    with psycopg.connect(postgres_url) as conn:  # back to the release before 0004
        conn.execute(f"ALTER TABLE {prefix}_usage DROP COLUMN cached, DROP COLUMN saved_usd")
        conn.execute(
            f"ALTER TABLE {prefix}_usage_totals DROP COLUMN cached_turns, DROP COLUMN saved_usd"
        )
        conn.execute(f"DELETE FROM {prefix}_migrations WHERE name = '0004_cached_turns'")
    store = PostgresStore(postgres_url, table_prefix=prefix)
    try:
        assert "0004_cached_turns" in applied_migrations(postgres_url, prefix)
        assert store.usage_entries() == entries
        hit = replace(entries[0], id="hit", total_tokens=0, cached=True, saved_usd=2e-6)
        store.record_usage(hit)
        total = store.usage_total("session", hit.session_id)
        assert (total.cached_turns, total.saved_usd) == (1, 2e-6)
        assert store.usage_total("all", "") == replace(total_of(store.usage_entries()), model=None)
    finally:
        store.close()


def test_entries_of_the_same_moment_are_listed_in_recording_order(
    postgres_url: str, prefix: str
) -> None:
    store = PostgresStore(postgres_url, table_prefix=prefix)
    try:
        at = datetime(2026, 1, 1, tzinfo=UTC)
        entries = [UsageEntry("s", total_tokens=i, at=at, id=f"{9 - i}") for i in range(10)]
        for entry in entries:
            store.record_usage(entry)
        assert store.usage_entries() == entries
        naive = datetime(2026, 1, 1)  # naive times mean UTC, as they do for prune
        assert store.usage_entries(since=naive) == entries
        assert store.usage_entries(until=naive) == []
    finally:
        store.close()


def _hold_many(
    url: str, prefix: str, barrier: Barrier, worker: int, kept: multiprocessing.Queue[int]
) -> None:
    store = PostgresStore(url, table_prefix=prefix)
    try:
        barrier.wait(60)
        limit = BudgetLimit("all", "", max_tokens=100)
        mine = 0
        for j in range(10):
            hold = BudgetHold(f"p{worker}-{j}", 10, 0.0, datetime.now(UTC) + timedelta(minutes=5))
            if store.hold_budget(hold, [limit]) is None:
                mine += 1
                # Half the kept holds turn into spending at once, as finished turns do.
                if j % 2 == 0:
                    entry = UsageEntry(hold.session_id, total_tokens=10, cost_usd=0.0)
                    store.record_usage(entry, release=hold.id)
        kept.put(mine)
    finally:
        store.close()


def test_holds_of_many_processes_cannot_overspend(postgres_url: str, prefix: str) -> None:
    barrier = spawn.Barrier(4)
    kept: multiprocessing.Queue[int] = spawn.Queue()
    processes = [
        spawn.Process(target=_hold_many, args=(postgres_url, prefix, barrier, w, kept))
        for w in range(4)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    assert sum(kept.get(timeout=5) for _ in processes) == 10
    store = PostgresStore(postgres_url, table_prefix=prefix)
    try:
        # Each worker's kept holds are its first ones, so some turned into spending and
        # some are still held: 100 tokens in all, and not one more.
        assert 0 < store.usage_total("all", "").total_tokens < 100
        one_more = BudgetHold("x", 1, 0.0, datetime.now(UTC) + timedelta(minutes=1))
        assert store.hold_budget(one_more, [BudgetLimit("all", "", max_tokens=100)]) is not None
    finally:
        store.close()
    with psycopg.connect(postgres_url) as conn:  # the budget lock ended with its transactions
        assert conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
        ).fetchone() == (0,)


def test_ledger_calls_on_a_closed_store_raise_store_error(postgres_store: PostgresStore) -> None:
    postgres_store.close()
    hold = BudgetHold("s", 1, 0.0, datetime.now(UTC))
    with pytest.raises(StoreError, match="closed"):
        postgres_store.record_usage(UsageEntry("s"))
    with pytest.raises(StoreError, match="closed"):
        postgres_store.usage_total("all", "")
    with pytest.raises(StoreError, match="closed"):
        postgres_store.hold_budget(hold, [])
    with pytest.raises(StoreError, match="closed"):
        asyncio.run(postgres_store.ahold_budget(hold, []))
    with pytest.raises(StoreError, match="closed"):
        asyncio.run(postgres_store.arecord_usage(UsageEntry("s")))


def _open_together(url: str, prefix: str, barrier: Barrier, sid: str) -> None:
    barrier.wait(60)  # every process opens the brand-new store at the same moment
    store = PostgresStore(url, table_prefix=prefix)
    try:
        store.append(sid, [HumanMessage(sid)])
    finally:
        store.close()


def test_processes_opening_a_new_store_at_once_migrate_it_once(
    postgres_url: str, prefix: str
) -> None:
    barrier = spawn.Barrier(4)
    processes = [
        spawn.Process(target=_open_together, args=(postgres_url, prefix, barrier, f"p{i}"))
        for i in range(4)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    assert applied_migrations(postgres_url, prefix) == [name for name, _ in _MIGRATIONS]
    store = PostgresStore(postgres_url, table_prefix=prefix)
    try:
        assert sorted(store.sessions()) == ["p0", "p1", "p2", "p3"]
    finally:
        store.close()


def test_unusable_arguments_are_refused(postgres_url: str) -> None:
    for bad in ["Chat", "chat-1", "x; DROP TABLE y", "", "9lives", "a" * 41]:
        with pytest.raises(ConfigurationError, match="table prefix"):
            PostgresStore(postgres_url, table_prefix=bad)
    with pytest.raises(ConfigurationError, match="max_size >= 2"):
        PostgresStore(postgres_url, max_size=1)
    with pytest.raises(ConfigurationError, match="malformed") as caught:
        PostgresStore("postgresql://chat:hunter2-secret@[oops/chatdb")
    assert "hunter2-secret" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.parametrize("timeout", ["abc", "2.5", "-1", "ten"])
def test_an_unusable_connect_timeout_is_a_configuration_error(timeout: str) -> None:
    # Refused while reading the URL, before any connection: no server needed.
    url = f"postgresql://chat:hunter2-secret@127.0.0.1:1/chatdb?connect_timeout={timeout}"
    with pytest.raises(ConfigurationError, match="connect_timeout") as caught:
        PostgresStore(url)
    assert "CHATCHAIN_STORE" in str(caught.value)
    assert "hunter2-secret" not in str(caught.value)
    with pytest.raises(ConfigurationError, match="connect_timeout"):
        open_store(url)


# -- one writer per session across processes -------------------------------------------------


def _lock_until_killed(url: str, locked: Event) -> None:
    store = open_store(url)
    with store.lock("held"):
        locked.set()
        time.sleep(120)


def test_a_lock_is_freed_when_the_process_holding_it_dies(
    postgres_store: PostgresStore, postgres_url: str
) -> None:
    locked = spawn.Event()
    holder = spawn.Process(target=_lock_until_killed, args=(postgres_url, locked))
    holder.start()
    try:
        assert locked.wait(60)
        with pytest.raises(SessionBusyError, match="another process"), postgres_store.lock("held"):
            pass  # the other process has it
        with postgres_store.lock("free"):  # other sessions go on meanwhile
            pass
    finally:
        holder.kill()  # SIGKILL: no chance to unlock or close anything
        holder.join(30)
    patient = PostgresStore(postgres_url, lock_timeout=10.0)
    try:
        began = time.monotonic()
        with patient.lock("held"):
            assert time.monotonic() - began < 5  # freed with the dead process's connection
    finally:
        patient.close()


def test_a_cancelled_wait_leaves_no_lock_behind(
    postgres_store: PostgresStore, postgres_url: str
) -> None:
    other = PostgresStore(postgres_url, lock_timeout=30.0)  # its own in-process locks: waits in SQL

    async def wait_then_cancel() -> None:
        waiter = asyncio.create_task(enter_and_leave())
        await asyncio.sleep(0.3)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    async def enter_and_leave() -> None:
        async with other.alock("s"):
            pass

    try:
        with postgres_store.lock("s"):
            asyncio.run(wait_then_cancel())
        began = time.monotonic()
        asyncio.run(enter_and_leave())
        assert time.monotonic() - began < 5
        with psycopg.connect(postgres_url) as conn:
            assert conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            ).fetchone() == (0,)
    finally:
        other.close()


def test_sync_and_async_turns_of_two_stores_exclude_each_other(
    postgres_store: PostgresStore, postgres_url: str
) -> None:
    other = PostgresStore(postgres_url, lock_timeout=0.5)

    async def try_async() -> None:
        with pytest.raises(SessionBusyError, match="busy"):
            async with other.alock("s"):
                pass

    try:
        with postgres_store.lock("s"):
            asyncio.run(try_async())
            with pytest.raises(SessionBusyError, match="busy"), other.lock("s"):
                pass
        asyncio.run(other.alock("s").__aenter__())  # a turn whose loop ended inside it ...
        with postgres_store.lock("s"):  # ... let go when that loop shut down
            pass
    finally:
        other.close()


def test_two_connections_serve_one_turn_and_a_second_turn_waits(
    postgres_url: str, prefix: str
) -> None:
    store = PostgresStore(
        postgres_url, table_prefix=prefix, lock_timeout=0.5, min_size=0, max_size=2
    )
    inside, leave = threading.Event(), threading.Event()

    def turn() -> None:
        with store.lock("a"):
            store.append("a", conversation(2))  # the lock holds one connection, this the other
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=turn)
    thread.start()
    try:
        assert inside.wait(10)
        with pytest.raises(SessionBusyError, match="max_size"), store.lock("b"):
            pass  # a second lock would leave no connection for reads and writes
        assert store.load("a", -1)[0].content == "a1"  # which still find one
        leave.set()
        thread.join()
        with store.lock("b"):
            pass
    finally:
        leave.set()
        thread.join()
        store.close()


# -- reads -----------------------------------------------------------------------------------


def test_the_last_messages_of_a_long_session_cost_as_much_as_of_a_short_one(
    postgres_store: PostgresStore,
) -> None:
    postgres_store.append("short", conversation(20))
    for _ in range(4):
        postgres_store.append("long", [HumanMessage("x" * 200)] * 5_000)
    postgres_store.append("long", conversation(20))

    def median_s(work: Callable[[], object]) -> float:
        times = []
        for _ in range(25):
            began = time.perf_counter()
            work()
            times.append(time.perf_counter() - began)
        return statistics.median(times)

    assert [m.content for m in postgres_store.load("long", -20)] == [
        m.content for m in conversation(20)
    ]
    short = median_s(lambda: postgres_store.load("short", -20))
    long = median_s(lambda: postgres_store.load("long", -20))
    assert long < 3 * short + 0.001, (short, long)  # reading the 20,020 would take ~100x
    short = median_s(lambda: postgres_store.count("short"))
    long = median_s(lambda: postgres_store.count("long"))
    assert long < 3 * short + 0.001, (short, long)  # counting rows would take ~10x


def test_async_calls_work_from_many_event_loops_and_threads(postgres_store: PostgresStore) -> None:
    async def turn(sid: str, n: int) -> None:
        async with postgres_store.alock(sid):
            await postgres_store.aappend(sid, [HumanMessage(f"{sid}-{n}")])
            assert (await postgres_store.aload(sid, -1))[0].content == f"{sid}-{n}"

    for n in range(3):  # a new event loop each time
        asyncio.run(turn("s", n))
    threads = [threading.Thread(target=lambda i=i: asyncio.run(turn(f"t{i}", 0))) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert postgres_store.count("s") == 3
    assert sorted(postgres_store.sessions()) == ["s", "t0", "t1", "t2"]
    postgres_store.close()
    assert not any(t.name == "chatchain-postgres" for t in threading.enumerate())
    with pytest.raises(StoreError, match="closed"):
        asyncio.run(postgres_store.acount("s"))
    with pytest.raises(StoreError, match="closed"):
        postgres_store.count("s")


# -- failures --------------------------------------------------------------------------------


def test_an_unreachable_server_gives_a_store_error_without_the_password() -> None:
    url = f"postgresql://chat:hunter2-secret@127.0.0.1:{free_port()}/chatdb?connect_timeout=2"
    with pytest.raises(StoreError) as caught:
        PostgresStore(url)
    message = str(caught.value)
    assert "127.0.0.1" in message and "chatdb" in message and "server is up" in message
    assert "hunter2-secret" not in message
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)


@pytest.fixture
def own_cluster() -> Iterator[PostgresCluster]:
    """A cluster of this test's own, to stop and start without disturbing the others."""
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.mark.services  # starts a server of its own
def test_the_server_stopping_mid_turn_writes_nothing_and_service_resumes(
    own_cluster: PostgresCluster,
) -> None:
    url = own_cluster.url.replace("chatchain@", "chatchain:pa55-word@") + "?connect_timeout=2"
    store = PostgresStore(url, lock_timeout=5.0)
    try:
        store.append("s", conversation(2))
        store.set_summary("s", Summary("hello", 1))
        before = [m.content for m in store.load("s")]

        # Park the append between its two statements: the session row is bumped, the
        # messages' insert waits for this table lock when the server goes down.
        admin = psycopg.connect(own_cluster.url)
        admin.execute("LOCK TABLE chatchain_messages IN EXCLUSIVE MODE")
        failures: list[BaseException] = []

        def turn() -> None:
            try:
                with store.lock("s"):
                    store.append("s", conversation(4))
            except BaseException as exc:
                failures.append(exc)

        thread = threading.Thread(target=turn)
        thread.start()
        deadline = time.monotonic() + 10
        while admin.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone() != (1,):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # Like a crash: a clean shutdown could let the waiting insert through and commit.
        own_cluster.stop("immediate")
        thread.join(10)
        admin.close()
        assert not thread.is_alive()

        assert len(failures) == 1 and isinstance(failures[0], StoreError), failures
        message = str(failures[0])
        assert f"127.0.0.1:{own_cluster.port}/chatchain_test" in message
        assert "pa55-word" not in message
        with pytest.raises(StoreError, match="server is up"):
            store.count("s")  # still down
        with pytest.raises(StoreError, match="server is up"):
            asyncio.run(store.acount("s"))

        own_cluster.start()
        deadline = time.monotonic() + 20
        while True:  # the pools reconnect on their own
            try:
                count = store.count("s")
                break
            except StoreError:
                assert time.monotonic() < deadline
        assert count == 2  # nothing of the failed append: neither rows nor count
        assert [m.content for m in store.load("s")] == before
        assert store.get_summary("s") == Summary("hello", 1)
        with store.lock("s"):
            store.append("s", [HumanMessage("back")])
        assert asyncio.run(store.aload("s", -1))[0].content == "back"
        assert store.count("s") == 3
    finally:
        store.close()
