"""A client's output-token limit on the OpenAI routes, through the official ``openai`` SDK:
``max_tokens`` / ``max_completion_tokens`` on ``POST /v1/chat/completions`` and
``max_output_tokens`` on ``POST /v1/responses`` lower the deployment's cap (never raise it),
and a reply cut there ends as the endpoint reports it. The app's model is the real
``ChatOpenAI`` over an `OpenAITestServer` (deployment cap: 50 tokens)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from chatchain import Chatbot, Settings
from chatchain.server import create_app
from chatchain.stores import MemoryStore
from chatchain.testing import OpenAITestServer
from chatchain.users import Users

LONG = "lorem ipsum " * 500  # far more than any call here may take
USER: list[Any] = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture(scope="module")
def endpoint() -> Iterator[OpenAITestServer]:
    with OpenAITestServer() as server:
        yield server


@pytest.fixture
def model(endpoint: OpenAITestServer) -> Iterator[OpenAITestServer]:
    endpoint.clear()
    endpoint.queue_replies(LONG, LONG)
    yield endpoint
    endpoint.clear()


@pytest.fixture
def sdk(model: OpenAITestServer) -> Iterator[openai.OpenAI]:
    settings = Settings(
        api_key="sk-test",
        base_url=model.base_url,
        model="gpt-4o-mini",
        max_tokens=50,
        max_retries=0,
        server_requests_per_minute=0,
    )
    users = Users(MemoryStore())
    bot = Chatbot(settings, store=users.store)
    token = users.add("ann")
    with TestClient(create_app(bot, users=users), raise_server_exceptions=False) as client:
        yield openai.OpenAI(
            base_url="http://testserver/v1", api_key=token, http_client=client, max_retries=0
        )


def _sent(model: OpenAITestServer) -> Any:
    """The reply cap the endpoint received (ChatOpenAI sends ``max_completion_tokens``)."""
    body = model.requests[-1]["body"]
    assert "max_tokens" not in body
    return body.get("max_completion_tokens")


@pytest.mark.parametrize(
    ("fields", "sent"),
    [
        ({}, 50),
        ({"max_tokens": 7}, 7),
        ({"max_completion_tokens": 6}, 6),
        ({"max_tokens": 9, "max_completion_tokens": 4}, 4),
        ({"max_tokens": 3, "max_completion_tokens": 8}, 3),
        ({"max_tokens": 500}, 50),  # never above the deployment's cap
    ],
)
def test_chat_completions_send_the_smaller_limit_and_report_the_cut(
    sdk: openai.OpenAI, model: OpenAITestServer, fields: dict[str, int], sent: int
) -> None:
    completion = sdk.chat.completions.create(model="gpt-4o-mini", messages=USER, **fields)

    assert _sent(model) == sent
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == sent


def test_a_streamed_completion_is_cut_at_the_clients_limit(
    sdk: openai.OpenAI, model: OpenAITestServer
) -> None:
    chunks = list(
        sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=USER,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    assert _sent(model) == 5
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_responses_send_max_output_tokens_and_report_it_incomplete(
    sdk: openai.OpenAI, model: OpenAITestServer
) -> None:
    response = sdk.responses.create(model="gpt-4o-mini", input="Tell me.", max_output_tokens=8)

    assert _sent(model) == 8
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 8

    above = sdk.responses.create(model="gpt-4o-mini", input="Tell me.", max_output_tokens=900)
    assert _sent(model) == 50
    assert above.usage is not None and above.usage.output_tokens == 50


@pytest.mark.parametrize("value", [0, -1])
def test_a_limit_that_is_not_positive_is_refused_before_anything_is_sent(
    sdk: openai.OpenAI, model: OpenAITestServer, value: int
) -> None:
    with pytest.raises(openai.BadRequestError, match="max_tokens must be a positive"):
        sdk.chat.completions.create(model="gpt-4o-mini", messages=USER, max_tokens=value)
    with pytest.raises(openai.BadRequestError, match="max_output_tokens must be a positive"):
        sdk.responses.create(model="gpt-4o-mini", input="Tell me.", max_output_tokens=value)
    assert model.requests == []
