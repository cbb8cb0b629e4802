"""End to end: structured replies with the real `ChatOpenAI` against chatchain's test server."""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import Callable, Iterator
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from chatchain import BadRequestError, Chatbot, Settings, StructuredReplyError
from chatchain.testing import Fault, OpenAITestServer

KEY = "sk-e2e-secret-0123456789abcdef"


class Forecast(BaseModel):
    city: str
    days: int = Field(ge=1)
    unit: Literal["C", "F"]


@pytest.fixture(params=[False, True], ids=["json_schema", "refused"])
def refused(request: pytest.FixtureRequest) -> bool:
    """Whether the server refuses json_schema, as servers without structured outputs do."""
    return bool(request.param)


@pytest.fixture
def server(refused: bool) -> Iterator[OpenAITestServer]:
    with OpenAITestServer(json_schema=not refused) as server:
        yield server


@pytest.fixture
def make_bot(server: OpenAITestServer) -> Callable[[], Chatbot]:
    def make() -> Chatbot:
        settings = Settings(
            api_key=KEY, base_url=server.base_url, model="gpt-4o-mini", max_retries=0, timeout=5
        )
        return Chatbot(settings)

    return make


def methods(server: OpenAITestServer) -> list[str]:
    """How each request asked for the schema: response_format, or a forced tool."""
    asked = []
    for request in server.requests:
        body = request["body"]
        if "response_format" in body:
            asked.append("json_schema")
        elif body.get("tool_choice"):
            asked.append("function_calling")
        else:
            asked.append("text")
    return asked


def test_chat_with_a_schema_end_to_end(
    make_bot: Callable[[], Chatbot], server: OpenAITestServer, refused: bool
) -> None:
    bot = make_bot()
    server.queue_json({"city": "Oslo", "days": 3, "unit": "C"})
    reply = bot.chat("Forecast for Oslo?", session_id="s", schema=Forecast)
    assert reply.parsed == Forecast(city="Oslo", days=3, unit="C")
    assert json.loads(bot.history("s")[-1].text) == {"city": "Oslo", "days": 3, "unit": "C"}
    if refused:  # the server refused json_schema: chatchain fell back to function calling
        assert methods(server) == ["json_schema", "function_calling"]
    else:
        assert methods(server) == ["json_schema"]
    # Metered with the endpoint's usage (the refused request cost nothing).
    assert reply.usage.successful_requests == 1
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    # The refusal is remembered: the next structured turn goes straight to what works.
    before = len(server.requests)
    second = asyncio.run(bot.achat("And Bergen?", session_id="s", schema=Forecast))
    assert second.parsed == Forecast(city="text", days=1, unit="C")  # made to fit the schema
    assert len(server.requests) == before + 1
    expected = "function_calling" if refused else "json_schema"
    assert methods(server)[-1] == expected
    # A plain turn afterwards sends the JSON replies as history, as text.
    bot.chat("Thanks", session_id="s")
    sent = server.requests[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert json.loads(sent[2]["content"])["city"] == "Oslo"
    assert "tools" not in server.requests[-1]["body"]


def test_an_invalid_reply_end_to_end_stores_nothing_and_is_metered(
    make_bot: Callable[[], Chatbot], server: OpenAITestServer
) -> None:
    bot = make_bot()
    server.queue_json({"city": "Oslo", "days": 0, "unit": "K"})
    with pytest.raises(StructuredReplyError, match="does not fit the Forecast schema") as caught:
        bot.chat("Forecast?", session_id="s", schema=Forecast)
    assert "days" in str(caught.value) and "unit" in str(caught.value)
    assert KEY not in str(caught.value)
    assert bot.history("s") == []
    usage = bot.usage("s")
    assert usage.turns == 1 and usage.successful_requests == 1 and usage.total_tokens > 0


def test_the_fallback_shows_the_user_no_warning(
    make_bot: Callable[[], Chatbot], server: OpenAITestServer, refused: bool
) -> None:
    # langchain-openai warns "use method='function_calling'" on the refusal: chatchain does.
    bot = make_bot()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        reply = bot.chat("Forecast?", session_id="w", schema=Forecast)
    assert reply.parsed is not None
    assert [str(w.message) for w in seen] == []
    assert len(server.requests) == (2 if refused else 1)


TOOLS_REFUSED = "registry.ollama.ai/library/gemma3:4b does not support tools"


@pytest.mark.parametrize("turns", [1, 2], ids=["first turn", "after an earlier refusal"])
def test_an_endpoint_refusing_both_ways_is_reported_with_both_refusals(turns: int) -> None:
    with OpenAITestServer(json_schema=False) as server:
        settings = Settings(
            api_key=KEY, base_url=server.base_url, model="gpt-4o-mini", max_retries=0, timeout=5
        )
        with Chatbot(settings) as bot:
            if turns == 2:  # the json_schema refusal is remembered; function calling works
                bot.chat("Forecast for Oslo", session_id="s", schema=Forecast)
            server.clear()
            if turns == 1:
                server.add_fault(Fault())  # the json_schema request: refused by the server
            server.add_fault(Fault(status=400, message=TOOLS_REFUSED))
            with pytest.raises(BadRequestError) as caught:
                bot.chat("Forecast for Paris", session_id="s", schema=Forecast)
            history = bot.history("s")

    message = str(caught.value)
    assert "'response_format' of type 'json_schema' is not supported" in message
    assert TOOLS_REFUSED in message
    assert "model name" not in message
    assert caught.value.status_code == 400
    assert KEY not in message
    assert [m.text for m in history if m.type == "human"] == ["Forecast for Oslo"] * (turns - 1)
