"""Write-ahead records of turns in flight, and the recovery of a crashed turn, on every store.

A turn's record (the user's message, its hold, its prompt's count, the reply so far) is in
the store before its call is sent. A process that dies mid-turn leaves it behind; the next
holder of the session's lock stores the user's message and the reply so far, marked
interrupted, records the call as estimated and ends the hold: exactly once, and never over a
turn that was stored after all. Here a crash is a turn whose process stops between its
record and its end (no save, no end: its lock lapses as a dead process's would); the real
``kill -9`` is in tests/reliability/test_kills.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from datetime import UTC, datetime, timedelta

import pytest
from langchain_core.messages import AIMessageChunk

from chatchain import (
    Budget,
    Chatbot,
    ChatChain,
    SessionLockLostError,
    Settings,
    create_chat_chain,
)
from chatchain._pending import CRASHED, RECOVERED, recover_session
from chatchain._turn import Turn
from chatchain.budgets import BudgetHold, BudgetLimit
from chatchain.stores import HistoryStore, MemoryStore
from chatchain.stores._postgres import PostgresStore
from chatchain.stores._redis import RedisStore
from chatchain.stores._sqlite import SQLiteStore
from chatchain.testing import FakeChatModel

SID = "crash ünï:*"
KEEPING = ["memory", "sqlite", "redis", "postgres"]  # the stores that keep records
CAP = 100_000  # session tokens: a budget, so that turns hold


@pytest.fixture(params=KEEPING)
def keeping(request: pytest.FixtureRequest) -> HistoryStore:
    return request.getfixturevalue(f"{request.param}_store")  # type: ignore[no-any-return]


def other_process(store: HistoryStore) -> HistoryStore:
    """A second store object on the same data, as another process opens it."""
    if isinstance(store, SQLiteStore):
        return SQLiteStore(store.path, lock_timeout=10.0)
    if isinstance(store, RedisStore):
        return RedisStore(store.url, lock_timeout=10.0, prefix=store.prefix)
    if isinstance(store, PostgresStore):
        return PostgresStore(store._url, lock_timeout=10.0, table_prefix=store.table_prefix)
    return store  # memory: one process


def chain_on(store: HistoryStore, *replies: str) -> ChatChain:
    return create_chat_chain(
        FakeChatModel(replies=list(replies)),
        get_session_history=store,
        budget=Budget(session_tokens=CAP),
    )


def crash_mid_stream(chain: ChatChain, text: str, *pieces: str) -> Turn:
    """Run a turn up to its call and a checkpoint of ``pieces``, then stop as a killed
    process does: no save, no end. Its lock is given back (a dead holder's lapses)."""
    turn = chain._spec.begin(
        {"input": text}, {"configurable": {"session_id": SID}}, chain._get_input_messages
    )
    store = chain._spec.store
    assert store is not None
    with store.lock(SID) as turn.fence:
        turn.sending(lambda: 42)  # the record is written before the call goes out
        for piece in pieces:
            turn.add_chunk(AIMessageChunk(content=piece))
        assert turn._ahead is not None
        turn._ahead.due = 0.0  # the checkpoint is due
        turn.checkpoint()
    return turn


def held_tokens(store: HistoryStore) -> int:
    """The tokens held on the session now (a probe hold within the cap tells)."""
    spent = store.usage_total("session", SID).total_tokens
    room = CAP - spent
    probe = BudgetHold(SID, 1, 0.0, datetime.now(UTC) + timedelta(minutes=1))
    refusal = store.hold_budget(probe, [BudgetLimit("session", SID, max_tokens=spent + 1)])
    if refusal is None:
        store.release_budget(probe.id)
        return 0
    assert room > 0
    return refusal.held_tokens


# -- the store primitives --------------------------------------------------------------------


def test_a_record_is_kept_replaced_by_its_own_turn_only_and_dropped(store: HistoryStore) -> None:
    if not isinstance(store, (MemoryStore, SQLiteStore, RedisStore, PostgresStore)):
        # A third-party store keeps no records (the default): nothing to recover.
        assert store.write_pending(SID, "a", "{}") is False
        assert store.read_pending(SID) is None and store.pending_sessions() == []
        return
    assert store.read_pending(SID) is None
    assert store.write_pending(SID, "a", '{"n": 1}') is True
    assert store.write_pending(SID, "a", '{"n": 2, "ü": "☃"}') is True  # its own: replaced
    assert store.write_pending(SID, "b", '{"n": 3}') is False  # another turn's: refused
    assert store.read_pending(SID) == ("a", '{"n": 2, "ü": "☃"}')
    assert store.pending_sessions() == [SID]
    assert store.drop_pending(SID, "b") is False  # not b's to drop
    assert store.drop_pending(SID, "a") is True
    assert store.drop_pending(SID, "a") is False  # once
    assert store.read_pending(SID) is None and store.pending_sessions() == []


def test_the_async_record_primitives_match(keeping: HistoryStore) -> None:
    async def main() -> None:
        assert await keeping.awrite_pending(SID, "a", "x") is True
        assert await keeping.awrite_pending(SID, "b", "y") is False
        assert await keeping.aread_pending(SID) == ("a", "x")
        assert await keeping.adrop_pending(SID, "b") is False
        assert await keeping.adrop_pending(SID, "a") is True
        assert await keeping.aread_pending(SID) is None

    asyncio.run(main())


# -- recovery through the turn engine -----------------------------------------------------------


def test_a_crashed_turn_is_stored_interrupted_billed_and_unheld_by_the_next_turn(
    keeping: HistoryStore,
) -> None:
    chain = chain_on(keeping, "Fine, thanks.")
    crashed = crash_mid_stream(chain, "How are you?", "I am ", "doing ")
    assert keeping.read_pending(SID) is not None
    assert held_tokens(keeping) > 0  # the crashed turn's hold is still there
    assert keeping.load(SID) == []  # nothing stored yet...

    _reply, turn = chain.run_turn({"input": "Hello?"}, {"configurable": {"session_id": SID}})

    # ...then the user's message first, the reply so far marked interrupted, then the turn.
    messages = keeping.load(SID)
    assert [m.text for m in messages] == ["How are you?", "I am doing ", "Hello?", "Fine, thanks."]
    assert messages[1].response_metadata["interrupted"] is True
    assert messages[1].response_metadata["interrupted_reason"] == CRASHED
    entries = keeping.usage_entries(session_id=SID)
    assert [e.id for e in entries] == [crashed.entry_id, turn.entry_id]
    first = entries[0]
    assert first.estimated and first.requests == 1
    assert first.prompt_tokens == 42 and first.completion_tokens > 0  # counted from "I am doing "
    assert RECOVERED in turn.notices
    assert keeping.read_pending(SID) is None and keeping.pending_sessions() == []
    assert held_tokens(keeping) == 0  # the crashed turn's hold ended with its recovery


def test_a_crashed_async_stream_is_recovered_by_the_next_async_turn(keeping: HistoryStore) -> None:
    chain = chain_on(keeping, "Later.")
    crash_mid_stream(chain, "Tell me", "Once upon")

    async def main() -> list[str]:
        chunks = [
            c.content
            async for c in chain.astream({"input": "Go on"}, {"configurable": {"session_id": SID}})
        ]
        return chunks

    assert "".join(asyncio.run(main())) == "Later."
    texts = [m.text for m in keeping.load(SID)]
    assert texts == ["Tell me", "Once upon", "Go on", "Later."]
    assert len(keeping.usage_entries(session_id=SID)) == 2
    assert keeping.read_pending(SID) is None


def test_recovery_happens_exactly_once_when_two_processes_race(keeping: HistoryStore) -> None:
    chain = chain_on(keeping)
    crash_mid_stream(chain, "Hi", "Hel")
    other = other_process(keeping)
    try:
        rivals = [chain, chain_on(other)]
        results: list[bool] = []
        start = threading.Barrier(2)

        def sweep(rival: ChatChain) -> None:
            start.wait()
            results.append(recover_session(rival._spec, SID))

        threads = [threading.Thread(target=sweep, args=(rival,)) for rival in rivals]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(results) == [False, True]
        assert recover_session(chain._spec, SID) is False  # and never again
        assert [m.text for m in keeping.load(SID)] == ["Hi", "Hel"]
        assert len(keeping.usage_entries(session_id=SID)) == 1
    finally:
        if other is not keeping:
            other.close()


def test_a_turn_stored_before_its_record_was_dropped_is_not_stored_twice(
    keeping: HistoryStore,
) -> None:
    # The process died between the turn's commit and the drop of its record.
    chain = chain_on(keeping, "Done.")
    turn = chain._spec.begin(
        {"input": "Q"}, {"configurable": {"session_id": SID}}, chain._get_input_messages
    )
    with keeping.lock(SID) as turn.fence:
        turn.sending(lambda: 5)
        turn.add_chunk(AIMessageChunk(content="Done."))
        turn.save(turn.streamed_reply())  # stored... and killed before `end`
    assert keeping.read_pending(SID) is not None
    assert recover_session(chain._spec, SID) is False
    assert [m.text for m in keeping.load(SID)] == ["Q", "Done."]
    assert [e.id for e in keeping.usage_entries(session_id=SID)] == [turn.entry_id]
    assert keeping.read_pending(SID) is None


def test_a_normal_or_failed_turn_leaves_no_record(keeping: HistoryStore) -> None:
    chain = chain_on(keeping, "One.")
    chain.invoke({"input": "a"}, {"configurable": {"session_id": SID}})
    assert "".join(
        str(c.content) for c in chain.stream({"input": "b"}, {"configurable": {"session_id": SID}})
    )
    assert keeping.read_pending(SID) is None
    broken = create_chat_chain(
        FakeChatModel(errors=[RuntimeError("endpoint down")]), get_session_history=keeping
    )
    with pytest.raises(Exception, match="endpoint down"):
        broken.invoke({"input": "c"}, {"configurable": {"session_id": SID}})
    assert keeping.read_pending(SID) is None
    assert len(keeping.load(SID)) == 4 and len(keeping.usage_entries(session_id=SID)) == 2


SHARED = ["sqlite", "redis", "postgres"]


@pytest.fixture(params=SHARED)
def shared(request: pytest.FixtureRequest) -> HistoryStore:
    return request.getfixturevalue(f"{request.param}_store")


def test_a_slow_owner_that_lost_its_lock_cannot_commit_over_the_recovery(
    shared: HistoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The owner is alive but stalled: its lock lapsed, another process recovered its turn.
    chain = chain_on(shared)
    other = other_process(shared)
    try:
        turn = chain._spec.begin(
            {"input": "Slow?"}, {"configurable": {"session_id": SID}}, chain._get_input_messages
        )
        stale = shared.lock(SID)
        turn.fence = stale.__enter__()
        turn.sending(lambda: 7)
        turn.add_chunk(AIMessageChunk(content="Partly"))
        assert turn._ahead is not None
        turn._ahead.due = 0.0
        turn.checkpoint()
        lose_lock(shared)
        assert recover_session(chain_on(other)._spec, SID) is True
        turn.add_chunk(AIMessageChunk(content=" done."))
        with pytest.raises(SessionLockLostError):
            turn.save(turn.streamed_reply())
        turn.end()
        with contextlib.suppress(Exception):  # the lost lock's release may fail: it is gone
            stale.__exit__(None, None, None)
        assert [m.text for m in shared.load(SID)] == ["Slow?", "Partly"]  # the recovery's
        assert [e.id for e in shared.usage_entries(session_id=SID)] == [turn.entry_id]  # once
        assert shared.read_pending(SID) is None
    finally:
        other.close()


def lose_lock(store: HistoryStore) -> None:
    """The session's lock lapses under its holder, as in tests/stores/test_fencing.py."""
    import sqlite3

    import psycopg
    import redis

    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path) as conn:
            conn.execute("UPDATE locks SET expires_at = 0 WHERE session_id = ?", (SID,))
        conn.close()
    elif isinstance(store, RedisStore):
        with redis.Redis.from_url(store.url) as client:
            client.delete(store._key("lock", SID))
    else:
        assert isinstance(store, PostgresStore)
        with psycopg.connect(store._url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks"
                " WHERE locktype = 'advisory' AND granted AND objsubid = 1"
                " AND classid = ((hashtextextended(%(key)s, 0) >> 32) & 4294967295)::oid"
                " AND objid = (hashtextextended(%(key)s, 0) & 4294967295)::oid",
                {"key": store._lock_key(SID)},
            )


def test_a_sweep_closes_the_crashed_turns_of_sessions_no_one_comes_back_to(
    keeping: HistoryStore,
) -> None:
    crash_mid_stream(chain_on(keeping), "Anyone?", "Yes, I")
    bot = Chatbot(llm=FakeChatModel(), store=keeping)  # e.g. a service starting up
    assert bot.recover_crashed_turns() == [SID]
    assert [m.text for m in keeping.load(SID)] == ["Anyone?", "Yes, I"]
    assert len(keeping.usage_entries(session_id=SID)) == 1
    assert held_tokens(keeping) == 0
    assert bot.recover_crashed_turns() == []


def test_a_delete_keeps_the_bill_of_a_crashed_turn_and_forgets_its_messages(
    keeping: HistoryStore,
) -> None:
    crashed = crash_mid_stream(chain_on(keeping), "Secret?", "Sure")
    bot = Chatbot(llm=FakeChatModel(), store=keeping)
    bot.delete(SID)
    assert keeping.load(SID) == [] and keeping.read_pending(SID) is None
    assert [e.id for e in keeping.usage_entries(session_id=SID)] == [crashed.entry_id]
    bot.chat("Fresh start", session_id=SID)
    assert [m.text for m in keeping.load(SID)] == ["Fresh start", "Echo: Fresh start"]


def test_a_delete_without_an_api_key_leaves_a_crashed_turn_for_later(
    keeping: HistoryStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    crash_mid_stream(chain_on(keeping), "Hello?", "Hi")
    keeping.append(SID, [AIMessageChunk(content="older")])  # something to forget
    bot = Chatbot(Settings(_env_file=None), store=keeping)  # e.g. `chatchain sessions delete`
    bot.delete(SID)
    assert keeping.load(SID) == []
    assert keeping.read_pending(SID) is not None  # its bill is recorded by the next turn
    assert "without OPENAI_API_KEY" in caplog.text


def test_a_records_text_is_its_json_whatever_its_reply_holds() -> None:
    # The reply is escaped a slice at a time (see `_pending._json`): across the slices'
    # edges too, the text reads back as the record.
    from chatchain._pending import _SLICE, _json

    reply = ('é"\\\n\x01 ' * (_SLICE // 3))[: 2 * _SLICE + 5] + "\ud83d"
    for record in [
        {"format": 1, "messages": [{"content": 'a "b"\n'}], "reply": reply, "hold": None},
        {"format": 1, "reply": ""},
    ]:
        text = _json(record)
        assert json.loads(text) == record
        last = {**{k: v for k, v in record.items() if k != "reply"}, "reply": record["reply"]}
        assert text == json.dumps(last, ensure_ascii=False, separators=(",", ":"))
