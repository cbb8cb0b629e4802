"""One writer per session across processes: several processes hammer the same sessions."""

from __future__ import annotations

import multiprocessing

import pytest
from langchain_core.messages import BaseMessage

from chatchain import BudgetExceeded, Chatbot, Settings
from chatchain.stores import open_store
from chatchain.testing import FakeChatModel

pytestmark = pytest.mark.slow  # processes hammering one store

WORKERS = 4
TURNS = 12
SESSIONS = 3


def _reply(messages: list[BaseMessage]) -> str:
    # The reply says how much history it was sent: under one writer per session, the reply
    # stored at position 2k+1 of a session must have been sent exactly 2k earlier messages.
    return f"Echo: {messages[-1].text} | saw {len(messages) - 2}"


def _worker(url: str, worker: int) -> None:
    settings = Settings(
        api_key="sk-test",
        store_url=url,
        window_turns=None,
        window_tokens=None,
        summarize=False,
        lock_timeout=60.0,
    )
    with Chatbot(settings, llm=FakeChatModel(respond=_reply, delay=0.002), system="S") as bot:
        for turn in range(TURNS):
            bot.chat(f"w{worker}-t{turn}", session_id=f"shared-{turn % SESSIONS}")


@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgres"])
def test_processes_on_the_same_sessions_lose_and_interleave_nothing(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(f"{backend}_url")
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker, args=(url, w)) for w in range(WORKERS)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    store = open_store(url)
    try:
        for index in range(SESSIONS):
            sid = f"shared-{index}"
            history = store.load(sid)
            questions = [m.text for m in history[0::2]]
            expected = [
                f"w{w}-t{t}" for w in range(WORKERS) for t in range(TURNS) if t % SESSIONS == index
            ]
            assert sorted(questions) == sorted(expected)  # each exactly once
            for position in range(0, len(history), 2):
                human, ai = history[position], history[position + 1]
                assert (human.type, ai.type) == ("human", "ai")
                assert ai.text == f"Echo: {human.text} | saw {position}"
            for w in range(WORKERS):  # each worker's turns in its own order
                mine = [q for q in questions if q.startswith(f"w{w}-")]
                assert mine == [q for q in expected if q.startswith(f"w{w}-")]
            store.delete(sid)
    finally:
        store.close()


BUDGET_TOKENS = 600


def _budget_worker(url: str, worker: int, outcomes: multiprocessing.Queue[tuple[int, int]]) -> None:
    settings = Settings(
        api_key="sk-test",
        store_url=url,
        model="gpt-4o-mini",
        max_tokens=20,
        window_turns=None,
        window_tokens=None,
        summarize=False,
        budget_total_tokens=BUDGET_TOKENS,
    )
    answered = refused = 0
    with Chatbot(settings, llm=FakeChatModel(delay=0.005), system="S") as bot:
        for turn in range(40):
            try:
                bot.chat(f"w{worker} question {turn}", session_id=f"b{worker}-{turn % 4}")
                answered += 1
            except BudgetExceeded:
                refused += 1
    outcomes.put((answered, refused))


@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgres"])
def test_processes_sharing_a_budget_cannot_overspend_it(
    backend: str, request: pytest.FixtureRequest
) -> None:
    request.getfixturevalue(f"{backend}_store")  # an empty store, ledger included
    url = request.getfixturevalue(f"{backend}_url")
    context = multiprocessing.get_context("spawn")
    outcomes: multiprocessing.Queue[tuple[int, int]] = context.Queue()
    processes = [context.Process(target=_budget_worker, args=(url, w, outcomes)) for w in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    results = [outcomes.get(timeout=5) for _ in processes]
    answered = sum(a for a, _ in results)
    store = open_store(url)
    try:
        total = store.usage_total("all", "")
        assert total.total_tokens <= BUDGET_TOKENS
        assert all(r > 0 for _, r in results)  # both processes met the cap
        assert answered == total.turns == len(store.usage_entries())
        # Every answered turn is stored, every refused one is not.
        stored = sum(store.count(sid) for sid in store.sessions())
        assert stored == 2 * answered
        # The cap was used, not refused early: less than one turn's worth is left.
        assert BUDGET_TOKENS - total.total_tokens < 100
    finally:
        for sid in store.sessions():
            store.delete(sid)
        store.close()


BUDGET_USD = 0.01
LONG = "lorem ipsum " * 4000  # about 12,000 tokens: far beyond what one call may take


def _long_reply(messages: list[BaseMessage]) -> str:
    return LONG


def _uncapped_worker(url: str, worker: int, outcomes: multiprocessing.Queue[float]) -> None:
    settings = Settings(
        api_key="sk-test",
        store_url=url,
        model="gpt-4o-mini",
        window_turns=None,
        window_tokens=None,
        summarize=False,
        budget_total_usd=BUDGET_USD,  # and no CHATCHAIN_MAX_TOKENS
    )
    fake = FakeChatModel(model_name="gpt-4o-mini", respond=_long_reply, delay=0.005)
    with Chatbot(settings, llm=fake, system="S") as bot:
        try:
            for turn in range(40):
                bot.chat(f"w{worker} question {turn}", session_id=f"u{worker}-{turn % 4}")
        except BudgetExceeded as exc:
            outcomes.put(exc.needed_usd)
            return
    outcomes.put(-1.0)  # never refused: the test fails


@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgres"])
def test_processes_without_a_reply_cap_and_long_replies_stay_within_a_usd_budget(
    backend: str, request: pytest.FixtureRequest
) -> None:
    # Before: each turn held a 1,000-token reply but was sent without max_tokens, so long
    # replies took the spend past the cap; now each call asks for what its hold paid for.
    request.getfixturevalue(f"{backend}_store")  # an empty store, ledger included
    url = request.getfixturevalue(f"{backend}_url")
    context = multiprocessing.get_context("spawn")
    outcomes: multiprocessing.Queue[float] = context.Queue()
    processes = [
        context.Process(target=_uncapped_worker, args=(url, w, outcomes)) for w in range(3)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    needed = [outcomes.get(timeout=5) for _ in processes]
    store = open_store(url)
    try:
        total = store.usage_total("all", "")
        assert all(n > 0 for n in needed)  # every process met the cap
        assert total.cost_usd is not None and total.cost_usd <= BUDGET_USD
        assert BUDGET_USD - total.cost_usd < min(needed)  # and it was used up
        stored = sum(store.count(sid) for sid in store.sessions())
        assert stored == 2 * total.turns
    finally:
        for sid in store.sessions():
            store.delete(sid)
        store.close()
