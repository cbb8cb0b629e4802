"""End to end: a context overflow is retried with less history, through the real `ChatOpenAI`.

The test server refuses prompts over its ``context_window`` in LiteLLM's words (a gateway's
``ContextWindowExceededError``), whatever the window that chose the history: each retry sends
half of what overflowed, until a request fits or no history is left.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from chatchain import Chatbot, ContextTooLongError, Settings
from chatchain.testing import OpenAITestServer
from tests.entry_points import each_library_way, turn

KEY = "sk-e2e-overflow-0123456789abcdef"
SYSTEM = "Be brief."
# (CHATCHAIN_WINDOW_TURNS, CHATCHAIN_WINDOW_TOKENS): the default, and others.
WINDOWS = [(6, 3000), (4, 3000), (10, None), (None, None), (None, 500)]


def prompt_tokens(server: OpenAITestServer, texts: list[str]) -> int:
    """What the test server counts for a prompt of these message texts (its own formula)."""
    return 3 + sum(server.count_tokens(text) + 4 for text in texts)


def earlier(turns: int) -> list[str]:
    return [text for i in range(turns) for text in (f"q{i}", f"Echo: q{i}")]


@pytest.fixture
def server() -> Iterator[OpenAITestServer]:
    # Four short turns fit (the largest sends 8 messages); the fifth (10 messages) does not.
    probe = OpenAITestServer()
    window = prompt_tokens(probe, [SYSTEM, *earlier(3), "q3"])
    with OpenAITestServer(context_window=window, overflow_wording="litellm") as server:
        yield server


def make_bot(server: OpenAITestServer, turns: int | None, tokens: int | None) -> Chatbot:
    settings = Settings(
        api_key=KEY,
        base_url=server.base_url,
        model="gpt-4o-mini",
        max_retries=0,
        timeout=5.0,
        window_turns=turns,
        window_tokens=tokens,
        summarize=turns is not None,
    )
    return Chatbot(settings, system=SYSTEM)


def run(bot: Chatbot, mode: str, text: str) -> tuple[str, tuple[str, ...]]:
    """One turn in ``mode``: the reply's text and notices."""
    done = turn(bot, mode, text)
    return done.text, done.notices


def sent(server: OpenAITestServer) -> list[int]:
    """How many messages each chat request held, in order."""
    return [len(request["body"]["messages"]) for request in server.requests]


def four_turns(bot: Chatbot) -> None:
    for i in range(4):
        assert bot.chat(f"q{i}", session_id="s").text == f"Echo: q{i}"


@each_library_way()
@pytest.mark.parametrize(("turns", "tokens"), WINDOWS)
def test_the_retry_sends_half_of_what_overflowed(
    server: OpenAITestServer, mode: str, turns: int | None, tokens: int | None
) -> None:
    bot = make_bot(server, turns, tokens)
    four_turns(bot)
    text, notices = run(bot, mode, "q4")
    assert text == "Echo: q4"
    # The overflowed request, then the retry with the newest 4 of its 8 earlier messages.
    assert sent(server)[4:] == [1 + 8 + 1, 1 + 4 + 1]
    retry = [m["content"] for m in server.requests[-1]["body"]["messages"]]
    assert retry == [SYSTEM, *earlier(4)[4:], "q4"]
    assert notices == (
        "The conversation did not fit the model's context window; retried with the newest 4 "
        "of the 8 earlier messages sent (lower CHATCHAIN_WINDOW_TURNS or "
        "CHATCHAIN_WINDOW_TOKENS to avoid the retry).",
    )
    assert len(bot.history("s")) == 10  # the whole transcript, saved once


@each_library_way()
def test_retries_halve_again_until_a_request_fits(mode: str) -> None:
    # Only the system message and the input fit: 8 -> 4 -> 2 -> 0 earlier messages.
    probe = OpenAITestServer()
    window = prompt_tokens(probe, [SYSTEM, "q4"])
    with OpenAITestServer(context_window=window, overflow_wording="litellm") as server:
        bot = make_bot(server, 6, 3000)
        for i in range(4):  # written straight to the store: they do not fit this server
            bot.chain.get_session_history("s").add_messages(_turn(i))
        text, notices = run(bot, mode, "q4")
        assert text == "Echo: q4"
        assert sent(server) == [10, 6, 4, 2]
        assert len(notices) == 3
        assert len(bot.history("s")) == 10


@each_library_way()
def test_an_input_that_alone_overflows_is_a_clear_error(mode: str) -> None:
    probe = OpenAITestServer()
    window = prompt_tokens(probe, [SYSTEM, "q4"]) - 1
    with OpenAITestServer(context_window=window, overflow_wording="litellm") as server:
        bot = make_bot(server, 6, 3000)
        for i in range(2):
            bot.chain.get_session_history("s").add_messages(_turn(i))
        with pytest.raises(ContextTooLongError) as info:
            run(bot, mode, "q4")
        assert sent(server) == [6, 4, 2]
        message = str(info.value)
        assert "even with no earlier messages" in message
        assert "ContextWindowExceededError" in message  # the endpoint's own words
        assert "Shorten the message" in message
        assert info.value.status_code == 400
        assert len(bot.history("s")) == 4  # nothing of the failed turn was stored


def _turn(i: int) -> list[Any]:
    from langchain_core.messages import AIMessage, HumanMessage

    return [HumanMessage(f"q{i}"), AIMessage(f"Echo: q{i}")]
