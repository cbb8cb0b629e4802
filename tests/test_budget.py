"""Budgets: a turn that could pass a cap is refused before it is sent, and nothing is stored."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta

import pytest

from chatchain import Budget, BudgetExceeded, Chatbot, ConfigurationError, ModelPrice, Settings
from chatchain.budgets import BudgetHold, BudgetLimit
from chatchain.errors import ServerError
from chatchain.testing import FakeChatModel
from chatchain.usage import UsageEntry


def make_bot(settings: Settings, fake: FakeChatModel, **overrides: object) -> Chatbot:
    values = {**settings.model_dump(), "max_tokens": 20, **overrides}
    return Chatbot(Settings(**values), llm=fake)


def test_token_cap_per_session_refuses_before_sending(
    settings: Settings, fake: FakeChatModel
) -> None:
    bot = make_bot(settings, fake, budget_session_tokens=150)
    turns = 0
    with pytest.raises(BudgetExceeded) as info:
        for _ in range(20):
            bot.chat("tell me something", session_id="s")
            turns += 1
    assert 1 <= turns < 20
    calls, history, spent = len(fake.calls), bot.history("s"), bot.usage("s")
    error = info.value
    assert (error.scope, error.key, error.limit_tokens) == ("session", "s", 150)
    assert error.spent_tokens == spent.total_tokens
    assert error.spent_tokens + error.needed_tokens > 150
    message = str(error)
    assert "session 's'" in message and "150 tokens" in message
    assert f"{spent.total_tokens:,} tokens" in message
    assert "CHATCHAIN_BUDGET_SESSION_TOKENS" in message
    # Refused again, and nothing was sent, stored or counted.
    with pytest.raises(BudgetExceeded):
        bot.chat("and again", session_id="s")
    assert len(fake.calls) == calls
    assert bot.history("s") == history and len(history) == 2 * turns
    assert bot.usage("s") == spent
    # Other sessions have their own cap.
    assert bot.chat("hello", session_id="other").text == "Echo: hello"


def test_usd_cap_per_user_spans_sessions(settings: Settings, fake: FakeChatModel) -> None:
    # 1 USD per million tokens both ways: easy arithmetic.
    prices = {"gpt-4o-mini": ModelPrice(input=1.0, output=1.0)}
    bot = make_bot(settings, fake, prices=prices, budget_user_usd=0.0002)
    spent = 0
    with pytest.raises(BudgetExceeded, match=r"user 'ann'.*\$0\.0002.*CHATCHAIN_BUDGET_USER_USD"):
        for i in range(50):
            bot.chat("hi there", session_id=f"s{i}", user_id="ann")
            spent += 1
    assert spent >= 2  # several sessions counted against one user
    total = bot.usage(user_id="ann")
    assert total.cost_usd is not None and total.cost_usd <= 0.0002
    # Another user, or no user, is not capped by ann's budget.
    assert bot.chat("hi", session_id="x", user_id="bob").text == "Echo: hi"
    assert bot.chat("hi", session_id="y").text == "Echo: hi"


def test_overall_cap_counts_everything(settings: Settings, fake: FakeChatModel) -> None:
    bot = make_bot(settings, fake, budget_total_tokens=200)
    with pytest.raises(BudgetExceeded, match="everything in this store"):
        for i in range(50):
            bot.chat("hi", session_id=f"s{i}")
    assert bot.usage().total_tokens <= 200


def test_budget_passed_in_code_wins(settings: Settings, fake: FakeChatModel) -> None:
    bot = Chatbot(settings, llm=fake, budget=Budget(session_tokens=1))
    with pytest.raises(BudgetExceeded):
        bot.chat("hi", session_id="s")
    assert fake.calls == []


def test_usd_cap_with_an_unknown_price_refuses_clearly(settings: Settings) -> None:
    fake = FakeChatModel(model_name="my-local-llama")
    values = {**settings.model_dump(), "model": "my-local-llama", "budget_session_usd": 1.0}
    bot = Chatbot(Settings(**values), llm=fake)
    with pytest.raises(
        ConfigurationError, match=r"price of model 'my-local-llama'.*CHATCHAIN_PRICES"
    ):
        bot.chat("hi", session_id="s")
    assert fake.calls == [] and bot.history("s") == []
    # A token cap needs no price.
    values = {**values, "budget_session_usd": None, "budget_session_tokens": 10_000}
    assert Chatbot(Settings(**values), llm=fake).chat("hi").usage.cost_usd is None


def test_a_stream_is_checked_on_its_first_next(settings: Settings, fake: FakeChatModel) -> None:
    bot = make_bot(settings, fake, budget_session_tokens=10)
    stream = bot.stream("hello", session_id="s")  # nothing is sent yet
    with pytest.raises(BudgetExceeded):
        next(stream)
    assert fake.calls == [] and bot.history("s") == [] and bot.usage("s").turns == 0


def test_a_failed_turn_gives_its_hold_back(settings: Settings) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini", errors=[ServerError("down")])
    bot = make_bot(settings, fake, budget_session_tokens=120)
    with pytest.raises(ServerError):
        bot.chat("hi", session_id="s")
    # Had the failed turn kept its hold (about 100 tokens), this one would be refused.
    assert bot.chat("hi", session_id="s").text == "Echo: hi"


def test_interrupted_stream_is_estimated_and_frees_its_hold(
    settings: Settings, fake: FakeChatModel
) -> None:
    bot = make_bot(settings, fake, budget_session_tokens=10_000)
    fake.queue("one two three four five")
    with bot.stream("count", session_id="s") as stream:
        next(stream)
    (entry,) = bot.usage_entries(session_id="s")
    # The usage chunk never came; the prompt and the partial reply were counted here.
    assert entry.estimated and entry.prompt_tokens > 0 and entry.completion_tokens > 0
    assert entry.cost_usd is not None and entry.cost_usd > 0
    # No hold is left over: the whole rest of the cap can be held again.
    rest = 10_000 - entry.total_tokens
    probe = BudgetHold("s", rest, 0.0, datetime.now(UTC) + timedelta(minutes=1))
    limit = BudgetLimit("session", "s", max_tokens=10_000)
    assert bot.ledger.hold(probe, [limit]) is None


def test_concurrent_turns_cannot_overspend_together(settings: Settings) -> None:
    # Slow replies keep every turn in flight at once; each needs about 60 tokens.
    fake = FakeChatModel(model_name="gpt-4o-mini", delay=0.05)
    bot = make_bot(settings, fake, budget_total_tokens=300)

    async def run() -> list[object]:
        return await asyncio.gather(
            *(bot.achat("hi", session_id=f"s{i}") for i in range(20)), return_exceptions=True
        )

    results = asyncio.run(run())
    refused = [r for r in results if isinstance(r, BudgetExceeded)]
    answered = [r for r in results if not isinstance(r, BaseException)]
    assert len(refused) + len(answered) == 20
    assert 1 <= len(answered) < 20
    assert bot.usage().total_tokens <= 300
    assert "turns in flight" in str(refused[0])


def test_concurrent_threads_cannot_overspend_together(settings: Settings) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini", delay=0.02)
    bot = make_bot(settings, fake, budget_total_tokens=300)
    outcomes: list[str] = []

    def worker(i: int) -> None:
        try:
            bot.chat("hi", session_id=f"t{i}")
            outcomes.append("ok")
        except BudgetExceeded:
            outcomes.append("refused")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "ok" in outcomes and "refused" in outcomes
    assert bot.usage().total_tokens <= 300


def test_summary_calls_are_recorded_and_checked(settings: Settings, fake: FakeChatModel) -> None:
    values = {**settings.model_dump(), "window_turns": 1, "summarize": True}
    bot = Chatbot(Settings(**values), llm=fake)
    for i in range(6):
        bot.chat(f"message {i}", session_id="s")
    entries = bot.usage_entries(session_id="s")
    summaries = [e for e in entries if e.summary]
    assert summaries and all(e.total_tokens > 0 and e.cost_usd for e in summaries)
    assert bot.usage("s").summaries == len(summaries)
    assert bot.usage("s").turns == 6
    # A cap that the next summary call would pass stops the turn before that call.
    spent = bot.usage("s").total_tokens
    capped = Chatbot(
        Settings(**values), llm=fake, store=bot.store, budget=Budget(session_tokens=spent + 5)
    )
    calls = len(fake.calls)
    with pytest.raises(BudgetExceeded):
        for i in range(6):
            capped.chat(f"more {i}", session_id="s")
    assert len(fake.calls) >= calls  # some turns may fit; the refused one sent nothing
    assert bot.usage("s").total_tokens <= spent + 5


def test_a_summary_call_holds_its_own_max_tokens(settings: Settings, fake: FakeChatModel) -> None:
    # Turns hold CHATCHAIN_MAX_TOKENS (20) for the reply, a summary call its own cap (400).
    bot = make_bot(
        settings,
        fake,
        window_turns=1,
        summarize=True,
        summary_max_tokens=400,
        budget_session_tokens=300,
    )
    with pytest.raises(BudgetExceeded) as info:
        for i in range(6):
            bot.chat(f"message {i}", session_id="s")
    assert bot.usage("s").turns == 3 and bot.usage("s").summaries == 0
    assert info.value.needed_tokens > 400 and info.value.spent_tokens < 300


def test_entries_say_who_and_what(settings: Settings, fake: FakeChatModel) -> None:
    bot = make_bot(settings, fake)
    reply = bot.chat("hi", session_id="s", user_id="ann")
    (entry,) = bot.usage_entries()
    assert isinstance(entry, UsageEntry)
    assert (entry.session_id, entry.user_id, entry.model) == ("s", "ann", "gpt-4o-mini")
    assert entry.price_source == "genai-prices" and not entry.summary and not entry.estimated
    assert entry.usage() == reply.usage
    with pytest.raises(Exception, match="user id"):
        bot.chat("hi", session_id="s", user_id="bad\nid")


LONG = "lorem ipsum " * 2000  # about 6,000 tokens: longer than any reply a budget allows


def test_without_max_tokens_a_reply_is_cut_to_what_the_cap_has_left(settings: Settings) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini", respond=lambda m: LONG)
    bot = Chatbot(settings, llm=fake, budget=Budget(session_tokens=5500))
    replies = []
    with pytest.raises(BudgetExceeded, match="CHATCHAIN_BUDGET_SESSION_TOKENS"):
        for i in range(10):
            replies.append(bot.chat(f"question {i}", session_id="s"))
    entries = bot.usage_entries()
    assert [e.completion_tokens for e in entries[:2]] == [1000, 1000]  # the default reply cap
    assert "cut at 1,000 tokens" in replies[0].notices[0]
    assert "Set CHATCHAIN_MAX_TOKENS" in replies[0].notices[0]
    last = entries[-1].completion_tokens
    assert 1 <= last < 1000 and replies[-1].message.response_metadata["finish_reason"] == "length"
    assert replies[-1].notices == (
        f"The reply was cut at {last:,} tokens: that is all the cap for session 's' "
        "(5,500 tokens) had left. Raise CHATCHAIN_BUDGET_SESSION_TOKENS for longer replies.",
    )
    # The fake bills what was counted, so the cut reply used the cap up exactly.
    assert bot.usage("s").total_tokens == 5500


def test_a_reply_cut_by_your_own_max_tokens_has_no_budget_notice(settings: Settings) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini", respond=lambda m: LONG)
    bot = make_bot(settings, fake, budget_session_tokens=10_000)  # max_tokens=20
    reply = bot.chat("hi", session_id="s")
    assert reply.usage.completion_tokens == 20 and reply.notices == ()
    # Without a budget nothing is added to the call.
    plain = make_bot(settings, FakeChatModel(model_name="gpt-4o-mini", respond=lambda m: LONG))
    assert plain.chat("hi", session_id="s").usage.completion_tokens > 1000


def test_streams_and_async_turns_are_cut_the_same_way(settings: Settings) -> None:
    prices = {"gpt-4o-mini": ModelPrice(input=1.0, output=1.0)}  # 1 USD per million tokens
    values = {**settings.model_dump(), "prices": prices, "budget_total_usd": 0.0025}
    fake = FakeChatModel(model_name="gpt-4o-mini", respond=lambda m: LONG)
    bot = Chatbot(Settings(**values), llm=fake)

    async def run() -> list[tuple[str, ...]]:
        notices: list[tuple[str, ...]] = []
        with pytest.raises(BudgetExceeded):
            for i in range(10):
                if i % 2:
                    notices.append((await bot.achat(f"q{i}", session_id=f"s{i}")).notices)
                else:
                    with bot.stream(f"q{i}", session_id=f"s{i}") as stream:
                        assert "".join(stream)
                    notices.append(stream.notices)
        return notices

    notices = asyncio.run(run())
    spent = bot.usage().cost_usd
    assert len(notices) == 3 and spent is not None and 0.00249 <= spent <= 0.0025
    assert ["cut at 1,000 tokens" in n[0] for n in notices] == [True, True, False]
    assert "all the cap for everything in this store ($0.0025) had left" in notices[2][0]
    assert "CHATCHAIN_BUDGET_TOTAL_USD" in notices[2][0]
    assert [e.completion_tokens < 1000 for e in bot.usage_entries()] == [False, False, True]


def test_concurrent_threads_without_max_tokens_stay_within_a_usd_cap(settings: Settings) -> None:
    # Before: each turn held a 1,000-token reply but sent no max_tokens; long replies took
    # the spend to several times the cap.
    values = {**settings.model_dump(), "budget_total_usd": 0.01}
    fake = FakeChatModel(model_name="gpt-4o-mini", respond=lambda m: LONG * 2, delay=0.0005)
    bot = Chatbot(Settings(**values), llm=fake)
    refused: list[BudgetExceeded] = []

    def worker(w: int) -> None:
        try:
            for i in range(40):
                bot.chat(f"w{w} q{i}", session_id=f"w{w}")
        except BudgetExceeded as exc:
            refused.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spent = bot.usage().cost_usd
    assert len(refused) == 6 and spent is not None
    assert 0.0099 <= spent <= 0.01


def test_a_turn_that_cannot_pay_for_one_reply_token_is_refused(settings: Settings) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(settings, llm=fake, budget=Budget(session_tokens=40))
    with pytest.raises(BudgetExceeded, match="needs at least") as info:
        for _ in range(10):
            bot.chat("hello there", session_id="s")
    error = info.value
    assert error.spent_tokens + error.needed_tokens > 40
    calls = len(fake.calls)
    with pytest.raises(BudgetExceeded):
        bot.chat("hello there", session_id="s")
    assert len(fake.calls) == calls and bot.usage("s").total_tokens <= 40


def test_an_uncapped_summary_call_is_sent_with_the_max_tokens_it_holds(
    settings: Settings,
) -> None:
    # No summary budget and no CHATCHAIN_SUMMARY_MAX_TOKENS: the summary call holds the
    # default reply cap and is sent with it, so a verbose summarizer cannot pass the hold.
    values = {**settings.model_dump(), "window_turns": 1, "summarize": True}
    values |= {"summary_tokens": None, "budget_session_tokens": 100_000}
    fake = FakeChatModel(model_name="gpt-4o-mini", respond=lambda m: LONG)
    bot = Chatbot(Settings(**values), llm=fake)
    for i in range(4):
        bot.chat(f"message {i}", session_id="s")
    summaries = [e for e in bot.usage_entries(session_id="s") if e.summary]
    assert summaries and {e.completion_tokens for e in summaries} == {1000}
