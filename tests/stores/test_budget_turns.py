"""Budgeted turns on every store: without a reply cap, concurrent long replies stay in the cap.

Each call is sent with the ``max_tokens`` its hold could pay for, and the holds are taken
atomically by the store, so turns racing for the rest of a budget cannot both spend it (the
multi-process case is in test_multiprocess.py).
"""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta

import pytest

from chatchain import Budget, BudgetExceeded, Chatbot, ModelPrice, Settings
from chatchain.budgets import BudgetHold, BudgetLimit
from chatchain.stores import HistoryStore
from chatchain.testing import FakeChatModel, Fault, OpenAITestServer
from chatchain.usage import UsageLedger

LONG = "lorem ipsum " * 4000  # about 12,000 tokens: far beyond what one call may take


def settings() -> Settings:
    return Settings(
        api_key="sk-test",
        model="gpt-4o-mini",
        window_turns=None,
        window_tokens=None,
        summarize=False,
        lock_timeout=5.0,
    )


# Slow: six threads of long replies per store; in the fast tier, the same on the memory store is
# tests/test_budget.py::test_concurrent_threads_without_max_tokens_stay_within_a_usd_cap.
@pytest.mark.slow
@pytest.mark.parametrize(
    "budget", [Budget(total_usd=0.01), Budget(total_tokens=12_000)], ids=["usd", "tokens"]
)
def test_threads_without_max_tokens_end_within_the_cap(store: HistoryStore, budget: Budget) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini", respond=lambda m: LONG, delay=0.0005)
    bot = Chatbot(settings(), llm=fake, store=store, budget=budget)
    refused: list[BudgetExceeded] = []

    def worker(w: int) -> None:
        try:
            for i in range(40):
                bot.chat(f"w{w} question {i}", session_id=f"w{w}")
        except BudgetExceeded as exc:
            refused.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = bot.usage()
    # Within the cap, and used up: a turn was refused only when less was left than its
    # prompt and one reply token (holds become entries of exactly their size here).
    if budget.total_usd is not None:
        assert total.cost_usd is not None and total.cost_usd <= budget.total_usd
        assert budget.total_usd - total.cost_usd < min(e.needed_usd for e in refused)
    else:
        assert budget.total_tokens is not None and total.total_tokens <= budget.total_tokens
        assert budget.total_tokens - total.total_tokens < min(e.needed_tokens for e in refused)
    assert len(refused) == 6 and total.turns == len(store.usage_entries()) >= 6


PRICE = 1000.0  # USD per million tokens both ways: $0.001 a token


def priced(**values: object) -> Settings:
    prices = {"gpt-4o-mini": ModelPrice(input=PRICE, output=PRICE)}
    return Settings(**{**settings().model_dump(), "prices": prices, **values})


def daily_cap(user: str, usd: float) -> list[BudgetLimit]:
    """The user's daily cap as `Users.limits` builds it: labelled, in USD only."""
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return [BudgetLimit("user", user, usd, since=day, label=f"user {user}'s daily cap")]


def no_hold_left(store: HistoryStore) -> bool:
    ledger = UsageLedger(store)
    cap = ledger.total().total_tokens + 10**6
    probe = BudgetHold("probe", 10**6, 0.0, datetime.now(UTC) + timedelta(minutes=1))
    return ledger.hold(probe, [BudgetLimit("all", "", max_tokens=cap)]) is None


@pytest.mark.parametrize("streamed", [False, True], ids=["chat", "stream"])
def test_a_reply_cut_to_fit_a_usd_cap_is_recorded_on_every_store(
    store: HistoryStore, streamed: bool
) -> None:
    # Issue 18 item 1: CHATCHAIN_MAX_TOKENS=10, and a daily cap that pays for 9 reply tokens.
    # Before: the call was sent and billed, then the turn failed (TypeError) and nothing
    # was recorded or stored.
    fake = FakeChatModel(model_name="gpt-4o-mini", respond=lambda m: LONG)
    bot = Chatbot(priced(max_tokens=10), llm=fake, store=store)
    with pytest.raises(BudgetExceeded) as info:
        bot.chat("hello", session_id="probe", user_id="ann", limits=daily_cap("ann", 1e-6))
    cap = (info.value.needed_tokens - 1 + 9.5) * PRICE / 1e6

    if streamed:
        with bot.stream("hello", session_id="s", user_id="ann", limits=daily_cap("ann", cap)) as s:
            "".join(s)
        notices = s.notices
    else:
        notices = bot.chat(
            "hello", session_id="s", user_id="ann", limits=daily_cap("ann", cap)
        ).notices

    (entry,) = UsageLedger(store).entries(session_id="s")
    assert entry.completion_tokens == 9 and entry.user_id == "ann"
    assert "cut at 9 tokens: that is all user ann's daily cap" in notices[0]
    assert [m.type for m in store.load("s")] == ["human", "ai"]
    assert no_hold_left(store)


@pytest.mark.parametrize("streamed", [False, True], ids=["chat", "astream"])
def test_an_endpoint_ignoring_max_tokens_is_cut_at_the_hold_on_every_store(
    store: HistoryStore, streamed: bool
) -> None:
    # Issue 18 item 3: before, the whole reply (thousands of tokens) was read and recorded
    # although the call held 20 reply tokens.
    with OpenAITestServer(chunk_interval=0.002) as server:
        server.add_fault(Fault(ignore_max_tokens=True))
        server.queue_replies(LONG)
        values = {"base_url": server.base_url, "max_tokens": 20, "max_retries": 0}
        bot = Chatbot(priced(budget_total_usd=1.0, **values), store=store)
        if streamed:

            async def run() -> tuple[str, ...]:
                stream = bot.astream("hello", session_id="s")
                async with stream:
                    async for _ in stream:
                        pass
                return stream.notices

            notices = asyncio.run(run())
        else:
            notices = bot.chat("hello", session_id="s").notices

    (entry,) = UsageLedger(store).entries(session_id="s")
    assert entry.estimated and 20 <= entry.completion_tokens <= 25
    assert "stopped reading there" in notices[0]
    reply = store.load("s")[-1]
    assert reply.response_metadata["cut_at_hold"] is True and len(reply.text) < 200
    assert no_hold_left(store)
