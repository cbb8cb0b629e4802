"""Structured turns and tool exchanges on every store: what is kept, what is sent."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from pydantic import BaseModel

from chatchain import Chatbot, Settings, StructuredReplyError
from chatchain.stores import HistoryStore
from chatchain.testing import FakeChatModel


class City(BaseModel):
    name: str
    population: int


def settings(**values: object) -> Settings:
    return Settings(api_key="sk-test", model="gpt-4o-mini", lock_timeout=5.0, **values)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_structured_turn_stores_its_json_and_a_bad_one_nothing(
    store: HistoryStore, mode: str
) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(settings(), llm=fake, store=store)

    def chat(text: str) -> City | None:
        if mode == "sync":
            reply = bot.chat(text, session_id="s", schema=City)
        else:
            reply = asyncio.run(bot.achat(text, session_id="s", schema=City))
        assert reply.parsed is None or isinstance(reply.parsed, City)
        return reply.parsed

    fake.queue('{"name": "Oslo", "population": 709000}')
    assert chat("Capital of Norway?") == City(name="Oslo", population=709000)
    fake.queue('{"name": "Bergen"}')
    with pytest.raises(StructuredReplyError):
        chat("Second city?")
    assert [m.text for m in store.load("s")] == [
        "Capital of Norway?",
        '{"name":"Oslo","population":709000}',
    ]
    assert bot.usage("s").turns == 2  # the bad reply was metered, not stored


def test_the_window_over_a_stored_tool_exchange_sends_whole_turns(store: HistoryStore) -> None:
    call = {"name": "lookup", "args": {}, "id": "c1", "type": "tool_call"}
    turns: list[BaseMessage] = []
    for i in range(4):
        turns += [
            HumanMessage(f"q{i}"),
            AIMessage("", tool_calls=[{**call, "id": f"c{i}a"}, {**call, "id": f"c{i}b"}]),
            ToolMessage("ra", tool_call_id=f"c{i}a"),
            ToolMessage("rb", tool_call_id=f"c{i}b"),
            AIMessage(f"a{i}"),
        ]
    store.append("s", turns)
    fake = FakeChatModel()
    # A window of 3 turns is 6 messages: it would open on a tool result of turn 3.
    bot = Chatbot(
        settings(window_turns=3, window_tokens=None, summarize=False), llm=fake, store=store
    )
    bot.chat("q4", session_id="s")
    sent = [m.type for m in fake.calls[-1]]
    assert sent == ["system", "human", "ai", "tool", "tool", "ai", "human"]
    assert fake.calls[-1][1].text == "q3"
