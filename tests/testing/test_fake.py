"""Tests for `FakeChatModel`'s tools: bind_tools, scripted tool calls, streamed call chunks."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool

from chatchain.testing import FakeChatModel, tool_call_reply


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@tool
def shout(text: str) -> str:
    """Say it loud."""
    return text.upper()


def merged(chunks: list[Any]) -> AIMessageChunk:
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    assert isinstance(total, AIMessageChunk)
    return total


def test_bind_tools_sends_langchain_schemas_of_functions_and_tools() -> None:
    model = FakeChatModel()
    model.bind_tools([add, shout]).invoke("hi")
    model.invoke("no tools")
    assert model.tools_of_calls == [
        [convert_to_openai_tool(add), convert_to_openai_tool(shout)],
        [],
    ]
    assert model.tools_of_calls[0][0]["function"]["name"] == "add"
    assert model.tools_of_calls[0][0]["function"]["description"] == "Add two numbers."


def test_scripted_parallel_tool_calls_then_final_text() -> None:
    model = FakeChatModel(
        replies=[tool_call_reply(("add", {"a": 1, "b": 2}), ("shout", {"text": "hi"})), "Done."]
    )
    bound = model.bind_tools([add, shout])
    first = bound.invoke("go")
    assert [(call["name"], call["args"]) for call in first.tool_calls] == [
        ("add", {"a": 1, "b": 2}),
        ("shout", {"text": "hi"}),
    ]
    ids = [call["id"] for call in first.tool_calls]
    assert all(isinstance(i, str) and i.startswith("call_") for i in ids)
    assert len(set(ids)) == 2
    assert first.response_metadata["finish_reason"] == "tool_calls"
    results = [ToolMessage("3", tool_call_id=ids[0]), ToolMessage("HI", tool_call_id=ids[1])]
    final = bound.invoke([HumanMessage("go"), first, *results])
    assert final.content == "Done."
    assert final.tool_calls == []
    assert final.response_metadata["finish_reason"] == "stop"


def test_scripted_message_without_ids_gets_fresh_ones() -> None:
    script = AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1, "b": 1}, "id": None}])
    model = FakeChatModel(replies=[script, script])
    bound = model.bind_tools([add])
    one, two = bound.invoke("x").tool_calls[0]["id"], bound.invoke("y").tool_calls[0]["id"]
    assert one and two and one != two


def test_tool_usage_counts_the_tool_schemas_and_the_calls() -> None:
    model = FakeChatModel(replies=[tool_call_reply(("add", {"a": 1, "b": 2})), "same"])
    with_tools = model.bind_tools([add]).invoke("same")
    without = model.invoke("same")
    assert with_tools.usage_metadata is not None and without.usage_metadata is not None
    assert with_tools.usage_metadata["input_tokens"] > without.usage_metadata["input_tokens"]
    assert with_tools.usage_metadata["output_tokens"] > 0


def test_a_call_without_tools_never_gets_tool_calls() -> None:
    model = FakeChatModel(
        replies=[
            tool_call_reply(("add", {"a": 1, "b": 2})),
            tool_call_reply(("add", {"a": 1, "b": 2}), text="I would add."),
        ]
    )
    echo = model.invoke("plain")
    assert echo.tool_calls == [] and echo.content == "Echo: plain"
    text = model.invoke("plain")
    assert text.tool_calls == [] and text.content == "I would add."


def test_respond_can_script_tool_calls_from_the_messages() -> None:
    def respond(messages: list[Any]) -> str | AIMessage:
        if messages[-1].type == "tool":
            return f"The tool said {messages[-1].content}."
        return tool_call_reply(("add", {"a": 2, "b": 2}))

    model = FakeChatModel(respond=respond)
    bound = model.bind_tools([add])
    ask = bound.invoke("2+2")
    answer = bound.invoke([ask, ToolMessage("4", tool_call_id=ask.tool_calls[0]["id"])])
    assert answer.content == "The tool said 4."


def test_made_up_tool_names_are_passed_through() -> None:
    model = FakeChatModel(replies=[tool_call_reply(("no_such_tool", {"x": 1}))])
    assert model.bind_tools([add]).invoke("x").tool_calls[0]["name"] == "no_such_tool"


def test_streamed_tool_calls_arrive_as_call_chunks_that_merge() -> None:
    model = FakeChatModel(
        replies=[
            tool_call_reply(
                ("add", {"a": 1, "b": 2}), ("shout", {"text": "hi"}), text="Let me check."
            )
        ]
    )
    chunks = list(model.bind_tools([add, shout]).stream("go"))
    with_calls = [chunk for chunk in chunks if chunk.tool_call_chunks]
    assert len(with_calls) == 4  # two pieces per call
    assert {c.tool_call_chunks[0]["index"] for c in with_calls} == {0, 1}
    total = merged(chunks)
    assert total.content == "Let me check."
    assert [(call["name"], call["args"]) for call in total.tool_calls] == [
        ("add", {"a": 1, "b": 2}),
        ("shout", {"text": "hi"}),
    ]
    assert total.response_metadata["finish_reason"] == "tool_calls"
    assert total.usage_metadata is not None and total.usage_metadata["output_tokens"] > 0


async def test_astream_and_ainvoke_script_tool_calls() -> None:
    model = FakeChatModel(
        replies=[tool_call_reply(("add", {"a": 1, "b": 2})), tool_call_reply(("shout", {}))]
    )
    bound = model.bind_tools([add, shout])
    chunks = [chunk async for chunk in bound.astream("go")]
    assert merged(chunks).tool_calls[0]["args"] == {"a": 1, "b": 2}
    assert (await bound.ainvoke("go")).tool_calls[0]["name"] == "shout"


def test_max_tokens_still_cuts_text_and_caps_usage_with_tools() -> None:
    model = FakeChatModel(replies=[tool_call_reply(("add", {"a": 1, "b": 2}), text="x" * 100)])
    reply = model.bind_tools([add]).bind(max_tokens=2).invoke("go")
    assert reply.content == "x" * 8
    assert reply.response_metadata["finish_reason"] == "length"
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] == 2
    assert model.bind(max_tokens=2).invoke("Cut me short").content == "Echo: Cu"


def test_fail_after_chunks_can_cut_a_stream_in_a_tool_call() -> None:
    model = FakeChatModel(replies=[tool_call_reply(("add", {"a": 1, "b": 2}))], fail_after_chunks=1)
    seen = []
    with pytest.raises(httpx.RemoteProtocolError):
        for chunk in model.bind_tools([add]).stream("go"):
            seen.append(chunk)
    assert len(seen) == 1 and seen[0].tool_call_chunks[0]["name"] == "add"


def test_echo_is_unchanged_with_tools_bound() -> None:
    model = FakeChatModel()
    assert model.bind_tools([add]).invoke("hello").content == "Echo: hello"
    assert "".join(str(c.content) for c in model.bind_tools([add]).stream("a b")) == "Echo: a b"
