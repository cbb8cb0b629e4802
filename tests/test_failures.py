"""Failures leave the history consistent: bad input, endpoint errors, interrupted streams."""

from __future__ import annotations

import asyncio
import logging

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

KEY = "sk-test-0123456789abcdef"
_REQUEST = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")


def status_error(
    cls: type[openai.APIStatusError], status: int, message: str, code: str | None = None
) -> openai.APIStatusError:
    body = {"message": message, "type": "error", "code": code}
    return cls(message, response=httpx.Response(status, request=_REQUEST), body=body)


ENDPOINT_FAILURES = [
    (
        status_error(openai.AuthenticationError, 401, f"Incorrect API key provided: {KEY}"),
        AuthenticationError,
        "OPENAI_API_KEY",
    ),
    (
        status_error(openai.RateLimitError, 429, "Rate limit reached"),
        RateLimitError,
        "CHATCHAIN_MAX_RETRIES",
    ),
    (openai.APITimeoutError(request=_REQUEST), EndpointTimeoutError, "CHATCHAIN_TIMEOUT"),
    (openai.APIConnectionError(request=_REQUEST), EndpointConnectionError, "OPENAI_BASE_URL"),
    (
        status_error(
            openai.BadRequestError,
            400,
            "maximum context length is 8 tokens",
            "context_length_exceeded",
        ),
        ContextTooLongError,
        "new one",
    ),
    (status_error(openai.NotFoundError, 404, "model not found"), BadRequestError, "OPENAI_MODEL"),
    (status_error(openai.InternalServerError, 500, "boom"), ServerError, "try again later"),
]


@pytest.fixture
def seeded(settings: Settings) -> tuple[Chatbot, FakeChatModel]:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(settings, llm=fake, system="Be brief.")
    bot.chat("first", session_id="s")
    return bot, fake


def snapshot(bot: Chatbot, session_id: str = "s") -> list[tuple[str, str]]:
    return [(m.type, m.text) for m in bot.history(session_id)]


@pytest.mark.parametrize(("raised", "expected", "advice"), ENDPOINT_FAILURES)
@pytest.mark.parametrize("mode", ["chat", "stream", "achat", "astream"])
def test_endpoint_failure_gives_clear_error_and_changes_nothing(
    seeded: tuple[Chatbot, FakeChatModel],
    raised: Exception,
    expected: type[EndpointError],
    advice: str,
    mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bot, fake = seeded
    before = snapshot(bot)
    usage_before = bot.usage("s")
    fake.errors.clear()
    fake._errors.append(raised)
    with pytest.raises(expected) as info:
        if mode == "chat":
            bot.chat("second", session_id="s")
        elif mode == "stream":
            list(bot.stream("second", session_id="s"))
        elif mode == "achat":
            asyncio.run(bot.achat("second", session_id="s"))
        else:

            async def consume() -> None:
                async for _ in bot.astream("second", session_id="s"):
                    pass

            asyncio.run(consume())
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
