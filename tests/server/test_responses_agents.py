"""The OpenAI Agents SDK with its default model (the Responses API) pointed at a real
``chatchain serve`` (uvicorn on 127.0.0.1, a SQLite store, the package's OpenAITestServer as
the model), and the ``openai`` SDK's ``client.responses`` over the same service: a plain run,
``previous_response_id`` continuing the conversation, streamed events with usage, another
user's response id refused."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import closing
from typing import Any, TypeVar

import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    Runner,
    function_tool,
    set_default_openai_api,
    set_default_openai_client,
    set_tracing_disabled,
)
from agents.models import get_default_model
from pydantic import BaseModel

from chatchain.server._responses import ResponseId
from chatchain.stores import open_store
from chatchain.testing import OpenAITestServer
from tests.server.conftest import Service, start_service

# Slow: a real `chatchain serve` process (uvicorn) per module.
pytestmark = pytest.mark.slow

T = TypeVar("T")


@pytest.fixture(scope="module")
def service(
    endpoint: OpenAITestServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """The module's service, which also serves the Agents SDK's default model (a model the
    operator does not list is 404 model_not_found)."""
    folder = tmp_path_factory.mktemp("service")
    env = {
        "CHATCHAIN_MAX_RETRIES": "0",
        "CHATCHAIN_TIMEOUT": "2",
        "CHATCHAIN_LOCK_TIMEOUT": "1",
        "CHATCHAIN_SERVER_MODELS": get_default_model(),
    }
    running = start_service(f"sqlite:///{folder / 'chat.db'}", endpoint, folder, env=env)
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _no_tracing() -> None:
    set_tracing_disabled(True)  # traces would go to OpenAI: there is no network here
    set_default_openai_api("responses")  # the Agents SDK's default, said out loud


def _run(service: Service, token: str, work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work`` with the Agents SDK's default client pointed at the service as ``token``
    (a client per event loop: an AsyncOpenAI belongs to the loop it was first used on)."""

    async def main() -> T:
        client = openai.AsyncOpenAI(
            base_url=f"{service.url}/v1", api_key=token, max_retries=0, timeout=30
        )
        set_default_openai_client(client, use_for_tracing=False)
        try:
            return await work()
        finally:
            await client.close()

    return asyncio.run(main())


def _agent(**fields: Any) -> Agent[Any]:
    return Agent(name="helper", instructions="Answer briefly.", **fields)  # the default model


def _session(response_id: str) -> str:
    parsed = ResponseId.parse(response_id)
    assert parsed is not None, response_id
    return parsed.session_id


def _history(service: Service, user: str, response_id: str) -> list[tuple[str, str]]:
    with closing(open_store(service.store_url)) as store:
        return [(m.type, m.text) for m in store.load(f"{user}:{_session(response_id)}")]


def test_a_plain_run_and_previous_response_id_continue_the_conversation(
    service: Service, endpoint: OpenAITestServer, user: tuple[str, str]
) -> None:
    name, token = user
    endpoint.queue_replies("Hello Ann.", "You are Ann.")

    async def work() -> tuple[Any, Any]:
        first = await Runner.run(_agent(), "I am Ann.")
        second = await Runner.run(
            _agent(), "Who am I?", previous_response_id=first.last_response_id
        )
        return first, second

    first, second = _run(service, token, work)
    assert (first.final_output, second.final_output) == ("Hello Ann.", "You are Ann.")
    assert second.last_response_id is not None
    # One conversation, one session: the second response continued the first's.
    assert _session(second.last_response_id) == _session(first.last_response_id)
    # The second call sent the stored conversation, after the deployment's system prompt.
    sent = [(m["role"], m["content"]) for m in endpoint.requests[-1]["body"]["messages"]]
    assert sent[1:] == [
        ("user", "I am Ann."),
        ("assistant", "Hello Ann."),
        ("user", "Who am I?"),
    ]
    assert _history(service, name, second.last_response_id) == [
        ("human", "I am Ann."),
        ("ai", "Hello Ann."),
        ("human", "Who am I?"),
        ("ai", "You are Ann."),
    ]


def test_a_streamed_run_sends_the_text_and_the_usage(
    service: Service, endpoint: OpenAITestServer, user: tuple[str, str]
) -> None:
    _, token = user
    endpoint.queue_replies("one two three")

    async def work() -> tuple[list[str], Any]:
        result = Runner.run_streamed(_agent(), "Count to three.")
        kinds = [
            event.data.type
            async for event in result.stream_events()
            if event.type == "raw_response_event"
        ]
        return kinds, result

    kinds, result = _run(service, token, work)
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    assert result.final_output == "one two three"
    usage = result.context_wrapper.usage
    assert usage.requests == 1
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city.

    Args:
        city: The city's name.
    """
    return f"sunny in {city}"


@pytest.mark.parametrize("chained", [False, True], ids=["history", "previous_response_id"])
def test_a_function_tool_with_tool_choice_required(
    service: Service,
    endpoint: OpenAITestServer,
    user: tuple[str, str],
    chained: bool,
) -> None:
    name, token = user
    agent = _agent(tools=[get_weather], model_settings=ModelSettings(tool_choice="required"))

    async def work() -> Any:
        return await Runner.run(agent, "Weather in Oslo?", auto_previous_response_id=chained)

    result = _run(service, token, work)
    # A forced choice is answered with arguments made to fit the parameters: city "text".
    assert result.final_output == "Echo: Weather in Oslo? [tool results: sunny in text]"
    asked, answered = endpoint.requests[-2]["body"], endpoint.requests[-1]["body"]
    assert asked["tool_choice"] == "required"
    assert [t["function"]["name"] for t in asked["tools"]] == ["get_weather"]
    assert answered["messages"][-1]["role"] == "tool"
    # The exchange is stored whole in one session: the question, the call, its result and
    # the answer (chained: one session continued; not chained: the last request's own).
    assert _history(service, name, result.last_response_id) == [
        ("human", "Weather in Oslo?"),
        ("ai", ""),
        ("tool", "sunny in text"),
        ("ai", "Echo: Weather in Oslo? [tool results: sunny in text]"),
    ]


class City(BaseModel):
    name: str
    population: int


def test_output_type_is_answered_with_a_json_schema_reply(
    service: Service, endpoint: OpenAITestServer, user: tuple[str, str]
) -> None:
    _, token = user
    endpoint.queue_json({"name": "Oslo", "population": 709000})
    agent = _agent(output_type=City)

    result = _run(service, token, lambda: Runner.run(agent, "The capital of Norway?"))
    assert result.final_output == City(name="Oslo", population=709000)
    sent = endpoint.requests[-1]["body"]["response_format"]
    assert sent["type"] == "json_schema"
    assert set(sent["json_schema"]["schema"]["properties"]) == {"name", "population"}


def test_another_users_response_id_is_refused(
    service: Service, endpoint: OpenAITestServer, user: tuple[str, str], other: tuple[str, str]
) -> None:
    _, ann = user
    _, bob = other
    mine = _run(service, ann, lambda: Runner.run(_agent(), "My secret is 42."))
    requests = len(endpoint.requests)

    async def steal() -> Any:
        return await Runner.run(
            _agent(), "What is my secret?", previous_response_id=mine.last_response_id
        )

    with pytest.raises(openai.NotFoundError):
        _run(service, bob, steal)
    assert len(endpoint.requests) == requests  # nothing was sent to the model


@pytest.fixture
def sdk(service: Service) -> Iterator[Callable[[str], openai.OpenAI]]:
    """``sdk(token)``: an ``openai.OpenAI`` client of the service."""
    clients: list[openai.OpenAI] = []

    def make(token: str) -> openai.OpenAI:
        client = openai.OpenAI(
            base_url=f"{service.url}/v1", api_key=token, max_retries=0, timeout=30
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def test_the_openai_sdks_responses_create_stream_retrieve_items_and_delete(
    sdk: Callable[[str], openai.OpenAI], endpoint: OpenAITestServer, user: tuple[str, str]
) -> None:
    client = sdk(user[1])
    first = client.responses.create(model="gpt-4o-mini", input="one")
    with client.responses.stream(
        model="gpt-4o-mini", input="two", previous_response_id=first.id
    ) as stream:
        streamed = stream.get_final_response()
    assert streamed.usage is not None and streamed.usage.total_tokens > 0
    got = client.responses.retrieve(streamed.id)
    assert got.output_text == streamed.output_text == "Echo: two"
    items = client.responses.input_items.list(streamed.id).data
    assert [item.type for item in items] == ["message"]
    client.responses.delete(first.id)
    for gone in (first.id, streamed.id):  # one conversation, one session: both gone
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(gone)


def test_the_openai_sdks_raw_function_call_loop(
    sdk: Callable[[str], openai.OpenAI], endpoint: OpenAITestServer, user: tuple[str, str]
) -> None:
    client = sdk(user[1])
    endpoint.add_tool_rule("get_weather", {"city": "Oslo"})
    weather: Any = {
        "type": "function",
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    asked = client.responses.create(model="gpt-4o-mini", input="Weather in Oslo?", tools=[weather])
    (call,) = [item for item in asked.output if item.type == "function_call"]
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Oslo"}')
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    answered = client.responses.create(
        model="gpt-4o-mini", previous_response_id=asked.id, input=[result], tools=[weather]
    )
    assert answered.output_text == "Echo: Weather in Oslo? [tool results: sunny]"
    sent = endpoint.requests[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool"]
