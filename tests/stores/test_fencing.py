"""Writes fenced by the session lock, and turns saved in one atomic write, on real servers.

A turn whose lock was lost (its lease expired while the process or the store stalled, or
PostgreSQL dropped the connection that held it) and taken by another turn must not write
its messages: the store refuses them in the very write that records the turn's usage, which
is kept (the endpoint billed it). Each backend loses its lock the way it does in production:

- SQLite: the lease row expires and another process takes it over;
- Redis: the lock key expires (its TTL ran out) and another process sets it;
- PostgreSQL: the connection holding the advisory lock is killed (``pg_terminate_backend``).

The other turn runs on a second store object, as another process would.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import redis
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

from chatchain import Chatbot, SessionLockLostError, Settings
from chatchain.budgets import BudgetHold, BudgetLimit
from chatchain.stores import Fence, HistoryStore
from chatchain.stores._postgres import PostgresStore
from chatchain.stores._redis import RedisStore
from chatchain.stores._sqlite import SQLiteStore
from chatchain.testing import FakeChatModel
from chatchain.usage import UsageEntry

SID = "fenced ünï:*"
SHARED = ["sqlite", "redis", "postgres"]


class Backend:
    """A store, a second store on the same data (another process), and how a lock is lost."""

    def __init__(
        self,
        store: HistoryStore,
        other: HistoryStore,
        lose: Callable[[str], None],
    ) -> None:
        self.store = store
        self.other = other
        self.lose = lose


@pytest.fixture(params=SHARED)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    store: HistoryStore = request.getfixturevalue(f"{request.param}_store")
    if isinstance(store, SQLiteStore):
        other: HistoryStore = SQLiteStore(store.path, lock_timeout=10.0)

        def lose(session_id: str) -> None:
            # The lease ran out (its holder was paused past it); the next taker overwrites it.
            with sqlite3.connect(store.path) as conn:
                expired = conn.execute(
                    "UPDATE locks SET expires_at = 0 WHERE session_id = ?", (session_id,)
                )
                assert expired.rowcount == 1
            conn.close()

    elif isinstance(store, RedisStore):
        other = RedisStore(store.url, lock_timeout=10.0)

        def lose(session_id: str) -> None:
            key = store._key("lock", session_id)
            with redis.Redis.from_url(store.url) as client:  # the key's TTL ran out
                assert client.pexpire(key, 1)
                while client.exists(key):
                    pass  # gone within the millisecond

    else:
        assert isinstance(store, PostgresStore)
        url = request.getfixturevalue("postgres_url")
        other = PostgresStore(url, lock_timeout=10.0)

        def lose(session_id: str) -> None:
            # The connection holding the session's advisory lock dies (a network cut, a
            # failover, an administrator), and the lock with it.
            with psycopg.connect(url, autocommit=True) as conn:
                killed = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks"
                    " WHERE locktype = 'advisory' AND granted AND objsubid = 1"
                    " AND classid = ((hashtextextended(%(key)s, 0) >> 32) & 4294967295)::oid"
                    " AND objid = (hashtextextended(%(key)s, 0) & 4294967295)::oid",
                    {"key": store._lock_key(session_id)},
                ).fetchall()
                assert killed == [(True,)]

    yield Backend(store, other, lose)
    other.close()


def turn(tag: str) -> list[BaseMessage]:
    return [HumanMessage(f"{tag} asks"), AIMessage(f"{tag} answers")]


def entry(tag: str) -> UsageEntry:
    return UsageEntry(SID, "gpt-4o-mini", total_tokens=10, requests=1, cost_usd=1e-5, id=tag)


def held(store: HistoryStore, tokens: int) -> str:
    hold = BudgetHold(SID, tokens, 0.0, datetime.now(UTC) + timedelta(minutes=5))
    assert store.hold_budget(hold, []) is None
    return hold.id


def assert_no_hold(store: HistoryStore) -> None:
    probe = BudgetHold(SID, 100, 0.0, datetime.now(UTC) + timedelta(minutes=1))
    spent = store.usage_total("session", SID).total_tokens
    assert store.hold_budget(probe, [BudgetLimit("session", SID, max_tokens=spent + 100)]) is None
    store.release_budget(probe.id)


# -- the store operation -------------------------------------------------------------------------


def test_commit_turn_saves_the_turn_and_its_usage_and_ends_its_hold(store: HistoryStore) -> None:
    hold = held(store, 50)
    with store.lock(SID) as fence:
        store.commit_turn(SID, turn("a"), entry("a"), release=hold, fence=fence)
    assert [m.text for m in store.load(SID)] == ["a asks", "a answers"]
    assert [e.id for e in store.usage_entries(session_id=SID)] == ["a"]
    assert store.usage_total("session", SID).total_tokens == 10
    assert_no_hold(store)


def test_acommit_turn_saves_the_turn_and_its_usage(store: HistoryStore) -> None:
    async def main() -> None:
        hold = held(store, 50)
        async with store.alock(SID) as fence:
            await store.acommit_turn(SID, turn("a"), entry("a"), release=hold, fence=fence)
        await store.acommit_turn(SID, turn("b"))  # no entry, no fence: messages only

    asyncio.run(main())
    assert [m.text for m in store.load(SID)] == ["a asks", "a answers", "b asks", "b answers"]
    assert [e.id for e in store.usage_entries(session_id=SID)] == ["a"]
    assert_no_hold(store)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_turn_committed_again_is_not_stored_twice(store: HistoryStore, mode: str) -> None:
    # A turn replayed from the journal after its first commit went through (the answer was
    # lost, not the write): the same entry id writes neither the messages nor the usage again,
    # and still ends the hold the replay names.
    if type(store).commit_turn is HistoryStore.commit_turn:
        pytest.skip("the contract's default commit_turn does not check (no journal replays it)")
    with store.lock(SID) as fence:
        store.commit_turn(SID, turn("a"), entry("a"), fence=fence)
    hold = held(store, 50)

    async def again() -> None:
        async with store.alock(SID) as fence:
            await store.acommit_turn(SID, turn("a"), entry("a"), release=hold, fence=fence)

    if mode == "sync":
        with store.lock(SID) as fence:
            store.commit_turn(SID, turn("a"), entry("a"), release=hold, fence=fence)
    else:
        asyncio.run(again())
    assert [m.text for m in store.load(SID)] == ["a asks", "a answers"]
    assert [e.id for e in store.usage_entries(session_id=SID)] == ["a"]
    assert store.usage_total("session", SID).total_tokens == 10
    assert_no_hold(store)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_turn_that_lost_its_lock_keeps_its_usage_but_not_its_messages(
    backend: Backend, mode: str
) -> None:
    store, other = backend.store, backend.other
    store.append(SID, turn("before"))
    hold = held(store, 50)

    def late_turn(fence: Fence | None) -> None:
        assert fence is not None and fence.session_id == SID
        backend.lose(SID)  # stalled past its lease...
        with other.lock(SID) as theirs:  # ...and another process took the session
            other.commit_turn(SID, turn("other"), entry("other"), fence=theirs)
        store.commit_turn(SID, turn("late"), entry("late"), release=hold, fence=fence)

    async def alate_turn() -> None:
        async with store.alock(SID) as fence:
            assert fence is not None
            backend.lose(SID)
            async with other.alock(SID) as theirs:
                await other.acommit_turn(SID, turn("other"), entry("other"), fence=theirs)
            await store.acommit_turn(SID, turn("late"), entry("late"), release=hold, fence=fence)

    with pytest.raises(SessionLockLostError) as caught:
        if mode == "sync":
            with store.lock(SID) as fence:
                late_turn(fence)
        else:
            asyncio.run(alate_turn())

    error = caught.value
    assert error.session_id == SID and error.reply == "late answers"
    assert [m.text for m in error.messages] == ["late asks", "late answers"]
    assert "was not saved" in str(error) and "`reply`" in str(error)
    # The history holds the other turn only; the ledger both (both were billed).
    texts = [m.text for m in store.load(SID)]
    assert texts == ["before asks", "before answers", "other asks", "other answers"]
    assert sorted(e.id for e in store.usage_entries(session_id=SID)) == ["late", "other"]
    assert store.usage_total("session", SID).total_tokens == 20
    assert_no_hold(store)
    with store.lock(SID):  # and the session is usable again
        pass


def test_a_turn_that_kept_its_lock_through_the_other_writers_saves(backend: Backend) -> None:
    # The fence refuses only a lost lock: a held one writes, whoever wrote before.
    store, other = backend.store, backend.other
    with other.lock(SID) as theirs:
        other.commit_turn(SID, turn("first"), entry("first"), fence=theirs)
    with store.lock(SID) as fence:
        store.commit_turn(SID, turn("second"), entry("second"), fence=fence)
    assert [m.text for m in store.load(SID)][-1] == "second answers"
    assert len(store.usage_entries(session_id=SID)) == 2


# -- through the chain ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async", "stream"])
def test_a_chatbot_turn_that_lost_its_lock_says_so_and_hands_back_its_reply(
    backend: Backend, mode: str
) -> None:
    store, other = backend.store, backend.other

    def stalled(messages: list[BaseMessage]) -> str:
        # The turn's process stalls while the model thinks; its lock is lost meanwhile and
        # another process runs a turn on the session.
        backend.lose(SID)
        with other.lock(SID) as theirs:
            other.commit_turn(SID, turn("other"), entry("other"), fence=theirs)
        return "the late reply"

    bot = Chatbot(
        Settings(api_key="sk-test", summarize=False, budget_session_tokens=10**9),
        llm=FakeChatModel(respond=stalled),
        store=store,
    )
    with pytest.raises(SessionLockLostError) as caught:
        if mode == "sync":
            bot.chat("late question", session_id=SID)
        elif mode == "async":
            asyncio.run(bot.achat("late question", session_id=SID))
        else:
            "".join(bot.stream("late question", session_id=SID))
    assert caught.value.reply == "the late reply"
    assert [m.text for m in store.load(SID)] == ["other asks", "other answers"]
    late = [e for e in store.usage_entries(session_id=SID) if e.id != "other"]
    assert len(late) == 1 and late[0].total_tokens > 0  # billed, and recorded
    assert_no_hold(store)
