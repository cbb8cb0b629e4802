"""Turns with tool calls on every store: the whole exchange saved in one fenced write.

The human message, the AI messages with tool calls, their results and the final reply are
saved together by one ``commit_turn`` under the session lock, with one ledger entry for all
the turn's model calls; a turn that lost its lock saves none of it; concurrent turns on one
session never interleave their exchanges.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage

from chatchain import Chatbot, SessionLockLostError, Settings
from chatchain.stores import HistoryStore
from chatchain.testing import FakeChatModel, tool_call_reply
from tests.stores.test_fencing import SID, Backend, assert_no_hold, entry, turn
from tests.stores.test_fencing import backend as backend  # the fixture, for this module


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def settings() -> Settings:
    return Settings(
        api_key="sk-test",
        model="gpt-4o-mini",
        window_turns=None,
        window_tokens=None,
        summarize=False,
        lock_timeout=10.0,
    )


def run(bot: Chatbot, mode: str, text: str, session_id: str) -> str:
    if mode == "sync":
        return bot.chat(text, session_id=session_id).text
    if mode == "async":
        return asyncio.run(bot.achat(text, session_id=session_id)).text
    return "".join(bot.stream(text, session_id=session_id))


def exchange(messages: list[BaseMessage]) -> list[tuple[str, Any]]:
    """What matters of each message: type and text, tool call ids, result ids and status."""
    out: list[tuple[str, Any]] = []
    for m in messages:
        if isinstance(m, AIMessage) and m.tool_calls:
            out.append(("ai", [(c["name"], c["args"], c["id"]) for c in m.tool_calls]))
        elif isinstance(m, ToolMessage):
            out.append(("tool", (m.tool_call_id, m.name, m.status, m.text)))
        else:
            out.append((m.type, m.text))
    return out


@pytest.mark.parametrize("mode", ["sync", "stream", "async"])
def test_the_exchange_is_saved_whole_with_one_entry(store: HistoryStore, mode: str) -> None:
    ask = tool_call_reply(("add", {"a": 1, "b": 2}), ("add", {"a": 5, "b": 5}))
    ids = [call["id"] for call in ask.tool_calls]
    fake = FakeChatModel(model_name="gpt-4o-mini", replies=[ask, "3 and 10"])
    bot = Chatbot(settings(), llm=fake, store=store, tools=[add])
    assert run(bot, mode, "sums?", "s") == "3 and 10"
    assert exchange(store.load("s")) == [
        ("human", "sums?"),
        ("ai", [("add", {"a": 1, "b": 2}, ids[0]), ("add", {"a": 5, "b": 5}, ids[1])]),
        ("tool", (ids[0], "add", "success", "3")),
        ("tool", (ids[1], "add", "success", "10")),
        ("ai", "3 and 10"),
    ]
    (recorded,) = store.usage_entries(session_id="s")
    assert recorded.requests == 2 and recorded.total_tokens > 0
    # The next turn is sent the whole exchange, as saved.
    fake.queue("next")
    bot.chat("and then?", session_id="s")
    assert exchange(fake.calls[-1][1:6]) == exchange(store.load("s", 0, 5))


def test_concurrent_tool_turns_on_one_session_do_not_interleave(store: HistoryStore) -> None:
    def slow_add(a: int, b: int) -> int:
        """Add slowly."""
        threading.Event().wait(0.05)
        return a + b

    def respond(messages: list[BaseMessage]) -> str | AIMessage:
        last = messages[-1]
        if isinstance(last, ToolMessage):
            return f"sum {last.text}"
        n = int(last.text.split()[-1])
        return tool_call_reply(("slow_add", {"a": n, "b": n}))

    bot = Chatbot(settings(), llm=FakeChatModel(respond=respond), store=store, tools=[slow_add])
    threads = [
        threading.Thread(target=bot.chat, args=(f"double {n}",), kwargs={"session_id": "s"})
        for n in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history = store.load("s")
    assert len(history) == 16
    for start in range(0, 16, 4):  # each turn's four messages together, in order
        human, ask, result, final = history[start : start + 4]
        n = int(human.text.split()[-1])
        assert isinstance(ask, AIMessage) and ask.tool_calls[0]["args"] == {"a": n, "b": n}
        assert isinstance(result, ToolMessage) and result.tool_call_id == ask.tool_calls[0]["id"]
        assert final.text == f"sum {2 * n}"


@pytest.mark.parametrize("mode", ["sync", "async", "stream"])
def test_a_tool_turn_that_lost_its_lock_saves_none_of_its_exchange(
    backend: Backend, mode: str
) -> None:
    store, other = backend.store, backend.other

    def stalled(a: int, b: int) -> int:
        """Add, while the turn's lock is lost and another process writes the session."""
        backend.lose(SID)
        with other.lock(SID) as theirs:
            other.commit_turn(SID, turn("other"), entry("other"), fence=theirs)
        return a + b

    fake = FakeChatModel(
        model_name="gpt-4o-mini", replies=[tool_call_reply(("stalled", {"a": 1, "b": 2})), "3"]
    )
    bot = Chatbot(
        Settings(api_key="sk-test", summarize=False, budget_session_tokens=10**9),
        llm=fake,
        store=store,
        tools=[stalled],
    )
    with pytest.raises(SessionLockLostError) as caught:
        run(bot, mode, "late question", SID)
    assert caught.value.reply == "3"
    assert [m.text for m in store.load(SID)] == ["other asks", "other answers"]
    late = [e for e in store.usage_entries(session_id=SID) if e.id != "other"]
    assert len(late) == 1 and late[0].requests == 2  # both calls billed, and recorded
    assert_no_hold(store)
