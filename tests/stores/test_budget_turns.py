"""Budgeted turns on every store: without a reply cap, concurrent long replies stay in the cap.

Each call is sent with the ``max_tokens`` its hold could pay for, and the holds are taken
atomically by the store, so turns racing for the rest of a budget cannot both spend it (the
multi-process case is in test_multiprocess.py).
"""

from __future__ import annotations

import threading

import pytest

from chatchain import Budget, BudgetExceeded, Chatbot, Settings
from chatchain.stores import HistoryStore
from chatchain.testing import FakeChatModel

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


@pytest.mark.parametrize(
    "budget", [Budget(total_usd=0.01), Budget(total_tokens=12_000)], ids=["usd", "tokens"]
)
def test_threads_without_max_tokens_end_within_the_cap(store: HistoryStore, budget: Budget) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini", respond=lambda m: LONG, delay=0.005)
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
