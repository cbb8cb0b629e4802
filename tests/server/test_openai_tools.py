"""Client tools and structured output on ``POST /v1/chat/completions``: the official
``openai`` SDK and ``ChatOpenAI`` against the app (in this process), whose model is the real
``ChatOpenAI`` over an `OpenAITestServer`: tool calls returned, streamed as deltas, results
accepted stateless and with ``X-Session-Id`` (the exchange stored whole), ``response_format``
passed and checked, and a deployment with tools of its own refusing a client's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from chatchain import Chatbot, Settings
from chatchain.server import create_app
from chatchain.stores import MemoryStore
from chatchain.testing import OpenAITestServer
from chatchain.users import Users

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CITY_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["name", "population"],
    "additionalProperties": False,
}
CITY = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}


@pytest.fixture(scope="module")
def endpoint() -> Iterator[OpenAITestServer]:
    with OpenAITestServer() as server:
        yield server


@pytest.fixture
def model(endpoint: OpenAITestServer) -> Iterator[OpenAITestServer]:
    yield endpoint
    endpoint.clear()


def _app(endpoint: OpenAITestServer, tools: list[Any] | None = None) -> tuple[Chatbot, Any, str]:
    settings = Settings(
        api_key="sk-test",
        base_url=endpoint.base_url,
        model="gpt-4o-mini",
        max_retries=0,
        server_requests_per_minute=0,
    )
    users = Users(MemoryStore())
    bot = Chatbot(settings, store=users.store, system="Be kind.", tools=tools)
    return bot, create_app(bot, users=users), users.add("ann")


@pytest.fixture
def app(model: OpenAITestServer) -> Iterator[tuple[Chatbot, TestClient]]:
    bot, app, token = _app(model)
    with TestClient(app, raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        yield bot, client


@pytest.fixture
def sdk(app: tuple[Chatbot, TestClient]) -> Any:
    """``sdk(session_id=None)``: the ``openai`` SDK over the app (its transport the app's)."""
    _, client = app

    def make(session_id: str | None = None) -> openai.OpenAI:
        headers = {"X-Session-Id": session_id} if session_id else None
        return openai.OpenAI(
            base_url="http://testserver/v1",
            api_key=str(client.headers["Authorization"]).removeprefix("Bearer "),
            http_client=client,
            default_headers=headers,
            max_retries=0,
        )

    return make


def _ask(client: openai.OpenAI, messages: list[Any], **fields: Any) -> Any:
    return client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, tools=[WEATHER], **fields
    )


USER = [{"role": "user", "content": "Weather in Oslo?"}]


def test_stateless_the_call_comes_back_and_the_results_are_sent_as_they_are(
    sdk: Any, model: OpenAITestServer
) -> None:
    model.add_tool_rule("weather", {"city": "Oslo"})
    client = sdk()
    first = _ask(client, USER, tool_choice="auto", parallel_tool_calls=False)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "weather",
        {"city": "Oslo"},
    )
    sent = model.requests[-1]["body"]
    assert sent["tools"] == [WEATHER] and sent["tool_choice"] == "auto"
    assert sent["parallel_tool_calls"] is False

    history = [*USER, choice.message.model_dump(exclude_none=True)]
    history.append({"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"})
    second = _ask(client, history)

    assert second.choices[0].finish_reason == "stop"
    assert "sunny, 21 C" in second.choices[0].message.content
    roles = [m["role"] for m in model.requests[-1]["body"]["messages"]]
    assert roles == ["user", "assistant", "tool"]
    assert model.requests[-1]["body"]["messages"][1]["tool_calls"][0]["id"] == call.id


def test_with_a_session_the_exchange_is_stored_whole(
    sdk: Any, model: OpenAITestServer, app: tuple[Chatbot, TestClient]
) -> None:
    bot, client = app
    model.add_tool_rule("weather", {"city": "Oslo"})
    sdk_client = sdk("trip")
    first = _ask(sdk_client, USER)
    (call,) = first.choices[0].message.tool_calls
    # The client sends its whole history back; with the header only the trailing tool
    # messages are the turn.
    history = [*USER, first.choices[0].message.model_dump(exclude_none=True)]
    history.append({"role": "tool", "tool_call_id": call.id, "content": "sunny"})
    second = _ask(sdk_client, history)

    assert "sunny" in second.choices[0].message.content
    sent = model.requests[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool"]
    stored = client.get("/v1/sessions/trip/messages").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]
    assert len(bot.usage_entries()) == 2  # each request metered


def test_with_a_session_results_that_answer_no_call_are_a_400(
    sdk: Any, model: OpenAITestServer
) -> None:
    model.add_tool_rule("weather", {"city": "Oslo"})
    client = sdk("s2")
    _ask(client, USER)
    calls = len(model.requests)
    wrong = [*USER, {"role": "tool", "tool_call_id": "call_nope", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match="answer the calls"):
        _ask(client, wrong)
    assert len(model.requests) == calls


def test_streamed_calls_come_as_tool_call_deltas(sdk: Any, model: OpenAITestServer) -> None:
    model.add_tool_rule("weather", {"city": "Oslo"})
    chunks = list(_ask(sdk("s3"), USER, stream=True, stream_options={"include_usage": True}))
    deltas = [
        c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls
    ]
    first = deltas[0][0]
    assert first.index == 0 and first.id and first.type == "function"
    assert first.function.name == "weather"
    arguments = "".join(d[0].function.arguments or "" for d in deltas)
    assert json.loads(arguments) == {"city": "Oslo"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_chat_openai_binds_tools_and_runs_the_loop_through_chatchain(
    app: tuple[Chatbot, TestClient], model: OpenAITestServer
) -> None:
    _, client = app

    @tool
    def weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    llm = ChatOpenAI(
        model="gpt-4o-mini",
        base_url="http://testserver/v1",
        api_key=str(client.headers["Authorization"]).removeprefix("Bearer "),
        http_client=client,
        max_retries=0,
    ).bind_tools([weather], tool_choice="weather")
    asked = [HumanMessage("Weather in Oslo?")]
    reply = llm.invoke(asked)
    # Forced: the test server makes arguments that fit the parameters.
    assert isinstance(reply, AIMessage) and reply.tool_calls[0]["args"] == {"city": "text"}
    forced = model.requests[-1]["body"]["tool_choice"]
    assert forced == {"type": "function", "function": {"name": "weather"}}
    result = weather.invoke(reply.tool_calls[0])
    assert isinstance(result, ToolMessage)
    final = llm.bind(tool_choice="none").invoke([*asked, reply, result])
    assert "sunny in text" in final.text


class City(BaseModel):
    name: str
    population: int


def test_chat_openai_structured_output_through_chatchain(
    app: tuple[Chatbot, TestClient], model: OpenAITestServer
) -> None:
    _, client = app
    llm = ChatOpenAI(
        model="gpt-4o-mini",
        base_url="http://testserver/v1",
        api_key=str(client.headers["Authorization"]).removeprefix("Bearer "),
        http_client=client,
        max_retries=0,
    )
    model.queue_json({"name": "Oslo", "population": 709000})
    assert llm.with_structured_output(City).invoke("Capital of Norway?") == City(
        name="Oslo", population=709000
    )
    assert model.requests[-1]["body"]["response_format"]["type"] == "json_schema"
    model.queue_json({"name": "Oslo", "population": 1})
    answer = llm.with_structured_output(City, method="function_calling").invoke("Oslo?")
    assert answer == City(name="Oslo", population=1)


@pytest.mark.parametrize("session", [None, "s4"])
def test_a_json_schema_reply_is_checked(
    sdk: Any, model: OpenAITestServer, session: str | None
) -> None:
    client = sdk(session)
    model.queue_json({"name": "Oslo", "population": 709000})
    fits = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Oslo?"}], response_format=CITY
    )
    assert json.loads(fits.choices[0].message.content)["population"] == 709000
    assert model.requests[-1]["body"]["response_format"] == CITY

    model.queue_replies('{"name": "Oslo"}')
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Oslo?"}],
            response_format=CITY,
        )
    assert "population" in caught.value.message
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_a_json_object_format_is_passed(sdk: Any, model: OpenAITestServer) -> None:
    model.queue_replies('{"ok": true}')
    reply = sdk().chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "JSON please"}],
        response_format={"type": "json_object"},
    )
    assert reply.choices[0].message.content == '{"ok": true}'
    assert model.requests[-1]["body"]["response_format"] == {"type": "json_object"}


def test_a_deployment_with_tools_of_its_own_refuses_a_clients(model: OpenAITestServer) -> None:
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    _, app, token = _app(model, tools=[add])
    with TestClient(app, raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        body = {"model": "gpt-4o-mini", "messages": USER, "tools": [WEATHER]}
        answer = client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 400
        assert "tools of its own" in answer.json()["error"]["message"]
        assert model.requests == []
