"""`Chatbot.chat_messages` and its twins: a whole conversation sent as it is, nothing stored,
the reply built by the facade (tool calls kept), metered under the call's own session id."""

from __future__ import annotations

import asyncio

from langchain_core.messages import HumanMessage, SystemMessage

from chatchain import Chatbot
from chatchain.testing import FakeChatModel, tool_call_reply


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def test_the_reply_keeps_its_tool_calls_and_nothing_is_stored() -> None:
    fake = FakeChatModel(replies=[tool_call_reply(("add", {"a": 1, "b": 2})), "3"])
    bot = Chatbot(llm=fake, tools=[add])

    reply = bot.chat_messages([HumanMessage("1+2?")], session_id="call-1", user_id="ann")

    assert reply.text == "3"
    assert [(call.name, call.args, call.result) for call in reply.tool_runs] == [
        ("add", {"a": 1, "b": 2}, "3")
    ]
    assert bot.history("call-1") == []
    assert bot.usage("call-1", user_id="ann").turns == 1


def test_the_async_twins_send_the_messages_as_they_are() -> None:
    fake = FakeChatModel()
    bot = Chatbot(llm=fake, system="The deployment's prompt.")
    asked = [SystemMessage("Talk like a pirate."), HumanMessage("hi")]

    async def both() -> tuple[str, str]:
        reply = await bot.achat_messages(asked, session_id="call-2")
        stream = bot.astream_messages(asked, session_id="call-3")
        return reply.text, "".join([piece async for piece in stream])

    assert asyncio.run(both()) == ("Echo: hi", "Echo: hi")
    assert [[m.content for m in call] for call in fake.calls] == [
        ["Talk like a pirate.", "hi"],
        ["Talk like a pirate.", "hi"],
    ]
    assert bot.history("call-2") == bot.history("call-3") == []
    assert "".join(bot.stream_messages(asked, session_id="call-4")) == "Echo: hi"
