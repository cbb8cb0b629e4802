"""Replies cut by a budget: whatever happens after a call was sent, the ledger has it.

A reply cut to fit a USD cap (issue 18, item 1), a reply read past its hold by an endpoint
that ignores ``max_tokens`` (item 3), and a refusal after tool rounds (issue 24, item 3),
through each entry point: ``chat``, ``stream``, ``achat`` and ``astream``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import BaseModel

from chatchain import BudgetExceeded, Chatbot, ModelPrice, Settings
from chatchain._money import format_usd
from chatchain._turn import CUT_AT_HOLD, Turn
from chatchain.budgets import BudgetHold, BudgetLimit
from chatchain.testing import FakeChatModel, Fault, OpenAITestServer, tool_call_reply
from tests.entry_points import LIBRARY, turn

PRICE = 1000.0  # USD per million tokens both ways: $0.001 a token
LONG = "lorem ipsum " * 2000  # far more than any call here may take


@dataclass(frozen=True)
class Done:
    """What a turn gave back, whichever entry point ran it."""

    text: str
    notices: tuple[str, ...]
    completion_tokens: int


Run = Callable[[Chatbot, str, str, Sequence[BudgetLimit]], Done]


def _runner(way: str) -> Run:
    """A turn of user ann run ``way`` (see `tests.entry_points.LIBRARY`), to its end."""

    def run(bot: Chatbot, text: str, session: str, limits: Sequence[BudgetLimit]) -> Done:
        done = turn(bot, way, text, session_id=session, user_id="ann", limits=limits)
        assert done.usage is not None
        return Done(done.text, done.notices, done.usage.completion_tokens)

    return run


def wait_for_bill(server: OpenAITestServer) -> dict[str, int]:
    """What the server billed, once the stream the client left has ended on its side."""
    deadline = time.monotonic() + 5
    while not server.billed["requests"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return server.billed


def no_hold_left(bot: Chatbot, tokens: int) -> bool:
    """Whether ``tokens`` can be held again on a fresh cap: no hold was left behind."""
    spent = bot.ledger.total().total_tokens
    probe = BudgetHold("probe", tokens, 0.0, datetime.now(UTC) + timedelta(minutes=1))
    refusal = bot.ledger.hold(probe, [BudgetLimit("all", "", max_tokens=spent + tokens)])
    return refusal is None


ENTRY_POINTS = pytest.mark.parametrize("run", [_runner(way) for way in LIBRARY], ids=LIBRARY)


def daily_cap(usd: float) -> list[BudgetLimit]:
    """Ann's daily cap, as `Users.limits` builds it (a labelled cap in USD only)."""
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return [BudgetLimit("user", "ann", usd, since=day, label="user ann's daily cap")]


def priced(settings: Settings, **values: object) -> Settings:
    prices = {"gpt-4o-mini": ModelPrice(input=PRICE, output=PRICE)}
    return Settings(**{**settings.model_dump(), "prices": prices, **values})


def prompt_tokens(bot: Chatbot, run: Run, text: str) -> int:
    """The prompt tokens the turn holds, read from a refusal (it needs them plus one)."""
    with pytest.raises(BudgetExceeded) as info:
        run(bot, text, "probe", daily_cap(0.000001))
    return info.value.needed_tokens - 1


@ENTRY_POINTS
def test_a_reply_cut_to_fit_a_usd_cap_is_recorded_and_stored(settings: Settings, run: Run) -> None:
    # Issue 18 item 1: CHATCHAIN_MAX_TOKENS=10 and a cap that pays for exactly 9 reply
    # tokens. Before: the notice of the cut raised TypeError after the call was billed, and
    # nothing was recorded or stored.
    fake = FakeChatModel(model_name="gpt-4o-mini", respond=lambda m: LONG)
    bot = Chatbot(priced(settings, max_tokens=10), llm=fake)
    held = prompt_tokens(bot, run, "hello there")
    cap = (held + 9.5) * PRICE / 1e6  # the first hold (10 reply tokens) is refused

    done = run(bot, "hello there", "s", daily_cap(cap))

    assert done.completion_tokens == 9
    assert bot.history("s")[-1].response_metadata["finish_reason"] == "length"
    assert done.notices == (
        f"The reply was cut at 9 tokens: that is all user ann's daily cap ({format_usd(cap)}) "
        "had left.",
    )
    assert [e.completion_tokens for e in bot.usage_entries()] == [9]
    assert [m.type for m in bot.history("s")] == ["human", "ai"]
    assert no_hold_left(bot, 1000)


def test_a_failing_notice_loses_no_entry(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever a notice does, the call the endpoint billed is recorded and the turn stored.
    def broken(self: Turn, reply: object) -> None:
        raise RuntimeError("a bug in a notice")

    monkeypatch.setattr(Turn, "_note_cut", broken)
    fake = FakeChatModel(model_name="gpt-4o-mini", respond=lambda m: LONG)
    bot = Chatbot(priced(settings, max_tokens=10, budget_total_usd=1.0), llm=fake)

    reply = bot.chat("hello", session_id="s")

    assert reply.usage is not None and reply.usage.completion_tokens == 10
    assert len(bot.history("s")) == 2
    assert len(bot.usage_entries()) == 1


@ENTRY_POINTS
def test_a_turn_that_fails_after_the_call_still_records_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    # A failure between the reply and the commit (here: the reply cannot be made storable)
    # fails the turn, but the turn's end records what the endpoint billed.
    def broken(self: Turn, reply: object) -> object:
        raise RuntimeError("cannot store this reply")

    monkeypatch.setattr(Turn, "storable", broken)
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(priced(settings, budget_total_usd=1.0), llm=fake)

    with pytest.raises(RuntimeError, match="cannot store"):
        run(bot, "hello", "s", ())

    entries = bot.usage_entries()
    assert len(entries) == 1 and entries[0].requests == 1 and entries[0].completion_tokens > 0
    assert bot.history("s") == []
    assert no_hold_left(bot, 1000)


@ENTRY_POINTS
def test_an_endpoint_that_ignores_max_tokens_is_read_only_up_to_the_hold(
    settings: Settings, run: Run
) -> None:
    # Issue 18 item 3: an endpoint that answers past max_tokens. Before: the whole reply was
    # read, billed and recorded (about 4,000 tokens on a hold of 20).
    with OpenAITestServer(chunk_interval=0.002) as server:
        server.add_fault(Fault(ignore_max_tokens=True, times=100))
        server.queue_replies(LONG, LONG)
        values = {"base_url": server.base_url, "max_tokens": 20, "max_retries": 0}
        bot = Chatbot(priced(settings, budget_total_usd=1.0, **values))

        done = run(bot, "hello", "s", ())
        billed = wait_for_bill(server)

    entry = bot.usage_entries()[0]
    stored = bot.history("s")
    assert [m.type for m in stored] == ["human", "ai"] and stored[-1].content == done.text
    assert stored[-1].response_metadata[CUT_AT_HOLD] is True
    assert stored[-1].response_metadata["finish_reason"] == "length"
    assert 20 <= entry.completion_tokens <= 25 and entry.estimated
    assert done.completion_tokens == entry.completion_tokens
    assert "stopped reading there" in done.notices[0]
    # The endpoint stopped soon after chatchain did (not after 4,000 tokens): it billed what
    # was recorded and the chunks it wrote before it saw the connection closed.
    assert billed["requests"] == 1 and billed["completion_tokens"] <= entry.completion_tokens + 50
    assert no_hold_left(bot, 1000)


def test_a_refusal_after_tool_rounds_says_what_was_sent(settings: Settings) -> None:
    # Issue 24 item 3: before, "Nothing was sent or stored" although the first call was.
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    def bot_with(fake: FakeChatModel, tokens: int | None) -> Chatbot:
        values = {"max_tokens": 20, "budget_session_tokens": tokens}
        return Chatbot(Settings(**{**settings.model_dump(), **values}), llm=fake, tools=[add])

    probe = bot_with(FakeChatModel(model_name="gpt-4o-mini"), 1)
    with pytest.raises(BudgetExceeded) as info:
        probe.chat("1 + 2?", session_id="s")
    assert "Nothing was sent or stored." in str(info.value)
    first_hold = info.value.needed_tokens - 1 + 20  # what the first call holds exactly
    fake = FakeChatModel(
        model_name="gpt-4o-mini", replies=[tool_call_reply(("add", {"a": 1, "b": 2})), "3"]
    )
    bot = bot_with(fake, first_hold)

    with pytest.raises(BudgetExceeded) as info:
        bot.chat("1 + 2?", session_id="s")

    entry = bot.usage_entries()[0]
    message = str(info.value)
    assert "Nothing was sent or stored" not in message
    assert (
        f"Nothing more was sent; 1 earlier call of this turn ({entry.total_tokens:,} tokens) "
        "had been sent and billed, and are recorded in the usage ledger." in message
    )
    assert len(fake.calls) == 1 and entry.requests == 1


def test_usd_refusals_write_small_amounts_readably(settings: Settings) -> None:
    # Issue 22: "has spent $0.0000 and this turn needs at least $0.0000".
    prices = {"gpt-4o-mini": ModelPrice(input=0.15, output=0.6)}
    values = {**settings.model_dump(), "prices": prices, "budget_session_usd": 0.000001}
    bot = Chatbot(Settings(**values), llm=FakeChatModel(model_name="gpt-4o-mini"))
    with pytest.raises(BudgetExceeded) as info:
        bot.chat("hello", session_id="s")
    message = str(info.value)
    assert "$0.0000 " not in message and "$0.0000." not in message
    assert f"needs at least {format_usd(info.value.needed_usd)}" in message
    assert "the cap for session 's' is $0.0000010" in message


class Story(BaseModel):
    text: str


def test_a_structured_reply_past_its_hold_is_recorded_whole_with_a_notice(
    settings: Settings,
) -> None:
    # A structured reply is validated whole, so it is not streamed nor cut: what the
    # endpoint billed past the hold is recorded, and the reply says so.
    with OpenAITestServer() as server:
        server.add_fault(Fault(ignore_max_tokens=True))
        server.queue_json({"text": LONG[:2000]})
        values = {"base_url": server.base_url, "max_tokens": 20, "max_retries": 0}
        bot = Chatbot(priced(settings, budget_total_usd=1.0, **values))

        reply = bot.chat("a story", session_id="s", schema=Story)
        billed = server.billed

    (entry,) = bot.usage_entries()
    assert entry.completion_tokens == billed["completion_tokens"] > 10 * 20
    assert reply.notices[0] == (
        f"The endpoint billed {entry.completion_tokens:,} reply tokens although this call was "
        "sent with max_tokens=20 and held that much in the budget: all "
        f"{entry.completion_tokens:,} are recorded, so the cap may be passed by the difference."
    )
