"""End to end: the real `ChatOpenAI` and `openai` client against chatchain's test server."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator

import pytest

from chatchain import (
    AuthenticationError,
    BadRequestError,
    Chatbot,
    ContextTooLongError,
    EndpointConnectionError,
    EndpointTimeoutError,
    RateLimitError,
    ServerError,
    Settings,
)
from chatchain.testing import Fault, OpenAITestServer, echo_reply

KEY = "sk-e2e-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAITestServer]:
    with OpenAITestServer() as server:
        yield server


@pytest.fixture
def make_bot(server: OpenAITestServer):  # type: ignore[no-untyped-def]
    server.clear()

    def make(**overrides: object) -> Chatbot:
        values: dict[str, object] = {
            "api_key": KEY,
            "base_url": server.base_url,
            "model": "gpt-4o-mini",
            "max_retries": 0,
            "timeout": 5.0,
            "system_prompt": "Answer in {language}.",
        }
        values.update(overrides)
        return Chatbot(Settings(**values), prompt_vars={"language": "English"})  # type: ignore[arg-type]

    return make


def server_usage(server: OpenAITestServer, request_index: int, reply: str) -> tuple[int, int]:
    """What the server billed for one recorded request."""
    messages = server.requests[request_index]["body"]["messages"]
    prompt = sum(server.count_tokens(m["content"]) + 4 for m in messages) + 3
    return prompt, server.count_tokens(reply)


def test_invoke_is_metered_with_the_endpoints_usage(make_bot, server: OpenAITestServer) -> None:  # type: ignore[no-untyped-def]
    bot = make_bot()
    reply = bot.chat("Hi! I'm Bob", session_id="dp123")
    assert reply.text == "Echo: Hi! I'm Bob"
    prompt, completion = server_usage(server, 0, reply.text)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt, completion)
    assert reply.usage.successful_requests == 1
    assert reply.usage.model == "gpt-4o-mini"
    assert reply.usage.cost_usd == pytest.approx(prompt * 0.15e-6 + completion * 0.60e-6)


def test_stream_is_metered_like_invoke(make_bot, server: OpenAITestServer) -> None:  # type: ignore[no-untyped-def]
    bot = make_bot()
    stream = bot.stream("tell me a joke", session_id="s")
    pieces = list(stream)
    assert len(pieces) > 2  # it really streamed
    assert "".join(pieces) == "Echo: tell me a joke"
    body = server.requests[0]["body"]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    prompt, completion = server_usage(server, 0, stream.text)
    assert stream.usage is not None
    assert (stream.usage.prompt_tokens, stream.usage.completion_tokens) == (prompt, completion)
    assert stream.usage.cost_usd is not None and stream.usage.cost_usd > 0
    assert stream.usage.first_token_s is not None


def test_async_and_gathered_turns_add_up(make_bot, server: OpenAITestServer) -> None:  # type: ignore[no-untyped-def]
    bot = make_bot()
    texts = ["word " * (i + 1) + "end" for i in range(6)]

    async def run() -> None:
        await bot.achat("first", session_id="a")
        streamed = [p async for p in bot.astream("second", session_id="a")]
        assert "".join(streamed) == "Echo: second"
        replies = await bot.achat_many([(f"g{i}", text) for i, text in enumerate(texts)])
        assert [r.text for r in replies] == [f"Echo: {text}" for text in texts]
        # Each gathered turn was metered on its own: longer questions, more prompt tokens.
        prompts = [r.usage.prompt_tokens for r in replies]
        assert prompts == sorted(prompts)
        assert len(set(prompts)) == 6

    asyncio.run(run())
    billed = 0
    for request in server.requests:
        messages = request["body"]["messages"]
        prompt = sum(server.count_tokens(m["content"]) + 4 for m in messages) + 3
        billed += prompt + server.count_tokens(echo_reply(messages))
    total = bot.usage()
    assert total.turns == 8
    assert total.successful_requests == 8 == len(server.requests)
    assert total.total_tokens == billed


def test_429_with_retry_after_is_retried_and_succeeds(make_bot, server: OpenAITestServer) -> None:  # type: ignore[no-untyped-def]
    bot = make_bot(max_retries=2)
    server.add_fault(Fault(status=429, retry_after=0.05))
    reply = bot.chat("hello", session_id="r")
    assert reply.text == "Echo: hello"
    assert len(server.requests) == 2
    assert len(bot.history("r")) == 2
    assert bot.usage("r").successful_requests == 1


def test_an_outage_gives_a_clear_error_and_an_unchanged_history(
    make_bot,
    server: OpenAITestServer,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture,
) -> None:
    bot = make_bot(max_retries=1)
    bot.chat("before the outage", session_id="o")
    before = [(m.type, m.text) for m in bot.history("o")]
    usage_before = bot.usage("o")
    server.add_fault(Fault(status=503, retry_after=0.01, times=4))
    with caplog.at_level(logging.DEBUG), pytest.raises(ServerError, match=r"503.*after 1 retries"):
        bot.chat("during the outage", session_id="o")
    with pytest.raises(ServerError):
        list(bot.stream("still down", session_id="o"))
    assert [(m.type, m.text) for m in bot.history("o")] == before
    assert bot.usage("o") == usage_before
    assert KEY not in caplog.text
    assert bot.chat("after the outage", session_id="o").text == "Echo: after the outage"


@pytest.mark.parametrize(
    ("fault", "error", "advice"),
    [
        (Fault(status=401), AuthenticationError, "OPENAI_API_KEY"),
        (Fault(status=429, retry_after=0), RateLimitError, "CHATCHAIN_MAX_RETRIES"),
        (Fault(status=400, code="context_length_exceeded"), ContextTooLongError, "Shorten"),
        (Fault(delay=1.0), EndpointTimeoutError, "CHATCHAIN_TIMEOUT"),
        (Fault(malformed=True), ServerError, "could not be read"),
    ],
)
def test_endpoint_errors_are_translated(
    make_bot,
    server: OpenAITestServer,
    fault: Fault,  # type: ignore[no-untyped-def]
    error: type[Exception],
    advice: str,
) -> None:
    bot = make_bot(timeout=0.3)
    server.add_fault(fault)
    with pytest.raises(error, match=advice) as info:
        bot.chat("hi", session_id="e")
    assert info.value.__cause__ is not None
    assert KEY not in str(info.value)
    assert bot.history("e") == []


LITELLM_UNKNOWN = (
    "/chat/completions: Invalid model name passed in model=gpt-4o-mini. Call `/v1/models` to "
    "view available models for your key."
)
TEMPERATURE_REFUSED = (
    "Unsupported value: 'temperature' does not support 0.2 with this model. Only the default "
    "(1) value is supported."
)


@pytest.mark.parametrize(
    ("fault", "model_named"),
    [
        (Fault(status=404, code="model_not_found"), True),
        (Fault(status=400, code="400", message=LITELLM_UNKNOWN), True),
        (Fault(status=400, message=TEMPERATURE_REFUSED), False),
        (Fault(status=400), False),
        (Fault(status=422), False),
    ],
    ids=["openai unknown model", "litellm unknown model", "this model", "bare 400", "bare 422"],
)
def test_only_a_complaint_about_the_model_points_at_the_model_name(
    make_bot,  # type: ignore[no-untyped-def]
    server: OpenAITestServer,
    fault: Fault,
    model_named: bool,
) -> None:
    bot = make_bot()
    server.add_fault(fault)
    with pytest.raises(BadRequestError) as info:
        bot.chat("hi", session_id="m")
    message = str(info.value)
    assert ("OPENAI_MODEL" in message) is model_named, message
    assert fault.message is None or fault.message.rstrip(".") in message


def test_connection_refused(make_bot) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bot = make_bot(base_url=f"http://127.0.0.1:{port}/v1")
    with pytest.raises(EndpointConnectionError, match="OPENAI_BASE_URL"):
        bot.chat("anyone there?", session_id="c")
    assert bot.history("c") == []


def test_a_stream_cut_midway_keeps_the_partial_reply(make_bot, server: OpenAITestServer) -> None:  # type: ignore[no-untyped-def]
    bot = make_bot()
    server.queue_replies("one two three four five six")
    server.add_fault(Fault(cut_after=3))
    received: list[str] = []
    with pytest.raises(EndpointConnectionError):
        for piece in bot.stream("count", session_id="cut"):
            received.append(piece)
    history = bot.history("cut")
    assert [m.type for m in history] == ["human", "ai"]
    assert history[1].text == "".join(received) == "one two three"
    assert history[1].response_metadata["interrupted"] is True
    assert bot.chat("again", session_id="cut").text == "Echo: again"


def test_fallback_model_answers_when_the_main_one_fails(make_bot, server: OpenAITestServer) -> None:  # type: ignore[no-untyped-def]
    bot = make_bot(fallback_model="gpt-4o")
    server.add_fault(Fault(status=500))
    reply = bot.chat("hello", session_id="f")
    assert reply.text == "Echo: hello"
    assert [r["body"]["model"] for r in server.requests] == ["gpt-4o-mini", "gpt-4o"]
    assert reply.usage.model == "gpt-4o"


def test_no_fallback_for_a_request_the_endpoint_refuses(make_bot, server: OpenAITestServer) -> None:  # type: ignore[no-untyped-def]
    bot = make_bot(fallback_model="gpt-4o")
    server.add_fault(Fault(status=401))
    with pytest.raises(AuthenticationError):
        bot.chat("hello", session_id="f")
    assert len(server.requests) == 1
