"""The behaviour every history store shares, run against each backend."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from chatchain import InvalidInputError, SessionBusyError
from chatchain.stores import HistoryStore, Summary
from chatchain.stores._base import utcnow


def conversation(n: int, tag: str = "") -> list[BaseMessage]:
    out: list[BaseMessage] = []
    for i in range(n):
        out.append(
            HumanMessage(f"{tag}question {i}") if i % 2 == 0 else AIMessage(f"{tag}answer {i}")
        )
    return out


def rich_messages() -> list[BaseMessage]:
    return [
        SystemMessage("You are terse. ünïcödé ✓ 🙂 — \u200d\t\n"),
        HumanMessage("What's the weather in Zürich? 日本語", id="h1", name="bob"),
        AIMessage(
            "",
            id="a1",
            tool_calls=[
                {
                    "name": "weather",
                    "args": {"city": "Zürich", "n": [1, 2.5, None]},
                    "id": "call_1",
                    "type": "tool_call",
                }
            ],
            response_metadata={"model_name": "gpt-4o-mini", "finish_reason": "tool_calls"},
            usage_metadata={"input_tokens": 10, "output_tokens": 3, "total_tokens": 13},
        ),
        ToolMessage('{"temp": 21}', tool_call_id="call_1", name="weather"),
        AIMessage(
            "21 °C",
            response_metadata={"interrupted": True, "interrupted_reason": "cancelled"},
            additional_kwargs={"refusal": None},
        ),
        HumanMessage(content=[{"type": "text", "text": "multi"}, {"type": "text", "text": "part"}]),
    ]


def same(a: list[BaseMessage], b: list[BaseMessage]) -> bool:
    return [m.model_dump() for m in a] == [m.model_dump() for m in b]


def test_round_trip_of_every_message_type(store: HistoryStore) -> None:
    messages = rich_messages()
    store.append("s", messages)
    assert same(store.load("s"), messages)
    assert store.count("s") == len(messages)


def test_appends_keep_order_across_calls(store: HistoryStore) -> None:
    msgs = conversation(30)
    for i in range(0, 30, 3):
        store.append("s", msgs[i : i + 3])
    assert [m.content for m in store.load("s")] == [m.content for m in msgs]


@pytest.mark.parametrize(
    ("start", "stop"), [(0, None), (-10, None), (-1, None), (5, 12), (0, 0), (-100, None), (25, 40)]
)
def test_load_slices_like_python(store: HistoryStore, start: int, stop: int | None) -> None:
    msgs = conversation(30)
    store.append("s", msgs)
    assert [m.content for m in store.load("s", start, stop)] == [
        m.content for m in msgs[start:stop]
    ]


def test_unknown_session_is_empty(store: HistoryStore) -> None:
    assert store.load("nobody") == []
    assert store.count("nobody") == 0
    assert store.info("nobody") is None
    assert store.get_summary("nobody") is None
    store.delete("nobody")  # not an error


def test_sessions_are_isolated_and_listed_oldest_first(store: HistoryStore) -> None:
    for sid in ("first", "second", "third"):
        store.append(sid, conversation(2, tag=sid))
        time.sleep(0.01)
    assert store.sessions() == ["first", "second", "third"]
    assert [m.content for m in store.load("second")] == ["secondquestion 0", "secondanswer 1"]


def test_hostile_session_ids_are_kept_apart(store: HistoryStore) -> None:
    ids = ["a", "a*", "a?", "a:b", "'; DROP TABLE messages; --", "../x", "a b", "名前🙂", "%_"]
    for sid in ids:
        store.append(sid, [HumanMessage(sid)])
    for sid in ids:
        assert [m.content for m in store.load(sid)] == [sid]
    assert sorted(store.sessions()) == sorted(ids)


def test_info_counts_and_times(store: HistoryStore) -> None:
    before = utcnow()
    store.append("s", conversation(4))
    info = store.info("s")
    assert info is not None
    assert info.message_count == 4
    assert (
        before - timedelta(seconds=1)
        <= info.created_at
        <= info.updated_at
        <= utcnow() + timedelta(seconds=1)
    )


def test_delete_forgets_messages_and_summary(store: HistoryStore) -> None:
    store.append("s", conversation(4))
    store.set_summary("s", Summary("they talked", covers=2))
    store.append("keep", conversation(2))
    store.delete("s")
    assert store.load("s") == []
    assert store.get_summary("s") is None
    assert store.sessions() == ["keep"]


def test_summary_round_trip_and_replace(store: HistoryStore) -> None:
    store.append("s", conversation(6))
    store.set_summary("s", Summary("first summary ✓", covers=2))
    store.set_summary("s", Summary("second summary", covers=4))
    assert store.get_summary("s") == Summary("second summary", covers=4)
    assert store.count("s") == 6  # the transcript is untouched


def test_prune_deletes_only_sessions_idle_since_before(store: HistoryStore) -> None:
    store.append("old", conversation(2))
    time.sleep(0.05)
    cutoff = utcnow()
    time.sleep(0.05)
    store.append("new", conversation(2))
    assert store.prune(cutoff) == ["old"]
    assert store.sessions() == ["new"]


def test_export_import_round_trip(store: HistoryStore) -> None:
    store.append("s", rich_messages())
    store.set_summary("s", Summary("earlier: greetings", covers=1))
    exported = json.loads(json.dumps(store.export_session("s")))
    new_id = store.import_session(exported, session_id="copy")
    assert new_id == "copy"
    assert same(store.load("copy"), store.load("s"))
    assert store.get_summary("copy") == Summary("earlier: greetings", covers=1)
    with pytest.raises(InvalidInputError, match="replace=True"):
        store.import_session(exported, session_id="copy")
    assert store.count("copy") == len(rich_messages())  # the refused import changed nothing
    store.import_session(exported, session_id="copy", replace=True)
    assert store.count("copy") == len(rich_messages())


def test_import_refuses_what_is_not_an_export(store: HistoryStore) -> None:
    with pytest.raises(InvalidInputError, match="not a chatchain session export"):
        store.import_session({"messages": []})
    with pytest.raises(InvalidInputError, match="Message 1 of the session export has no role"):
        store.import_session(
            {"format": "chatchain.session/1", "session_id": "x", "messages": [{"bad": 1}]}
        )
    assert store.sessions() == []


def test_history_view_works_with_langchain(store: HistoryStore) -> None:
    history = store("s")
    history.add_messages([HumanMessage("hi"), AIMessage("hello")])
    assert [m.content for m in history.messages] == ["hi", "hello"]
    assert [m.content for m in asyncio.run(history.aget_messages())] == ["hi", "hello"]
    history.clear()
    assert store.count("s") == 0


def test_async_twins_agree(store: HistoryStore) -> None:
    async def run() -> None:
        await store.aappend("s", conversation(6))
        assert await store.acount("s") == 6
        assert [m.content for m in await store.aload("s", -2)] == ["question 4", "answer 5"]
        await store.aset_summary("s", Summary("sum", 2))
        assert await store.aget_summary("s") == Summary("sum", 2)
        await store.adelete("s")
        assert await store.acount("s") == 0

    asyncio.run(run())


def test_concurrent_appends_from_threads_lose_nothing(store: HistoryStore) -> None:
    def writer(t: int) -> None:
        for i in range(25):
            store.append("s", [HumanMessage(f"{t}-{i}")])

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    contents = [m.content for m in store.load("s")]
    assert sorted(contents) == sorted(f"{t}-{i}" for t in range(4) for i in range(25))
    for t in range(4):  # each writer's messages in its own order
        mine = [c for c in contents if c.startswith(f"{t}-")]
        assert mine == [f"{t}-{i}" for i in range(25)]


def test_lock_serialises_turns_and_times_out(store: HistoryStore) -> None:
    order: list[str] = []
    inside = threading.Event()

    def holder() -> None:
        with store.lock("s"):
            inside.set()
            order.append("a in")
            time.sleep(0.2)
            order.append("a out")

    thread = threading.Thread(target=holder)
    thread.start()
    inside.wait(2)
    with store.lock("s"):
        order.append("b in")
    thread.join()
    assert order == ["a in", "a out", "b in"]
    with store.lock("other"), store.lock("s"):  # different sessions never wait for each other
        pass


def test_async_lock_serialises(store: HistoryStore) -> None:
    order: list[str] = []

    async def turn(name: str) -> None:
        async with store.alock("s"):
            order.append(f"{name} in")
            await asyncio.sleep(0.02)
            order.append(f"{name} out")

    async def run() -> None:
        await asyncio.gather(*(turn(n) for n in "abcd"))

    asyncio.run(run())
    assert len(order) == 8
    assert all(order[i].split()[0] == order[i + 1].split()[0] for i in range(0, 8, 2))


def test_busy_session_gives_a_clear_error(store: HistoryStore) -> None:
    release = threading.Event()
    inside = threading.Event()

    def holder() -> None:
        with store.lock("s"):
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    inside.wait(2)
    try:  # every store fixture is built with lock_timeout=1.0
        with pytest.raises(SessionBusyError, match="busy"), store.lock("s"):
            pass
    finally:
        release.set()
        thread.join()


message_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=200
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    texts=st.lists(message_text, min_size=1, max_size=6),
    sid=st.text(
        st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=64
    ),
)
def test_any_unicode_round_trips(store: HistoryStore, texts: list[str], sid: str) -> None:
    messages = [HumanMessage(t) if i % 2 == 0 else AIMessage(t) for i, t in enumerate(texts)]
    store.delete(sid)
    store.append(sid, messages)
    assert same(store.load(sid), messages)
    store.delete(sid)
