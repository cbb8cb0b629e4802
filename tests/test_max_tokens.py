"""A call's own ``max_tokens`` (`ModelOptions.max_tokens`): a lower cap on the reply, never a
higher one. The real ``ChatOpenAI`` over an `OpenAITestServer` shows what the endpoint was
sent; a spy on the ledger shows the budget hold it was sized with."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.tools import tool
from pydantic import BaseModel

from chatchain import Chatbot, InvalidInputError, ModelOptions, Settings
from chatchain._turn import CUT_AT_HOLD
from chatchain.budgets import BudgetHold, BudgetLimit
from chatchain.testing import Fault, OpenAITestServer

LONG = "lorem ipsum " * 500  # far more than any call here may take


@pytest.fixture(scope="module")
def endpoint() -> Iterator[OpenAITestServer]:
    with OpenAITestServer() as server:
        yield server


@pytest.fixture
def server(endpoint: OpenAITestServer) -> Iterator[OpenAITestServer]:
    endpoint.clear()
    yield endpoint
    endpoint.clear()


def _bot(settings: Settings, server: OpenAITestServer, **values: Any) -> Chatbot:
    values = {"base_url": server.base_url, "max_retries": 0, **values}
    return Chatbot(Settings(**{**settings.model_dump(), **values}))


def _sent(server: OpenAITestServer) -> int | None:
    """The reply cap the endpoint received (ChatOpenAI sends ``max_completion_tokens``)."""
    request = server.requests[-1]["body"]
    assert "max_tokens" not in request
    return request.get("max_completion_tokens")


def test_the_calls_max_tokens_is_sent_and_cuts_the_reply(
    settings: Settings, server: OpenAITestServer
) -> None:
    bot = _bot(settings, server, max_tokens=50)
    server.queue_replies(LONG, LONG, LONG)

    assert bot.chat("hi", session_id="s").usage.completion_tokens == 50
    assert _sent(server) == 50

    reply = bot.chat("hi", session_id="s", options=ModelOptions(max_tokens=7))
    assert _sent(server) == 7
    assert reply.usage.completion_tokens == 7
    assert reply.message.response_metadata["finish_reason"] == "length"

    streamed = bot.stream("hi", session_id="s", options=ModelOptions(max_tokens=5))
    text = "".join(streamed)
    assert _sent(server) == 5
    assert server.count_tokens(text) <= 5 and streamed.finish_reason == "length"


def test_a_limit_above_the_deployments_does_not_raise_it(
    settings: Settings, server: OpenAITestServer
) -> None:
    bot = _bot(settings, server, max_tokens=50)
    server.queue_replies(LONG)

    reply = bot.chat("hi", session_id="s", options=ModelOptions(max_tokens=500))

    assert _sent(server) == 50
    assert reply.usage.completion_tokens == 50


def test_without_a_deployment_cap_the_calls_limit_is_sent(
    settings: Settings, server: OpenAITestServer
) -> None:
    bot = _bot(settings, server, max_tokens=None)

    bot.chat("hi", session_id="s")
    assert _sent(server) is None  # the model as it is

    bot.chat("hi", session_id="s", options=ModelOptions(max_tokens=9))
    assert _sent(server) == 9


def test_the_budget_hold_is_sized_for_the_smaller_limit(
    settings: Settings, server: OpenAITestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    bot = _bot(settings, server, max_tokens=50)
    held: list[int] = []
    take = bot.ledger.hold

    def spy(hold: BudgetHold, limits: list[BudgetLimit]) -> Any:
        held.append(hold.tokens)
        return take(hold, limits)

    monkeypatch.setattr(bot.ledger, "hold", spy)
    cap = [BudgetLimit("user", "ann", max_tokens=100_000)]
    server.queue_replies(LONG, LONG, LONG)

    bot.chat("hi", session_id="a", user_id="ann", limits=cap)
    assert _sent(server) == 50
    bot.chat("hi", session_id="b", user_id="ann", limits=cap, options=ModelOptions(max_tokens=7))
    assert _sent(server) == 7
    bot.chat("hi", session_id="c", user_id="ann", limits=cap, options=ModelOptions(max_tokens=80))
    assert _sent(server) == 50

    # The same prompt each time: the hold shrinks by what the reply cap does, never grows.
    assert held[1] == held[0] - (50 - 7)
    assert held[2] == held[0]


def test_an_endpoint_that_ignores_max_tokens_is_read_only_up_to_the_calls_limit(
    settings: Settings,
) -> None:
    # No budget: the call's own limit alone has the reply read no further.
    with OpenAITestServer(chunk_interval=0.002) as server:
        server.add_fault(Fault(ignore_max_tokens=True))
        server.queue_replies(LONG)
        bot = _bot(settings, server, max_tokens=None)

        reply = bot.chat("hi", session_id="s", options=ModelOptions(max_tokens=10))

    assert _sent(server) == 10
    metadata = reply.message.response_metadata
    assert metadata["finish_reason"] == "length" and metadata[CUT_AT_HOLD] is True
    assert 10 <= reply.usage.completion_tokens <= 15
    assert server.count_tokens(reply.text) <= 15


@pytest.mark.parametrize("value", [0, -3, True, 2.5, "10"])
def test_a_max_tokens_that_is_not_a_positive_int_is_refused(value: Any) -> None:
    with pytest.raises(InvalidInputError, match="max_tokens must be a positive whole number"):
        ModelOptions(max_tokens=value)


def test_max_tokens_alone_works_with_a_bots_own_tools_and_with_a_schema(
    settings: Settings, server: OpenAITestServer
) -> None:
    @tool
    def weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    server.queue_replies(LONG)
    values = {**settings.model_dump(), "base_url": server.base_url, "max_retries": 0}
    with_tools = Chatbot(Settings(**values), tools=[weather])
    reply = with_tools.chat("hi", session_id="s", options=ModelOptions(max_tokens=7))
    assert _sent(server) == 7 and "tools" in server.requests[-1]["body"]
    assert reply.usage.completion_tokens == 7

    class City(BaseModel):
        name: str

    structured = _bot(settings, server, max_tokens=50)
    reply = structured.chat(
        "Capital?", session_id="s", schema=City, options=ModelOptions(max_tokens=40)
    )
    assert _sent(server) == 40 and reply.parsed == City(name="text")
