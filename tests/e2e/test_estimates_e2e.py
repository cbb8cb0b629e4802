"""Streamed usage end to end: asked of the endpoint, and marked as estimated when it never comes.

An endpoint that sends no usage chunk (mockllm, here ``OpenAITestServer(stream_usage=False)``)
leaves chatchain to count a streamed turn's tokens itself; every place that shows that usage
says so. A user's own `ChatOpenAI`, built without ``stream_usage``, is asked for usage all the
same (through a copy: the user's object is not changed).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_openai import ChatOpenAI

from chatchain import Chatbot, Settings, get_openai_callback
from chatchain.cli._render import usage_line
from chatchain.errors import EndpointConnectionError
from chatchain.testing import Fault, OpenAITestServer, ScriptedCall, echo_reply

KEY = "sk-e2e-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAITestServer]:
    with OpenAITestServer() as server:
        yield server


@pytest.fixture(scope="module")
def mute_server() -> Iterator[OpenAITestServer]:
    """An endpoint that never reports usage when streaming, as mockllm."""
    with OpenAITestServer(stream_usage=False) as server:
        yield server


def make_settings(server: OpenAITestServer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_key": KEY,
        "base_url": server.base_url,
        "model": "gpt-4o-mini",
        "max_retries": 0,
        "timeout": 5.0,
        "summarize": False,
    }
    values.update(overrides)
    return Settings(**values)


def users_model(server: OpenAITestServer) -> ChatOpenAI:
    """A `ChatOpenAI` as a user builds it for a local server: without ``stream_usage``."""
    return ChatOpenAI(model="gpt-4o-mini", api_key=KEY, base_url=server.base_url, max_retries=0)  # type: ignore[arg-type]


def billed(server: OpenAITestServer, request: dict[str, Any]) -> tuple[int, int]:
    """The prompt and completion tokens the server counts for one request."""
    messages = request["body"]["messages"]
    prompt = sum(server.count_tokens(m["content"]) + 4 for m in messages) + 3
    return prompt, server.count_tokens(echo_reply(messages))


def test_streams_without_a_usage_chunk_are_marked_estimated_wherever_shown(
    mute_server: OpenAITestServer,
) -> None:
    bot = Chatbot(make_settings(mute_server))
    reply = bot.chat("counted by the endpoint", session_id="s")
    with bot.stream("counted here", session_id="s") as stream:
        assert "".join(stream) == "Echo: counted here"

    async def astream() -> str:
        return "".join([piece async for piece in bot.astream("async too", session_id="s")])

    assert asyncio.run(astream()) == "Echo: async too"

    assert reply.usage.estimated == 0  # a plain reply always carries its usage
    assert "estimated" not in str(reply.usage)
    assert stream.usage is not None and stream.usage.estimated == 1
    assert stream.usage.total_tokens > 0
    assert "(estimated)" in str(stream.usage)
    line = usage_line(stream.usage).plain
    assert line.startswith(f"~{stream.usage.total_tokens} tokens (") and "), estimated, " in line
    assert "~$" in line  # the cost is as much an estimate as the tokens

    entries = bot.usage_entries(session_id="s")
    assert [e.estimated for e in entries] == [False, True, True]
    report = bot.usage_report(by=["session"])
    assert report.rows[0]["estimated"] == 2
    assert report.total.estimated == 2
    assert "~ estimated: 2 calls were counted here" in str(report)
    bot.close()


def test_a_users_own_chat_openai_is_asked_for_usage_and_left_unchanged(
    server: OpenAITestServer,
) -> None:
    model = users_model(server)
    client = model.root_async_client
    bot = Chatbot(make_settings(server), llm=model)
    server.clear()

    streamed = "".join(bot.stream("hello there", session_id="u"))
    stream = bot.astream("and again", session_id="u")

    async def drain() -> str:
        return "".join([piece async for piece in stream])

    assert (streamed, asyncio.run(drain())) == ("Echo: hello there", "Echo: and again")

    first, second = server.requests
    for request in (first, second):
        assert request["body"]["stream_options"] == {"include_usage": True}
    entries = bot.usage_entries(session_id="u")
    assert [e.estimated for e in entries] == [False, False]
    assert [(e.prompt_tokens, e.completion_tokens) for e in entries] == [
        billed(server, first),
        billed(server, second),
    ]
    assert stream.usage is not None and stream.usage.estimated == 0
    assert (model.stream_usage, model.root_async_client) == (None, client)  # not mutated
    bot.close()


@pytest.mark.parametrize("own_model", [False, True], ids=["settings-model", "users-model"])
def test_the_users_get_openai_callback_counts_a_streamed_turn(
    server: OpenAITestServer, own_model: bool
) -> None:
    llm = users_model(server) if own_model else None
    bot = Chatbot(make_settings(server), llm=llm)
    server.clear()
    with get_openai_callback() as cb:
        stream = bot.stream("count me", session_id="cb")
        assert "".join(stream) == "Echo: count me"
    assert stream.usage is not None
    assert cb.total_tokens == stream.usage.total_tokens == sum(billed(server, server.requests[0]))
    assert cb.successful_requests == 1
    bot.close()


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def tool_turn(bot: Chatbot, path: str, session_id: str) -> None:
    """A turn that calls ``add`` once, then answers, streamed on ``path``; its cut ends it."""
    text = "What is 2 + 3?"
    with pytest.raises(EndpointConnectionError):
        if path == "stream":
            "".join(bot.stream(text, session_id=session_id))
        else:

            async def drain() -> str:
                return "".join([p async for p in bot.astream(text, session_id=session_id)])

            asyncio.run(drain())


def billed_with_tools(server: OpenAITestServer, request: dict[str, Any]) -> int:
    """The prompt tokens the server bills for a request with tools and tool messages."""
    body = request["body"]
    messages = body["messages"]
    prompt = 3 + sum(server.count_tokens(m.get("content") or "") + 4 for m in messages)
    prompt += sum(
        server.count_tokens(json.dumps(m["tool_calls"])) for m in messages if m.get("tool_calls")
    )
    return prompt + server.count_tokens(json.dumps(body["tools"]))


@pytest.mark.parametrize("path", ["stream", "astream"])
def test_a_stream_cut_after_a_tool_round_records_every_call(
    server: OpenAITestServer, path: str
) -> None:
    """The tool round reported its usage; the answer's stream was cut before its usage chunk:
    both calls are in the ledger, the second one estimated (not left out)."""
    server.clear()
    bot = Chatbot(make_settings(server), tools=[add])
    server.queue_tool_calls(ScriptedCall("add", {"a": 2, "b": 3}))
    server.queue_replies("The sum of two and three is five, as the tool said.")
    server.add_fault(Fault())  # the tool round: answered in full, usage included
    server.add_fault(Fault(cut_after=3))  # the answer: cut before its usage chunk
    tool_turn(bot, path, f"cut-{path}")

    first, second = server.requests
    (entry,) = bot.usage_entries(session_id=f"cut-{path}")
    assert entry.estimated
    assert entry.requests == 2  # two requests reached the endpoint
    # At least what the server billed the two prompts: the second was counted here.
    assert entry.prompt_tokens >= billed_with_tools(server, first) + billed_with_tools(
        server, second
    )
    assert entry.completion_tokens > 0
    bot.close()


def test_tool_rounds_without_usage_are_each_estimated(mute_server: OpenAITestServer) -> None:
    """An endpoint that never reports usage when streaming: every call of the turn counted."""
    mute_server.clear()
    bot = Chatbot(make_settings(mute_server), tools=[add])
    mute_server.queue_tool_calls(ScriptedCall("add", {"a": 2, "b": 3}))
    mute_server.queue_tool_calls(ScriptedCall("add", {"a": 5, "b": 5}))
    mute_server.queue_replies("Ten.")
    with bot.stream("What is 2 + 3 + 5?", session_id="mute-tools") as stream:
        assert "".join(stream) == "Ten."
    requests = mute_server.requests
    (entry,) = bot.usage_entries(session_id="mute-tools")
    assert entry.estimated and entry.requests == len(requests) == 3
    assert entry.prompt_tokens >= sum(billed_with_tools(mute_server, r) for r in requests)
    bot.close()


@pytest.mark.parametrize("path", ["stream", "astream"])
def test_the_users_get_openai_callback_sees_the_estimate(
    mute_server: OpenAITestServer, path: str
) -> None:
    """The endpoint sends no usage: the caller's get_openai_callback sees what the ledger has."""
    bot = Chatbot(make_settings(mute_server))
    session = f"cb-{path}"
    with get_openai_callback() as cb:
        if path == "stream":
            assert "".join(bot.stream("count me here", session_id=session))
        else:

            async def drain() -> str:
                return "".join([p async for p in bot.astream("count me", session_id=session)])

            assert asyncio.run(drain())
    (entry,) = bot.usage_entries(session_id=session)
    assert entry.estimated and entry.total_tokens > 0
    assert (cb.prompt_tokens, cb.completion_tokens) == (
        entry.prompt_tokens,
        entry.completion_tokens,
    )
    assert cb.total_tokens == entry.total_tokens
    assert cb.successful_requests == entry.requests == 1
    assert cb.total_cost > 0  # priced by its own table, as every call it counts
    bot.close()


def test_the_callback_sees_a_cut_stream_after_a_tool_round(server: OpenAITestServer) -> None:
    server.clear()
    bot = Chatbot(make_settings(server), tools=[add])
    server.queue_tool_calls(ScriptedCall("add", {"a": 2, "b": 3}))
    server.queue_replies("The sum of two and three is five, as the tool said.")
    server.add_fault(Fault())
    server.add_fault(Fault(cut_after=3))
    with get_openai_callback() as cb:
        tool_turn(bot, "stream", "cb-cut")
    (entry,) = bot.usage_entries(session_id="cb-cut")
    assert cb.total_tokens == entry.total_tokens
    assert cb.successful_requests == entry.requests == 2
    bot.close()


def test_a_callback_in_the_runs_config_sees_the_estimate_once(
    mute_server: OpenAITestServer,
) -> None:
    bot = Chatbot(make_settings(mute_server))
    config: Any = {"configurable": {"session_id": "cb-config"}}
    with get_openai_callback() as cb:
        config["callbacks"] = [cb]  # also the context's handler: counted once all the same
        assert "".join(
            str(chunk.content) for chunk in bot.chain.stream({"input": "hi there"}, config=config)
        )
    (entry,) = bot.usage_entries(session_id="cb-config")
    assert cb.total_tokens == entry.total_tokens > 0
    bot.close()
