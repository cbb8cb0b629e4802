"""Importing a session export, run against every backend.

A bad file is refused whole, with one `InvalidInputError` that names what is wrong, before
the store is touched: every kind of bad file below leaves every store exactly as it was,
even with ``replace=True``. A good one replaces the session in one step and keeps its times.
"""

from __future__ import annotations

import copy
import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    ToolMessage,
    messages_from_dict,
)

from chatchain import InvalidInputError, SessionExistsError, StoreError
from chatchain.stores import HistoryStore, Summary
from chatchain.stores._base import EXPORT_FORMAT
from chatchain.stores._export import MAX_EXPORT_DEPTH, parse_export
from chatchain.stores._postgres import PostgresStore
from chatchain.stores._redis import RedisStore
from chatchain.stores._sqlite import SQLiteStore
from tests.stores.test_contract import conversation, rich_messages, same

CREATED = datetime(2024, 3, 1, 9, 30, 15, 123456, tzinfo=UTC)
UPDATED = datetime(2024, 3, 2, 18, 5, 0, 654321, tzinfo=UTC)

Snapshot = tuple[list[str], dict[str, Any]]


def snapshot(store: HistoryStore) -> Snapshot:
    """Everything the store holds about its sessions, comparable with ``==``."""
    ids = store.sessions()
    return ids, {
        sid: ([m.model_dump() for m in store.load(sid)], store.get_summary(sid), store.info(sid))
        for sid in ids
    }


def seed(store: HistoryStore) -> Snapshot:
    """The target session ``s`` (6 messages and a summary) and a bystander."""
    store.append("s", conversation(6, "old "))
    store.set_summary("s", Summary("old summary", 2))
    store.append("other", conversation(2))
    before = snapshot(store)
    assert store.count("s") == 6
    return before


def good_export() -> dict[str, Any]:
    """A valid export of a session ``s``, as a file holds it."""
    return {
        "format": EXPORT_FORMAT,
        "session_id": "s",
        "created_at": CREATED.isoformat(),
        "updated_at": UPDATED.isoformat(),
        "summary": {"text": "new summary", "covers": 2},
        "messages": [{"type": m.type, "data": m.model_dump()} for m in conversation(4, "new ")],
    }


def changed(change: Callable[[dict[str, Any]], object]) -> bytes:
    """The text of `good_export` after ``change`` (which edits it, or returns a whole value)."""
    data = good_export()
    result = change(data)
    return json.dumps(data if result is None else result).encode()


def nested(depth: int) -> object:
    value: object = "deep"
    for _ in range(depth):
        value = [value]
    return value


def content(value: object) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["messages"][2]["data"]["content"] = value

    return change


def set_key(key: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data[key] = value

    return change


def covers(value: object) -> Callable[[dict[str, Any]], None]:
    return set_key("summary", {"text": "sum", "covers": value})


def role(value: object) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["messages"][2]["type"] = value

    return change


def drop_first(data: dict[str, Any]) -> None:
    del data["messages"][0]


def raw(text: str) -> bytes:
    return text.encode()


def tool_result(call_id: str, at: int, call_at: int | None = None) -> bytes:
    """`good_export` with a tool result for ``call_id`` at ``at``; ``call_at``: the AI
    message (index, after the insertion) that makes the call."""

    def change(data: dict[str, Any]) -> None:
        result = {"type": "tool", "data": {"content": "21 C", "tool_call_id": call_id}}
        data["messages"].insert(at, result)
        if call_at is not None:
            call = {"name": "weather", "args": {}, "id": call_id, "type": "tool_call"}
            data["messages"][call_at]["data"]["tool_calls"] = [call]

    return changed(change)


# (the file's bytes, what the error must say)
BAD_FILES: dict[str, tuple[bytes, str]] = {
    "lone surrogate": (changed(content("\udc00")), r"lone surrogate \(U\+DC00\) at messages\[2\]"),
    "lone surrogate in the summary": (
        changed(set_key("summary", {"text": "a\ud800", "covers": 1})),
        r"lone surrogate \(U\+D800\) at summary.text",
    ),
    "NUL": (changed(content("a\x00b")), r"NUL character .* at messages\[2\].data.content"),
    "covers 10**30": (changed(covers(10**30)), "covers 10{30} messages; it can cover 0 to the 4"),
    "covers negative": (changed(covers(-1)), "covers -1 messages"),
    "covers more than the messages": (changed(covers(5)), "covers 5 messages"),
    "covers a fraction": (changed(covers(1.5)), "covers 1.5 messages"),
    "covers true": (changed(covers(True)), "covers True messages"),
    "covers text": (changed(covers("2")), "covers '2' messages"),
    "summary without text": (changed(set_key("summary", {"covers": 0})), "summary has no text"),
    "a JSON list": (changed(lambda data: [data]), "is a JSON list, not a JSON object"),
    "a JSON string": (raw('"hello"'), "is a JSON string, not a JSON object"),
    "not JSON": (raw('{"format": '), "is not JSON"),
    "NaN": (raw(changed(covers(1)).decode().replace('"covers": 1', '"covers": NaN')), "NaN"),
    "not UTF-8": (changed(content("caf\u00e9")).replace(b"\\u00e9", b"\xe9"), "not valid UTF-8"),
    "nesting beyond the parser": (
        changed(content("DEEP")).replace(b'"DEEP"', b"[" * 100_000 + b"]" * 100_000),
        "nests deeper than the 100 levels",
    ),
    "nesting beyond the limit": (
        changed(content(nested(MAX_EXPORT_DEPTH))),
        r"nests deeper than 100 levels \(at messages\[2\].data.content",
    ),
    "starts with the AI": (changed(drop_first), r"starts with an AI message \(message 1\)"),
    "starts with a tool": (
        changed(
            lambda data: data["messages"].insert(
                0, {"type": "tool", "data": {"content": "x", "tool_call_id": "c"}}
            )
        ),
        "starts with a tool message",
    ),
    "a tool result without its call": (
        tool_result("call_x", 2),
        "Message 3 of the session export is the result of tool call 'call_x', which no AI "
        "message before it made",
    ),
    "a tool result before its call": (
        tool_result("call_y", 2, call_at=4),
        "Message 3 .* result of tool call 'call_y', which no AI message before it made",
    ),
    "unknown role": (changed(role("wizard")), "Message 3 of the session export has the role"),
    "a chat role": (changed(role("chat")), "has the role 'chat'; chatchain stores ai, human"),
    "no role": (changed(role(None)), "Message 3 of the session export has no role"),
    "a message that is not one": (
        changed(lambda data: data["messages"].__setitem__(1, "hello")),
        "Message 2 of the session export has no role",
    ),
    "an unreadable message": (
        changed(content({"not": "content"})),
        "Message 3 of the session export cannot be read",
    ),
    "no messages": (changed(set_key("messages", [])), "holds no messages"),
    "bad session id": (changed(set_key("session_id", "bad\nid")), "session id cannot be used"),
    "blank session id": (changed(set_key("session_id", "  ")), "session id cannot be used"),
    "session id not text": (changed(set_key("session_id", 42)), "session id cannot be used"),
    "no session id": (changed(lambda data: data.pop("session_id") and None), "names no session"),
    "another format": (changed(set_key("format", "chatchain.session/2")), "format 'chatchain"),
    "not an export": (raw("{}"), "not a chatchain session export"),
    "a bad time": (changed(set_key("created_at", "yesterday")), "created_at 'yesterday' is not"),
    "a time that is a number": (changed(set_key("updated_at", 1700000000)), "updated_at 1700"),
    "a time in the future": (
        changed(set_key("updated_at", "2999-01-01T00:00:00+00:00")),
        "updated_at .* is in the future",
    ),
    "created after updated": (
        changed(set_key("created_at", "2024-03-05T00:00:00+00:00")),
        "created .* after it was last written",
    ),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_bad_file_changes_nothing_and_says_what_is_wrong(store: HistoryStore, kind: str) -> None:
    text, message = BAD_FILES[kind]
    before = seed(store)
    with pytest.raises(InvalidInputError, match=message) as refused:
        store.import_session(parse_export(text), replace=True)
    assert type(refused.value) is InvalidInputError  # one clear error, never a driver's
    assert refused.value.__cause__ is None
    assert snapshot(store) == before
    assert store.count("s") == 6


def test_a_bad_file_under_another_id_changes_nothing(store: HistoryStore) -> None:
    before = seed(store)
    bad = json.loads(BAD_FILES["covers 10**30"][0])
    with pytest.raises(InvalidInputError, match="covers"):
        store.import_session(bad, session_id="new")
    with pytest.raises(InvalidInputError, match="session id must be a string"):
        store.import_session(good_export(), session_id=7, replace=True)  # type: ignore[arg-type]
    assert snapshot(store) == before


def test_replace_overwrites_the_whole_session_and_keeps_its_times(store: HistoryStore) -> None:
    seed(store)
    assert store.import_session(good_export(), replace=True) == "s"
    assert [m.text for m in store.load("s")] == [m.text for m in conversation(4, "new ")]
    assert store.get_summary("s") == Summary("new summary", 2)
    info = store.info("s")
    assert info is not None
    assert (info.message_count, info.created_at, info.updated_at) == (4, CREATED, UPDATED)
    assert store.sessions() == ["s", "other"]  # listed by when it was created
    # An imported session is as old as the export says: prune sees it.
    assert store.prune(UPDATED + timedelta(seconds=1)) == ["s"]
    assert store.sessions() == ["other"]


def test_replace_drops_a_summary_the_export_lacks(store: HistoryStore) -> None:
    seed(store)
    export = good_export()
    export["summary"] = None
    store.import_session(export, replace=True)
    assert store.get_summary("s") is None
    assert store.count("s") == 4


def test_an_export_without_times_is_stored_as_new(store: HistoryStore) -> None:
    export = good_export()
    del export["created_at"], export["updated_at"]
    before = datetime.now(UTC)
    store.import_session(export, session_id="fresh")
    info = store.info("fresh")
    assert info is not None
    assert before - timedelta(seconds=1) <= info.created_at == info.updated_at
    assert store.prune(before - timedelta(days=1)) == []


def test_a_session_that_exists_is_refused_without_replace(store: HistoryStore) -> None:
    before = seed(store)
    with pytest.raises(SessionExistsError, match="pass replace=True") as refused:
        store.import_session(good_export())
    assert refused.value.session_id == "s"
    assert isinstance(refused.value, InvalidInputError)
    assert snapshot(store) == before


def test_an_export_round_trips_with_its_times(store: HistoryStore) -> None:
    store.append("s", rich_messages())
    store.set_summary("s", Summary("earlier", covers=2))
    exported = json.loads(json.dumps(store.export_session("s")))
    store.import_session(exported, session_id="copy")
    assert same(store.load("copy"), store.load("s"))
    assert store.get_summary("copy") == Summary("earlier", covers=2)
    original, copied = store.info("s"), store.info("copy")
    assert original is not None and copied is not None
    assert (copied.created_at, copied.updated_at) == (original.created_at, original.updated_at)


def test_an_export_with_parallel_tool_calls_imports_whole(store: HistoryStore) -> None:
    calls = [
        {"name": "weather", "args": {"city": city}, "id": f"call_{city}", "type": "tool_call"}
        for city in ("Oslo", "Bergen")
    ]
    messages: list[BaseMessage] = [
        HumanMessage("Oslo and Bergen?"),
        AIMessage("", tool_calls=calls),
        ToolMessage("sunny", tool_call_id="call_Bergen", name="weather"),  # any order
        ToolMessage("rain", tool_call_id="call_Oslo", name="weather", status="error"),
        AIMessage("Sunny in Bergen; Oslo's forecast failed."),
    ]
    export = {
        "format": EXPORT_FORMAT,
        "session_id": "t",
        "messages": [{"type": m.type, "data": m.model_dump()} for m in messages],
    }
    assert store.import_session(json.loads(json.dumps(export))) == "t"
    assert same(store.load("t"), messages)
    assert json.loads(json.dumps(store.export_session("t")))["messages"] == export["messages"]


def test_replace_session_makes_the_session_exactly_that(store: HistoryStore) -> None:
    seed(store)
    store.replace_session("s", [HumanMessage("only"), AIMessage("this")])
    assert [m.text for m in store.load("s")] == ["only", "this"]
    assert store.get_summary("s") is None
    store.append("s", [HumanMessage("more")])  # the session goes on from there
    assert [m.text for m in store.load("s", -2)] == ["this", "more"]
    store.replace_session("new", conversation(2), Summary("x", 1), created_at=CREATED)
    info = store.info("new")
    assert info is not None and info.created_at == CREATED
    assert info.updated_at > CREATED  # no last write given: written now


# -- any edit of a good export: stored whole, or refused with nothing changed -----------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


def paths(value: object, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in ``value`` a value sits."""
    out = [here]
    if isinstance(value, dict):
        for key, item in value.items():
            out += paths(item, (*here, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += paths(item, (*here, i))
    return out


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_edit_of_an_export_is_stored_whole_or_changes_nothing(
    store: HistoryStore, data: st.DataObject
) -> None:
    store.delete("s")
    store.delete("other")
    before = seed(store)
    export = good_export()
    export["messages"] = [{"type": m.type, "data": m.model_dump()} for m in rich_messages()]
    where = data.draw(st.sampled_from(paths(export)[1:]))
    edited = copy.deepcopy(export)
    parent = edited
    for step in where[:-1]:
        parent = parent[step]
    parent[where[-1]] = data.draw(JSON_VALUES)
    try:
        target = store.import_session(parse_export(json.dumps(edited)), replace=True)
    except InvalidInputError:
        assert snapshot(store) == before
    else:  # and it reads back as it was read in
        loaded = messages_from_dict(edited["messages"])
        assert same(store.load(target), loaded)


# -- a store failing half-way through a replace leaves the old session whole -----------------


def boom() -> list[BaseMessage]:
    return [HumanMessage("fine"), AIMessage("boom")]


def test_sqlite_replace_is_one_transaction(sqlite_store: SQLiteStore) -> None:
    before = seed(sqlite_store)
    conn = sqlite3.connect(sqlite_store.path)
    try:
        # The second message's insert fails, after the delete and the first insert ran.
        conn.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON messages WHEN NEW.json LIKE '%boom%' "
            "BEGIN SELECT RAISE(ABORT, 'boom'); END"
        )
        with pytest.raises(sqlite3.IntegrityError, match="boom"):
            sqlite_store.replace_session("s", boom())
    finally:
        conn.execute("DROP TRIGGER IF EXISTS boom")
        conn.close()
    assert snapshot(sqlite_store) == before


def test_postgres_replace_is_one_transaction(
    postgres_store: PostgresStore, postgres_url: str
) -> None:
    before = seed(postgres_store)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            "CREATE OR REPLACE FUNCTION chatchain_test_boom() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN IF NEW.message LIKE '%boom%' THEN RAISE EXCEPTION 'boom'; END IF; "
            "RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON chatchain_messages FOR EACH ROW "
            "EXECUTE FUNCTION chatchain_test_boom()"
        )
        try:
            with pytest.raises(StoreError, match="boom"):
                postgres_store.replace_session("s", boom())
        finally:
            conn.execute("DROP TRIGGER IF EXISTS boom ON chatchain_messages")
            conn.execute("DROP FUNCTION IF EXISTS chatchain_test_boom()")
    assert snapshot(postgres_store) == before


def test_redis_replace_is_one_multi_exec(redis_store: RedisStore, redis_url: str) -> None:
    before = seed(redis_store)
    # A user who may delete but not push: its RPUSH is refused after its DEL would be done.
    limited_url = redis_url.replace("redis://", "redis://limited:pw@")
    with redis.Redis.from_url(redis_url) as client:
        client.acl_setuser(
            "limited", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-rpush"]
        )
        limited = RedisStore(limited_url, lock_timeout=1.0)
        try:
            with pytest.raises(StoreError, match="rpush"):
                limited.replace_session("s", boom())
        finally:
            limited.close()
            client.acl_deluser("limited")
    assert snapshot(redis_store) == before
