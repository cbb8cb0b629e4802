"""End to end: the sync deadline is kept where the bytes arrive, in the caller's thread.

The real `ChatOpenAI` over loopback, against `OpenAITestServer` endpoints that keep a reply
alive with keep-alive bytes past the deadline, or ask for a retry after it. The turn ends at
its deadline with `TurnDeadlineError` without a worker thread (none named ``chatchain-*``
runs, during the stream or after it), and the openai client's retry that would go out after
the deadline is never sent (the server counts the requests it received).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_openai import ChatOpenAI

from chatchain import Chatbot, Settings, TurnDeadlineError
from chatchain.model import bounds_its_deadline, prepare_chat_model
from chatchain.testing import Fault, OpenAITestServer
from tests.reliability.conftest import assert_ledger_adds_up, assert_no_hold_left

DEADLINE = 1.0
SLACK = 0.5  # the turn ends this close to its deadline
SID = "s"
MODES = ["chat", "stream"]


@pytest.fixture
def server() -> Iterator[OpenAITestServer]:
    with OpenAITestServer() as server:
        yield server


@pytest.fixture
def bot(server: OpenAITestServer) -> Iterator[Chatbot]:
    settings = Settings(
        api_key="sk-e2e-secret-0123456789abcdef",
        base_url=server.base_url,
        model="gpt-4o-mini",
        max_retries=2,
        timeout=5.0,
        turn_deadline=DEADLINE,
        store_url="memory://",
        budget_session_tokens=10**9,  # every turn takes a hold, which must be given back
    )
    with Chatbot(settings) as bot:
        yield bot


def _workers() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("chatchain-")]


def _turn(bot: Chatbot, mode: str, pieces: list[str], workers: list[str]) -> None:
    if mode == "chat":
        bot.chat("one two three", session_id=SID)
        return
    for piece in bot.stream("one two three", session_id=SID):
        pieces.append(piece)
        workers.extend(_workers())  # while the stream runs


@pytest.mark.parametrize("mode", MODES)
def test_keep_alive_bytes_past_the_deadline_end_the_turn_in_the_callers_thread(
    server: OpenAITestServer, bot: Chatbot, mode: str
) -> None:
    # Two chunks, then an SSE comment (a blank for a non-streamed reply) every 50 ms for
    # 30 s: no read ever times out; only the deadline, checked on each of them, ends it.
    server.add_fault(Fault(keep_alive=30.0, stall_after=2, interval=0.05))
    pieces: list[str] = []
    workers: list[str] = []
    started = time.perf_counter()
    with pytest.raises(TurnDeadlineError, match="CHATCHAIN_TURN_DEADLINE"):
        _turn(bot, mode, pieces, workers)
    elapsed = time.perf_counter() - started

    assert DEADLINE <= elapsed < DEADLINE + SLACK, elapsed
    assert workers == [] and _workers() == []  # no thread read the reply, or was abandoned
    assert len(server.requests) == 1
    history = bot.history(SID)
    if mode == "stream":
        assert pieces == ["Echo:", " one"]
        human, partial = history
        assert isinstance(human, HumanMessage) and human.text == "one two three"
        assert isinstance(partial, AIMessage) and partial.text == "Echo: one"
        assert partial.response_metadata["interrupted"] is True
        (entry,) = bot.usage_entries()
        assert (entry.requests, entry.estimated) == (1, True)
    else:
        assert history == [] and bot.usage_entries() == []
    assert_no_hold_left(bot, SID)
    assert_ledger_adds_up(bot)

    server.clear()  # the session is free, and the same connection pool serves the next turn
    assert bot.chat("again", session_id=SID).text == "Echo: again"


@pytest.mark.parametrize("mode", MODES)
def test_a_retry_due_after_the_deadline_is_never_sent(
    server: OpenAITestServer, bot: Chatbot, mode: str
) -> None:
    # The endpoint asks for a retry in 2 s: after the turn's deadline (1 s). The openai client
    # would sleep, then send it; a worker thread given up on at the deadline sent it, billed
    # and never recorded. Now it is never sent, and the turn ends at its deadline.
    server.add_fault(Fault(status=429, retry_after=2.0, times=3))
    started = time.perf_counter()
    with pytest.raises(TurnDeadlineError):
        _turn(bot, mode, [], [])
    elapsed = time.perf_counter() - started
    assert DEADLINE <= elapsed < DEADLINE + SLACK, elapsed

    time.sleep(2.0 + SLACK)  # past the time the retry was due
    assert len(server.requests) == 1
    assert _workers() == []
    assert bot.history(SID) == [] and bot.usage_entries() == []
    assert_no_hold_left(bot, SID)


def test_a_users_chat_openai_gets_the_deadline_transport(server: OpenAITestServer) -> None:
    own = ChatOpenAI(model="gpt-4o-mini", api_key="sk-test", base_url=server.base_url)
    assert bounds_its_deadline(prepare_chat_model(own))
    assert own.http_client is None  # the user's model is not changed

    with openai.DefaultHttpxClient() as client:  # the user's own client stays theirs
        theirs = ChatOpenAI(
            model="gpt-4o-mini", api_key="sk-test", base_url=server.base_url, http_client=client
        )
        prepared = prepare_chat_model(theirs)
        assert prepared.http_client is client  # type: ignore[attr-defined]
        assert not bounds_its_deadline(prepared)
