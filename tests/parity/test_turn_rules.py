"""The rules of a turn, each written once and run over every entry point (`entry_point`).

A rule that an entry point cannot express is skipped by its adapter with the reason; a rule
that fails because entry points really differ is marked ``xfail(strict=True)`` with the
drift it shows, for the turn engine to remove.
"""

from __future__ import annotations

import re
import threading

import httpx
import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage

from chatchain.testing import FakeChatModel, tool_call_reply
from tests.parity._adapters import PRICE, SYSTEM, EntryPoint

LONG = "lorem ipsum " * 2000  # far more than any call here may take


def _kept(entry_point: EntryPoint, session: str = "s") -> list[tuple[str, str]]:
    return [(m.type, m.text) for m in entry_point.history(session)]


def _earlier(turns: int) -> list[HumanMessage | AIMessage]:
    return [m for i in range(turns) for m in (HumanMessage(f"q{i}"), AIMessage(f"Echo: q{i}"))]


def test_the_reply_and_both_messages_are_stored(entry_point: EntryPoint) -> None:
    entry_point.open()

    first = entry_point.run("hello there")
    second = entry_point.run("and again")

    assert (first.error_kind, first.text) == (None, "Echo: hello there")
    assert (second.error_kind, second.text) == (None, "Echo: and again")
    assert _kept(entry_point) == [
        ("human", "hello there"),
        ("ai", "Echo: hello there"),
        ("human", "and again"),
        ("ai", "Echo: and again"),
    ]
    # The second call was sent the first turn as history.
    sent = [m.text for m in entry_point.fake.calls[-1]]
    assert sent == [SYSTEM, "hello there", "Echo: hello there", "and again"]


def test_the_ledger_records_what_the_reply_reports(entry_point: EntryPoint) -> None:
    entry_point.open()

    outcome = entry_point.run("hello there")

    (entry,) = entry_point.entries()
    assert outcome.tokens == (entry.prompt_tokens, entry.completion_tokens, entry.total_tokens)
    assert outcome.tokens[1] > 0 and not entry.estimated and entry.requests == 1
    assert entry.cost_usd is not None and entry.cost_usd > 0
    assert outcome.cost == pytest.approx(entry.cost_usd)
    assert entry.cost_usd == pytest.approx(entry.total_tokens * PRICE / 1e6)


def test_a_budget_cap_refuses_before_anything_is_sent(entry_point: EntryPoint) -> None:
    entry_point.open(budget_total_tokens=5)

    outcome = entry_point.run("hello there")

    assert outcome.error_kind == "BudgetExceeded"
    assert outcome.status == entry_point.status_for("BudgetExceeded")
    assert "CHATCHAIN_BUDGET_TOTAL_TOKENS" in outcome.error_message
    assert "Nothing was sent or stored" in outcome.error_message
    assert entry_point.fake.calls == []
    assert entry_point.history() == [] and entry_point.entries() == []


def _prompt_tokens(entry_point: EntryPoint, text: str) -> int:
    """The prompt tokens a turn of ``text`` holds, read from a refusal (it needs them + 1)."""
    entry_point.open(max_tokens=10, budget_total_usd=0.000001)
    refused = entry_point.run(text, session="probe")
    needed = re.search(r"needs at least \$([0-9]+\.[0-9]+)", refused.error_message)
    assert needed is not None, refused
    return round(float(needed.group(1)) * 1e6 / PRICE) - 1


def test_a_reply_cut_at_the_hold_is_billed_and_recorded(entry_point: EntryPoint) -> None:
    prompt = _prompt_tokens(entry_point, "hello there")
    cap = (prompt + 9.5) * PRICE / 1e6  # pays for 9 of the 10 reply tokens of max_tokens
    fake = FakeChatModel(model_name="gpt-4o-mini", respond=lambda messages: LONG)
    entry_point.open(fake, max_tokens=10, budget_total_usd=cap)

    outcome = entry_point.run("hello there")

    assert outcome.error_kind is None, outcome
    assert outcome.tokens is not None and outcome.tokens[1] == 9
    assert LONG.startswith(outcome.text) and 0 < len(outcome.text) <= 4 * 9
    if outcome.notices is not None:
        assert any("cut at 9 tokens" in notice for notice in outcome.notices), outcome.notices
    assert [e.completion_tokens for e in entry_point.entries()] == [9]
    assert len(fake.calls) == 1  # the one call billed is the one recorded
    stored = entry_point.history()
    assert [m.type for m in stored] == ["human", "ai"] and stored[-1].text == outcome.text
    assert stored[-1].response_metadata["finish_reason"] == "length"


def _server_error() -> openai.InternalServerError:
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    body = {"message": "boom", "type": "error", "code": None}
    return openai.InternalServerError(
        "boom", response=httpx.Response(500, request=request), body=body
    )


def test_an_endpoint_error_before_the_reply_changes_nothing(entry_point: EntryPoint) -> None:
    entry_point.open(FakeChatModel(model_name="gpt-4o-mini", errors=[_server_error()]))
    entry_point.seed(_earlier(1))

    outcome = entry_point.run("second")

    assert outcome.error_kind == "ServerError"
    assert outcome.status == entry_point.status_for("ServerError")
    assert "try again later" in outcome.error_message.lower()
    assert outcome.text == ""
    assert _kept(entry_point) == [("human", "q0"), ("ai", "Echo: q0")]
    assert entry_point.entries() == []  # the endpoint billed nothing
    # The session still works afterwards.
    assert entry_point.run("third").text == "Echo: third"
    assert len(entry_point.history()) == 4


def _join_workers() -> None:
    """Wait for the workers that turns gave up on (they end when their call returns)."""
    for thread in threading.enumerate():
        if thread.name in ("chatchain-turn", "chatchain-stream"):
            thread.join(timeout=10)


def test_the_turn_deadline_ends_the_turn_and_keeps_history_consistent(
    entry_point: EntryPoint,
) -> None:
    slow = FakeChatModel(model_name="gpt-4o-mini", delay=1.2)  # per reply, and per chunk
    entry_point.open(slow, turn_deadline=0.5)  # room for the turn after it on a busy machine
    entry_point.seed(_earlier(1))

    outcome = entry_point.run("hello")
    slow.delay = 0.0
    _join_workers()

    assert outcome.error_kind == "TurnDeadlineError"
    assert outcome.status == entry_point.status_for("TurnDeadlineError")
    assert "CHATCHAIN_TURN_DEADLINE" in outcome.error_message
    assert "Nothing was stored" in outcome.error_message
    assert _kept(entry_point) == [("human", "q0"), ("ai", "Echo: q0")]
    assert entry_point.entries() == []
    # The session is free: a turn on it runs at once.
    assert entry_point.run("again").text == "Echo: again"
    assert _kept(entry_point)[-2:] == [("human", "again"), ("ai", "Echo: again")]


def _context_overflow() -> openai.BadRequestError:
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    body = {"message": "maximum context length exceeded", "code": "context_length_exceeded"}
    response = httpx.Response(400, request=request)
    return openai.BadRequestError("context too long", response=response, body=body)


def test_a_context_overflow_is_retried_with_half_the_history(entry_point: EntryPoint) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini", errors=[_context_overflow()])
    entry_point.open(fake)
    entry_point.seed(_earlier(4))

    outcome = entry_point.run("q4")

    assert (outcome.error_kind, outcome.text) == (None, "Echo: q4")
    # The overflowed call, then the retry with the newest 4 of its 8 earlier messages.
    assert [len(call) for call in fake.calls] == [1 + 8 + 1, 1 + 4 + 1]
    assert [m.text for m in fake.calls[-1]] == [SYSTEM, *[m.text for m in _earlier(4)[4:]], "q4"]
    if outcome.notices is not None:
        (notice,) = outcome.notices
        assert "newest 4 of the 8 earlier messages" in notice
    assert len(entry_point.history()) == 10  # the whole transcript, saved once
    (entry,) = entry_point.entries()  # the refused call was not billed
    assert entry.requests == 1


def test_a_stream_stopped_by_the_caller_keeps_the_partial_reply_interrupted(
    entry_point: EntryPoint,
) -> None:
    # Pieces 50 ms apart: the service joins pieces that come within a few ms into one event,
    # so a reply made at once could be sent whole before the client leaves.
    fake = FakeChatModel(
        model_name="gpt-4o-mini", replies=["one two three four five six"], delay=0.05
    )
    entry_point.open(fake)

    outcome = entry_point.run("count", stop_after=2)

    assert outcome.error_kind is None
    stored = entry_point.history()
    assert [(m.type, m.text) for m in stored[:1]] == [("human", "count")]
    assert [m.type for m in stored] == ["human", "ai"]
    partial = stored[1]
    assert partial.response_metadata.get("interrupted") is True
    assert partial.text.startswith(outcome.text) and partial.text != "one two three four five six"
    # The call reached the endpoint: it is in the ledger, once.
    assert len(entry_point.entries()) == 1
    # The session goes on.
    assert entry_point.run("next").text == "Echo: next"


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def test_tool_events_come_in_order(entry_point: EntryPoint) -> None:
    fake = FakeChatModel(
        model_name="gpt-4o-mini",
        replies=[tool_call_reply(("add", {"a": 1, "b": 2})), "It is 3."],
    )
    entry_point.open(fake, tools=[add])

    outcome = entry_point.run("1 + 2?", events=True)

    assert outcome.error_kind is None and outcome.text == "It is 3."
    assert outcome.events == ("started:add", "finished:add", "text")
    assert [m.type for m in entry_point.history()] == ["human", "ai", "tool", "ai"]
    assert entry_point.history()[2].text == "3"


def _connection_lost(messages: object) -> str:
    raise openai.APIConnectionError(
        request=httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    )


def test_a_failure_after_a_tool_round_keeps_the_exchange_and_records_the_billed_call(
    entry_point: EntryPoint,
) -> None:
    fake = FakeChatModel(
        model_name="gpt-4o-mini",
        replies=[tool_call_reply(("add", {"a": 1, "b": 2}))],
        respond=_connection_lost,  # the second call, after the tool ran
    )
    entry_point.open(fake, tools=[add])

    outcome = entry_point.run("1 + 2?")

    assert outcome.error_kind == "EndpointConnectionError"
    assert len(fake.calls) == 2
    (entry,) = entry_point.entries()  # the first call was billed; the second never answered
    assert entry.requests == 1 and entry.prompt_tokens > 0
    stored = entry_point.history()
    assert [m.type for m in stored] == ["human", "ai", "tool", "ai"]
    assert stored[2].text == "3"
    assert stored[-1].response_metadata.get("interrupted") is True
