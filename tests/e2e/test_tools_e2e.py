"""End to end: a Chatbot with tools over the real `ChatOpenAI` and chatchain's test server.

The server scripts the model's tool calls (`ScriptedCall`); the tests check the whole
exchange as saved and metered, and what reaches the endpoint: the tools' schemas on every
path to the model (fallbacks, ``.bind(...)``), and nothing when no tools are given.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from langchain_openai import ChatOpenAI

from chatchain import Chatbot, Settings
from chatchain.testing import OpenAITestServer, ScriptedCall

KEY = "sk-e2e-secret-0123456789abcdef"


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@pytest.fixture(scope="module")
def module_server() -> Iterator[OpenAITestServer]:
    with OpenAITestServer() as server:
        yield server


@pytest.fixture
def server(module_server: OpenAITestServer) -> OpenAITestServer:
    module_server.clear()
    return module_server


def settings(server: OpenAITestServer, **changes: object) -> Settings:
    values: dict[str, object] = {
        "api_key": KEY,
        "base_url": server.base_url,
        "model": "gpt-4o-mini",
        "max_retries": 0,
        "timeout": 5.0,
        "summarize": False,
    }
    values.update(changes)
    return Settings(**values)  # type: ignore[arg-type]


def sent_tools(server: OpenAITestServer) -> list[str]:
    body = server.requests[-1]["body"]
    return [tool["function"]["name"] for tool in body.get("tools", [])]


@pytest.mark.parametrize("mode", ["sync", "stream", "async"])
def test_chatopenai_is_sent_the_tools(server: OpenAITestServer, mode: str) -> None:
    bot = Chatbot(settings(server, fallback_model="gpt-4.1-nano"), tools=[add])
    if mode == "sync":
        text = bot.chat("hi", session_id="s").text
    elif mode == "stream":
        text = "".join(bot.stream("hi", session_id="s"))
    else:
        text = asyncio.run(bot.achat("hi", session_id="s")).text
    assert text == "Echo: hi"
    assert sent_tools(server) == ["add"]
    schema = server.requests[-1]["body"]["tools"][0]["function"]
    assert schema["description"] == "Add two numbers."
    assert sorted(schema["parameters"]["properties"]) == ["a", "b"]
    assert [m.type for m in bot.history("s")] == ["human", "ai"]
    assert bot.usage("s").successful_requests == 1


def test_a_bound_model_keeps_its_arguments_and_gets_the_tools(server: OpenAITestServer) -> None:
    model = ChatOpenAI(
        model="gpt-4o-mini", api_key=KEY, base_url=server.base_url, max_retries=0
    ).bind(stop=["never-seen"])
    bot = Chatbot(settings(server), llm=model, tools=[add])
    bot.chat("hi", session_id="s")
    body = server.requests[-1]["body"]
    assert body["stop"] == ["never-seen"]
    assert sent_tools(server) == ["add"]


def test_without_tools_none_are_sent(server: OpenAITestServer) -> None:
    Chatbot(settings(server)).chat("hi", session_id="s")
    assert "tools" not in server.requests[-1]["body"]


@pytest.mark.parametrize("mode", ["sync", "stream", "async"])
def test_chatopenai_runs_a_parallel_tool_step_end_to_end(
    server: OpenAITestServer, mode: str
) -> None:
    server.queue_tool_calls(
        ScriptedCall("add", {"a": 1, "b": 2}, id="call_one"),
        ScriptedCall("add", {"a": 5, "b": 5}, id="call_two"),
    )
    server.queue_replies("3 and 10")
    bot = Chatbot(settings(server), tools=[add])
    if mode == "sync":
        text = bot.chat("sums?", session_id="s").text
    elif mode == "stream":
        text = "".join(bot.stream("sums?", session_id="s"))
    else:
        text = asyncio.run(bot.achat("sums?", session_id="s")).text
    assert text == "3 and 10"
    history = bot.history("s")
    assert [m.type for m in history] == ["human", "ai", "tool", "tool", "ai"]
    assert [c["id"] for c in history[1].tool_calls] == ["call_one", "call_two"]  # type: ignore[attr-defined]
    assert [(m.tool_call_id, m.content) for m in history[2:4]] == [  # type: ignore[attr-defined]
        ("call_one", "3"),
        ("call_two", "10"),
    ]
    # The second request carried the calls and their results, in OpenAI's format.
    sent = server.requests[-1]["body"]["messages"]
    assert [m["role"] for m in sent[-3:]] == ["assistant", "tool", "tool"]
    assert [m["tool_call_id"] for m in sent[-2:]] == ["call_one", "call_two"]
    usage = bot.usage("s")
    assert usage.successful_requests == 2 and usage.turns == 1
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
