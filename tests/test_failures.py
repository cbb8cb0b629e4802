"""Failures leave the history consistent: bad input, endpoint errors, interrupted streams."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httpx
import openai
import pytest

from chatchain import (
    AuthenticationError,
    BadRequestError,
    Chatbot,
    ContextTooLongError,
    EndpointConnectionError,
    EndpointError,
    EndpointTimeoutError,
    InvalidInputError,
    MissingPromptVariableError,
    RateLimitError,
    ServerError,
    Settings,
)
from chatchain.testing import FakeChatModel
from tests.entry_points import each_library_way, turn

KEY = "sk-test-0123456789abcdef"
_REQUEST = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")


def status_error(
    cls: type[openai.APIStatusError], status: int, message: str, code: str | None = None
) -> openai.APIStatusError:
    body = {"message": message, "type": "error", "code": code}
    return cls(message, response=httpx.Response(status, request=_REQUEST), body=body)


# Each case makes its error anew: one instance raised by every mode would grow one traceback
# across the whole run (each raise appends to it), holding langchain-core's stream frames until
# the interpreter exits, where Python 3.12.0-3.12.2 crash freeing them (CPython gh-115874).
ENDPOINT_FAILURES: list[tuple[Callable[[], Exception], type[EndpointError], str]] = [
    (
        lambda: status_error(openai.AuthenticationError, 401, f"Incorrect API key provided: {KEY}"),
        AuthenticationError,
        "OPENAI_API_KEY",
    ),
    (
        lambda: status_error(openai.RateLimitError, 429, "Rate limit reached"),
        RateLimitError,
        "CHATCHAIN_MAX_RETRIES",
    ),
    (lambda: openai.APITimeoutError(request=_REQUEST), EndpointTimeoutError, "CHATCHAIN_TIMEOUT"),
    (
        lambda: openai.APIConnectionError(request=_REQUEST),
        EndpointConnectionError,
        "OPENAI_BASE_URL",
    ),
    (
        lambda: status_error(
            openai.BadRequestError,
            400,
            "maximum context length is 8 tokens",
            "context_length_exceeded",
        ),
        ContextTooLongError,
        "Shorten the message",  # after the retry with less history overflowed too
    ),
    (
        lambda: status_error(openai.NotFoundError, 404, "model not found"),
        BadRequestError,
        "OPENAI_MODEL",
    ),
    (
        lambda: status_error(openai.InternalServerError, 500, "boom"),
        ServerError,
        "try again later",
    ),
]


@pytest.fixture
def seeded(settings: Settings) -> tuple[Chatbot, FakeChatModel]:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(settings, llm=fake, system="Be brief.")
    bot.chat("first", session_id="s")
    return bot, fake


def snapshot(bot: Chatbot, session_id: str = "s") -> list[tuple[str, str]]:
    return [(m.type, m.text) for m in bot.history(session_id)]


@pytest.mark.parametrize(
    ("make_error", "expected", "advice"),
    ENDPOINT_FAILURES,
    ids=[expected.__name__ for _, expected, _ in ENDPOINT_FAILURES],
)
@each_library_way()
def test_endpoint_failure_gives_clear_error_and_changes_nothing(
    seeded: tuple[Chatbot, FakeChatModel],
    make_error: Callable[[], Exception],
    expected: type[EndpointError],
    advice: str,
    mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bot, fake = seeded
    raised = make_error()
    before = snapshot(bot)
    usage_before = bot.usage("s")
    fake.errors.clear()
    fake._errors.extend([raised] * (2 if expected is ContextTooLongError else 1))
    with pytest.raises(expected) as info:
        turn(bot, mode, "second")
    assert info.value.__cause__ is raised
    assert advice.lower() in str(info.value).lower()
    assert KEY not in str(info.value)
    assert KEY not in caplog.text
    assert snapshot(bot) == before
    assert bot.usage("s") == usage_before
    # The session still works afterwards.
    assert bot.chat("third", session_id="s").text == "Echo: third"


def test_unrelated_exceptions_pass_through_unchanged(seeded: tuple[Chatbot, FakeChatModel]) -> None:
    bot, fake = seeded
    fake._errors.append(KeyError("a bug in user code"))
    with pytest.raises(KeyError, match="a bug in user code"):
        bot.chat("second", session_id="s")
    assert len(bot.history("s")) == 2


@pytest.mark.parametrize(
    ("text", "session_id", "message"),
    [
        ("", "s", "empty"),
        ("   \n\t", "s", "empty"),
        ("nul \x00 byte", "s", "NUL"),
        ("hi", "", "session id is empty"),
        ("hi", "   ", "session id is empty"),
        ("hi", "x" * 257, "limit is 256"),
        ("hi", "bad\nid", r"U\+000A"),
        ("hi", "bad\x1bid", r"U\+001B"),
    ],
)
def test_bad_input_is_refused_before_anything_is_sent_or_stored(
    seeded: tuple[Chatbot, FakeChatModel], text: str, session_id: str, message: str
) -> None:
    bot, fake = seeded
    calls = len(fake.calls)
    before = snapshot(bot)
    for call in (bot.chat, bot.stream, bot.astream):
        with pytest.raises(InvalidInputError, match=message):
            call(text, session_id=session_id)
    with pytest.raises(InvalidInputError, match=message):
        asyncio.run(bot.achat(text, session_id=session_id))
    assert len(fake.calls) == calls
    assert snapshot(bot) == before


def test_hostile_but_printable_session_ids_work(seeded: tuple[Chatbot, FakeChatModel]) -> None:
    bot, _ = seeded
    for sid in ("'; DROP TABLE messages; --", "a:b*c{d}", "../../etc/passwd", "名前 🙂", "x" * 256):
        bot.chat("hi", session_id=sid)
        assert snapshot(bot, sid) == [("human", "hi"), ("ai", "Echo: hi")]


def test_chain_without_session_id_says_how_to_pass_one(
    seeded: tuple[Chatbot, FakeChatModel],
) -> None:
    bot, _ = seeded
    with pytest.raises(InvalidInputError, match="configurable"):
        bot.chain.invoke({"input": "hi"})
    with pytest.raises(InvalidInputError, match="takes a dict"):
        bot.chain.invoke("hi", config={"configurable": {"session_id": "s"}})


def test_missing_prompt_variable_is_an_invalid_input(settings: Settings) -> None:
    bot = Chatbot(settings, llm=FakeChatModel(), system="Answer in {language}.")
    with pytest.raises(MissingPromptVariableError):
        bot.chat("hi")
    assert bot.chat("hi", language="German").text == "Echo: hi"


# -- interrupted streams ------------------------------------------------------------------


def assert_interrupted(bot: Chatbot, text: str, partial: str, session_id: str = "s") -> None:
    history = bot.history(session_id)
    assert [(m.type, m.text) for m in history[-2:]] == [("human", text), ("ai", partial)]
    assert history[-1].response_metadata["interrupted"] is True
    assert len(history) == 4  # nothing duplicated


def test_breaking_out_of_a_stream_keeps_the_partial_reply(
    seeded: tuple[Chatbot, FakeChatModel], caplog: pytest.LogCaptureFixture
) -> None:
    bot, fake = seeded
    fake.queue("one two three four five")
    with caplog.at_level(logging.DEBUG):
        stream = bot.stream("count", session_id="s")
        pieces = [next(stream) for _ in range(3)]
        stream.close()
    assert "".join(pieces) == "one two"
    assert_interrupted(bot, "count", "one two")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert bot.usage("s").turns == 2
    # The lock was released: the session goes on.
    assert bot.chat("next", session_id="s").text == "Echo: next"


def test_a_stream_dropped_without_close_is_saved_when_collected(
    seeded: tuple[Chatbot, FakeChatModel],
) -> None:
    bot, fake = seeded
    fake.queue("alpha beta gamma")

    def consume_two() -> None:
        for index, _ in enumerate(bot.stream("go", session_id="s")):
            if index == 1:
                break

    consume_two()
    assert_interrupted(bot, "go", "alpha ")


def test_endpoint_cutting_a_stream_keeps_partial_and_raises(settings: Settings) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(settings, llm=fake, system="Be brief.")
    bot.chat("first", session_id="s")
    fake.fail_after_chunks = 3
    fake.queue("one two three four")
    received = []
    with pytest.raises(EndpointConnectionError, match="dropped the connection"):
        for piece in bot.stream("count", session_id="s"):
            received.append(piece)
    assert "".join(received) == "one two"
    assert_interrupted(bot, "count", "one two")


async def test_cancelling_an_astream_task_keeps_the_partial_reply(settings: Settings) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini", delay=0.01)
    bot = Chatbot(settings, llm=fake, system="Be brief.")
    await bot.achat("first", session_id="s")
    fake.queue("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20")
    got: list[str] = []

    async def consume() -> None:
        async for piece in bot.astream("long", session_id="s"):
            got.append(piece)

    task = asyncio.create_task(consume())
    while len(got) < 3:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    partial = "".join(got)
    assert partial.startswith("w1 w2")
    assert_interrupted(bot, "long", partial)
    assert (await bot.achat("after", session_id="s")).text == "Echo: after"


async def test_cancelling_an_achat_task_keeps_the_message(settings: Settings) -> None:
    """A turn stopped mid-call (a server's shutdown cancels it) keeps the user's message, with
    an empty reply marked interrupted, as a stopped stream does."""
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(settings, llm=fake, system="Be brief.")
    await bot.achat("first", session_id="s")
    fake.delay = 30.0  # the model answers long after the cancel
    task = asyncio.create_task(bot.achat("slow", session_id="s"))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert_interrupted(bot, "slow", "")
    assert bot.history("s")[-1].response_metadata["interrupted_reason"] == "cancelled"
    fake.delay = 0.0
    assert (await bot.achat("after", session_id="s")).text == "Echo: after"


async def test_closing_an_astream_keeps_the_partial_reply(settings: Settings) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(settings, llm=fake, system="Be brief.")
    await bot.achat("first", session_id="s")
    fake.queue("red green blue")
    async with bot.astream("colours", session_id="s") as stream:
        async for piece in stream:
            if piece == "green":
                break
    assert_interrupted(bot, "colours", "red green")


# -- errors that point the right way ---------------------------------------------------------


def _request(url: str = "http://127.0.0.1:9/v1/chat/completions") -> httpx.Request:
    return httpx.Request("POST", url)


def raw_status_error(
    status: int, body: object, url: str = "http://127.0.0.1:9/v1/chat/completions"
) -> openai.APIStatusError:
    """What the openai client raises for ``status`` and a JSON ``body``, built the way it does."""
    client = openai.OpenAI(api_key="sk-test", base_url="http://127.0.0.1:9/v1")
    response = httpx.Response(status, json=body, request=_request(url))
    try:
        return client._make_status_error_from_response(response)
    finally:
        client.close()


# Each server's own context-overflow reply: status and JSON body, as it sends them.
CONTEXT_OVERFLOWS = {
    "openai": (
        400,
        {
            "error": {
                "message": "This model's maximum context length is 8192 tokens. However, your "
                "messages resulted in 9000 tokens. Please reduce the length of the messages.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        },
    ),
    "azure-openai": (
        400,
        {
            "error": {
                "message": "This model's maximum context length is 4096 tokens, however you "
                "requested 5000 tokens (4000 in your prompt; 1000 for the completion). Please "
                "reduce your prompt; or completion length.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        },
    ),
    "litellm": (
        400,
        {
            "error": {
                "message": "litellm.ContextWindowExceededError: litellm.BadRequestError: "
                "ContextWindowExceededError: Input is too long for requested model.",
                "type": None,
                "param": None,
                "code": "400",
            }
        },
    ),
    "vllm": (
        400,
        {
            "object": "error",
            "message": "This model's maximum context length is 4096 tokens. However, you "
            "requested 5000 tokens (4000 in the messages, 1000 in the completion). Please reduce "
            "the length of the messages or completion.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        },
    ),
    "vllm-v1": (
        400,
        {
            "error": {
                "message": "The decoder prompt (length 5951) is longer than the maximum model "
                "length of 4096. Make sure that `max_model_len` is no smaller than the number of "
                "text tokens.",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            }
        },
    ),
    "llama.cpp": (
        400,
        {
            "error": {
                "code": 400,
                "message": "request (9412 tokens) exceeds the available context size (8192 "
                "tokens), try increasing it",
                "type": "exceed_context_size_error",
                "n_prompt_tokens": 9412,
                "n_ctx": 8192,
            }
        },
    ),
    "llama.cpp-older": (
        400,
        {
            "error": {
                "code": 400,
                "message": "the request exceeds the available context size. try increasing the "
                "context size or enable context shift",
                "type": "invalid_request_error",
            }
        },
    ),
    "ollama": (
        500,
        {
            "error": {
                "message": "the input length exceeds the context length",
                "type": "api_error",
                "param": None,
                "code": None,
            }
        },
    ),
    "ollama-no-shift": (
        400,
        {
            "error": {
                "message": "the prompt is longer than the context length currently available "
                "to the model",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        },
    ),
    "gateway-413": (413, {"error": {"message": "Request Entity Too Large", "code": None}}),
}


def window_bot(settings: Settings, fake: FakeChatModel) -> Chatbot:
    windowed = settings.model_copy(update={"window_turns": 4})
    bot = Chatbot(windowed, llm=fake, system="Be brief.")
    bot.chat("first", session_id="s")
    return bot


@pytest.mark.parametrize("server", list(CONTEXT_OVERFLOWS))
def test_every_servers_context_overflow_is_retried_with_less_history(
    settings: Settings, server: str
) -> None:
    status, body = CONTEXT_OVERFLOWS[server]
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = window_bot(settings, fake)
    fake._errors.append(raw_status_error(status, body))
    reply = bot.chat("second", session_id="s")
    assert reply.text == "Echo: second"
    assert any("retried with the newest" in notice for notice in reply.notices)


@pytest.mark.parametrize("server", list(CONTEXT_OVERFLOWS))
def test_every_servers_context_overflow_is_a_context_too_long_error(
    settings: Settings, server: str
) -> None:
    status, body = CONTEXT_OVERFLOWS[server]
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(settings, llm=fake, system="Be brief.")  # a first turn: no history to drop
    fake._errors.append(raw_status_error(status, body))
    with pytest.raises(ContextTooLongError, match="even with no earlier messages") as info:
        bot.chat("hi", session_id="s")
    assert info.value.status_code == status


def test_langchain_openais_own_context_overflow_classes_are_recognised(
    settings: Settings,
) -> None:
    from langchain_openai.chat_models.base import (
        OpenAIAPIContextOverflowError,
        OpenAIContextOverflowError,
    )

    # What langchain-openai raises for an Anthropic model behind an OpenAI-compatible proxy,
    # and for an overflow reported inside a stream (no HTTP status).
    raised: list[Exception] = [
        OpenAIContextOverflowError(
            "prompt is too long: 250000 tokens > 200000 maximum",
            response=httpx.Response(400, request=_request()),
            body={"message": "prompt is too long: 250000 tokens > 200000 maximum"},
        ),
        OpenAIAPIContextOverflowError(
            "Your input exceeds the context window of this model.",
            request=_request(),
            body=None,
        ),
    ]
    for error in raised:
        fake = FakeChatModel(model_name="gpt-4o-mini")
        bot = Chatbot(settings, llm=fake, system="Be brief.")
        fake._errors.append(error)
        with pytest.raises(ContextTooLongError):
            bot.chat("hi", session_id="s")


@pytest.mark.parametrize(
    "message",
    [
        "max_tokens is too large: 5000. This model supports at most 4096 completion tokens.",
        "Invalid value for 'temperature': expected a number.",
    ],
)
def test_other_refusals_are_not_taken_for_context_overflow(
    settings: Settings, message: str
) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(settings, llm=fake, system="Be brief.")
    body = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    fake._errors.append(raw_status_error(400, body))
    with pytest.raises(BadRequestError):
        bot.chat("hi", session_id="s")


@pytest.mark.parametrize(
    ("status", "body", "url", "expected", "says", "does_not_say"),
    [
        # A gateway's 408 (LiteLLM, a proxy) is a timeout, not a refused request.
        (
            408,
            {"error": {"message": "Request timed out"}},
            "http://127.0.0.1:9/v1/chat/completions",
            EndpointTimeoutError,
            "CHATCHAIN_FALLBACK_MODEL",
            "model name",
        ),
        # The base URL lacks /v1: the URL is what to check.
        (
            404,
            {"detail": "Not Found"},
            "http://127.0.0.1:9/chat/completions",
            BadRequestError,
            "Check OPENAI_BASE_URL",
            "Check the model name",
        ),
        # The model is unknown: that is what to check.
        (
            404,
            {
                "error": {
                    "message": "The model `gpt-9` does not exist or you do not have access to it.",
                    "code": "model_not_found",
                }
            },
            "http://127.0.0.1:9/v1/chat/completions",
            BadRequestError,
            "Check OPENAI_MODEL",
            "Check OPENAI_BASE_URL",
        ),
        (
            404,
            {"error": {"message": 'model "llama9" not found, try pulling it first'}},
            "http://127.0.0.1:9/v1/chat/completions",
            BadRequestError,
            "Check OPENAI_MODEL",
            "Check OPENAI_BASE_URL",
        ),
        # 501: the server does not do chat completions; waiting will not help.
        (
            501,
            {"error": {"message": "Not Implemented"}},
            "http://127.0.0.1:9/v1/chat/completions",
            ServerError,
            "does not implement chat completions",
            "try again later",
        ),
    ],
)
def test_status_errors_point_at_what_to_fix(
    settings: Settings,
    status: int,
    body: object,
    url: str,
    expected: type[EndpointError],
    says: str,
    does_not_say: str,
) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(settings, llm=fake, system="Be brief.")
    fake._errors.append(raw_status_error(status, body, url))
    with pytest.raises(expected) as info:
        bot.chat("hi", session_id="s")
    assert says.lower() in str(info.value).lower()
    assert does_not_say.lower() not in str(info.value).lower()
    assert info.value.status_code == status


def test_a_connection_error_names_the_endpoint_it_tried(settings: Settings) -> None:
    # No OPENAI_BASE_URL: the client went to OpenAI's API; the variable is not what is wrong.
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(settings, llm=fake, system="Be brief.")
    url = "https://api.openai.com/v1/chat/completions"
    fake._errors.append(openai.APIConnectionError(request=_request(url)))
    with pytest.raises(EndpointConnectionError) as info:
        bot.chat("hi", session_id="s")
    assert url in str(info.value)
    assert "Check that the server is up and that OPENAI_BASE_URL" not in str(info.value)

    # A local server: its URL, and the variable that set it.
    fake._errors.append(
        openai.APIConnectionError(request=_request("http://localhost:11434/v1/chat/completions"))
    )
    with pytest.raises(EndpointConnectionError) as info:
        bot.chat("hi", session_id="s")
    assert "http://localhost:11434/v1/chat/completions" in str(info.value)
    assert "OPENAI_BASE_URL" in str(info.value)


def test_the_endpoint_url_is_shown_without_credentials(settings: Settings) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(settings, llm=fake, system="Be brief.")
    url = "http://user:hunter2@gateway.internal/v1/chat/completions?key=hunter2"
    fake._errors.append(openai.APIConnectionError(request=_request(url)))
    with pytest.raises(EndpointConnectionError) as info:
        bot.chat("hi", session_id="s")
    assert "http://gateway.internal/v1/chat/completions" in str(info.value)
    assert "hunter2" not in str(info.value)
