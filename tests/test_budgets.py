"""The budget rules of `chatchain.budgets`, alone: hold sizing, cuts, refusals and their words.

The turns that use them are tested in test_budget.py and test_budget_cuts.py; the stores'
check in tests/stores/test_budget_rule_contract.py.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from langchain_core.messages import HumanMessage

from chatchain import ConfigurationError, InvalidInputError, ModelPrice
from chatchain._tokens import UTF8_BYTES
from chatchain.budgets import (
    DEFAULT_REPLY_LIMIT,
    MIN_REPLY_TOKENS,
    Budget,
    BudgetHold,
    BudgetLimit,
    BudgetRefusal,
    HoldSizing,
    call_limits,
    cap_words,
    check_limit,
    cut_notice,
    exceeded,
    sent_so_far,
)
from chatchain.pricing import Pricer
from chatchain.usage import Usage

MODEL = "priced-model"
# 1 USD per million prompt tokens, 4 per million reply tokens: the parts are told apart.
PRICER = Pricer({MODEL: ModelPrice(input=1.0, output=4.0)})
TTL = timedelta(minutes=15)


def sizing(
    *limits: BudgetLimit, spent: tuple[int, int] = (0, 0), model: str | None = MODEL
) -> HoldSizing:
    needs_price = any(limit.max_usd is not None for limit in limits)
    return HoldSizing("s", "u", limits, PRICER, model, needs_price, TTL, spent)


def refusal_of(limit: BudgetLimit, hold: BudgetHold, spent: Usage) -> BudgetRefusal:
    refusal = check_limit(limit, spent, [], hold)
    assert refusal is not None, "the case must start from a refused hold"
    return refusal


def cost(prompt: int, reply: int) -> float:
    price = PRICER.price(MODEL, prompt, reply).cost_usd
    assert price is not None
    return price


# -- the first hold ------------------------------------------------------------------------


def test_a_hold_is_the_prompt_plus_the_reply_it_may_take_priced() -> None:
    hold = sizing().hold(prompt_tokens=300, reply_tokens=DEFAULT_REPLY_LIMIT)
    assert hold.tokens == 300 + DEFAULT_REPLY_LIMIT
    assert hold.cost_usd == pytest.approx(cost(300, DEFAULT_REPLY_LIMIT))
    assert (hold.session_id, hold.user_id) == ("s", "u")
    assert hold.expires_at - datetime.now(UTC) == pytest.approx(TTL, abs=timedelta(seconds=5))


def test_a_later_call_of_the_turn_holds_the_earlier_calls_too() -> None:
    # A tool round's call: the turn's first call (400 prompt + 50 reply) is not recorded yet.
    plan = sizing(spent=(400, 50))
    hold = plan.hold(prompt_tokens=500, reply_tokens=100)
    assert hold.tokens == 400 + 50 + 500 + 100
    assert hold.cost_usd == pytest.approx(cost(900, 150))
    assert plan.reply_tokens(hold, prompt_tokens=500) == 100  # what the call is sent with


def test_an_unknown_price_refuses_a_usd_cap_only() -> None:
    unknown = sizing(BudgetLimit("session", "s", max_usd=1.0), model="nobody-knows")
    with pytest.raises(ConfigurationError, match=r"'nobody-knows' is unknown.*CHATCHAIN_PRICES"):
        unknown.hold(10, 10)
    tokens_only = sizing(BudgetLimit("session", "s", max_tokens=100), model="nobody-knows")
    assert tokens_only.hold(10, 10).cost_usd == 0.0


def test_a_cjk_prompt_is_held_at_a_token_per_character_at_least() -> None:
    # Real tokenizers bill CJK text at about a token a character; the offline bound counts
    # its UTF-8 bytes (3 a character), so the hold is never below what the endpoint bills.
    text = "这是一个关于预算的问题请详细回答。" * 20
    prompt = UTF8_BYTES([HumanMessage(text)])
    hold = sizing().hold(prompt, reply_tokens=200)
    assert hold.tokens >= len(text) + 200
    assert hold.tokens == prompt + 200


# -- cutting the reply to fit ---------------------------------------------------------------


def test_a_token_cap_cuts_the_reply_to_what_it_has_left() -> None:
    cap = BudgetLimit("session", "s", max_tokens=1000)
    plan = sizing(cap)
    first = plan.hold(prompt_tokens=300, reply_tokens=DEFAULT_REPLY_LIMIT)
    cut = plan.smaller(300, first, refusal_of(cap, first, Usage(total_tokens=600)))
    assert cut is not None and (cut.limit, cut.in_usd) == (cap, False)
    assert plan.reply_tokens(cut.hold, 300) == 100  # 1000 - 600 spent - 300 prompt
    assert check_limit(cap, Usage(total_tokens=600), [], cut.hold) is None  # it fits


def test_a_usd_cap_cuts_the_reply_to_what_its_money_pays_for() -> None:
    cap = BudgetLimit("session", "s", max_usd=0.001)
    plan = sizing(cap)
    first = plan.hold(prompt_tokens=200, reply_tokens=DEFAULT_REPLY_LIMIT)  # $0.0042
    cut = plan.smaller(200, first, refusal_of(cap, first, Usage(cost_usd=0.0)))
    assert cut is not None and cut.in_usd
    reply = plan.reply_tokens(cut.hold, 200)
    assert reply == 200  # (0.001 - 200 * 1e-6) / 4e-6
    assert cost(200, reply) <= 0.001 < cost(200, reply + 1)


def test_of_a_cap_in_tokens_and_usd_the_tighter_part_binds() -> None:
    cap = BudgetLimit("session", "s", max_usd=0.001, max_tokens=300)
    plan = sizing(cap)
    first = plan.hold(prompt_tokens=200, reply_tokens=DEFAULT_REPLY_LIMIT)
    cut = plan.smaller(200, first, refusal_of(cap, first, Usage()))
    assert cut is not None and not cut.in_usd  # 100 tokens left, while $ would pay for 200
    assert plan.reply_tokens(cut.hold, 200) == 100


def test_a_cap_left_smaller_than_the_least_reply_is_no_cut() -> None:
    cap = BudgetLimit("session", "s", max_tokens=1000)
    plan = sizing(cap)
    first = plan.hold(prompt_tokens=300, reply_tokens=DEFAULT_REPLY_LIMIT)
    # 700 spent + 300 prompt: not even MIN_REPLY_TOKENS (1) fits; the turn is refused.
    assert plan.smaller(300, first, refusal_of(cap, first, Usage(total_tokens=700))) is None
    # One token less spent: exactly the least reply fits.
    cut = plan.smaller(300, first, refusal_of(cap, first, Usage(total_tokens=699)))
    assert cut is not None and plan.reply_tokens(cut.hold, 300) == MIN_REPLY_TOKENS


def test_a_usd_cap_that_cannot_pay_for_the_prompt_is_no_cut() -> None:
    cap = BudgetLimit("session", "s", max_usd=0.0001)
    plan = sizing(cap)
    first = plan.hold(prompt_tokens=200, reply_tokens=10)  # the prompt alone is $0.0002
    assert plan.smaller(200, first, refusal_of(cap, first, Usage())) is None


def test_each_try_asks_for_fewer_tokens_than_the_last() -> None:
    # A cut hold may be refused again (a racing turn's hold took the room meanwhile): the
    # next try fits what the new refusal says is left, and never asks for as much again.
    cap = BudgetLimit("all", "", max_tokens=1000)
    plan = sizing(cap)
    tried = replace_tokens(plan.hold(prompt_tokens=100, reply_tokens=500), 100 + 500)
    raced = BudgetRefusal(cap, 0, 0.0, held_tokens=450, held_usd=0.0)
    cut = plan.smaller(100, tried, raced)
    assert cut is not None and plan.reply_tokens(cut.hold, 100) == 450  # 1000 - 450 - 100
    stale = BudgetRefusal(cap, 0, 0.0, held_tokens=0, held_usd=0.0)  # room for 900
    cut = plan.smaller(100, tried, stale)
    assert cut is not None and plan.reply_tokens(cut.hold, 100) == 499  # fewer than 500


def replace_tokens(hold: BudgetHold, tokens: int) -> BudgetHold:
    return BudgetHold(hold.session_id, tokens, hold.cost_usd, hold.expires_at, hold.user_id)


@pytest.mark.parametrize(
    ("spent", "earlier"), list(itertools.product([0, 250, 777, 990], [(0, 0), (120, 30)]))
)
def test_a_cut_hold_is_never_below_what_the_endpoint_can_bill(
    spent: int, earlier: tuple[int, int]
) -> None:
    # Whatever the cap has left, the hold covers the prompt (earlier calls included) and
    # every reply token the call is sent with (max_tokens), at their price, and fits the cap.
    for cap in (
        BudgetLimit("session", "s", max_tokens=2000),
        BudgetLimit("session", "s", max_usd=0.005),
        BudgetLimit("session", "s", max_usd=0.006, max_tokens=1900),
    ):
        plan = sizing(cap, spent=earlier)
        prompt = 150
        spent_usage = Usage(total_tokens=spent, cost_usd=spent * 4e-6)
        first = plan.hold(prompt, DEFAULT_REPLY_LIMIT * 2)
        refusal = check_limit(cap, spent_usage, [], first)
        if refusal is None:
            continue
        cut = plan.smaller(prompt, first, refusal)
        if cut is None:
            continue
        max_tokens = plan.reply_tokens(cut.hold, prompt)
        assert max_tokens >= MIN_REPLY_TOKENS
        billable_prompt, billable_reply = prompt + earlier[0], max_tokens + earlier[1]
        assert cut.hold.tokens >= billable_prompt + billable_reply
        assert cut.hold.cost_usd >= cost(billable_prompt, billable_reply)
        assert check_limit(cap, spent_usage, [], cut.hold) is None


# -- a call's own caps ---------------------------------------------------------------------


def test_a_calls_caps_are_checked() -> None:
    mine = BudgetLimit("user", "ann", max_usd=1.0)
    assert call_limits([mine], "ann") == (mine,)
    assert call_limits((), None) == ()
    with pytest.raises(InvalidInputError, match="list of BudgetLimit, not str"):
        call_limits("caps", "ann")
    with pytest.raises(InvalidInputError, match=r"not of Budget: build them with Budget"):
        call_limits([Budget(session_usd=1.0)], "ann")
    with pytest.raises(InvalidInputError, match="pass user_id='ann'"):
        call_limits([mine], "bob")


# -- words -----------------------------------------------------------------------------------


def test_cap_words_name_the_part_that_binds_and_its_setting() -> None:
    both = BudgetLimit("user", "ann", max_usd=0.5, max_tokens=9000)
    assert cap_words(both, in_usd=True) == ("user 'ann'", "$0.50", "CHATCHAIN_BUDGET_USER_USD")
    assert cap_words(both, in_usd=False)[1:] == ("9,000 tokens", "CHATCHAIN_BUDGET_USER_TOKENS")
    usd_only = BudgetLimit("all", "", max_usd=2.0)
    assert cap_words(usd_only, in_usd=False) == (
        "everything in this store",
        "$2.00",
        "CHATCHAIN_BUDGET_TOTAL_USD",
    )
    daily = BudgetLimit("user", "ann", 1.0, since=datetime(2026, 12, 7, tzinfo=UTC), label="x")
    assert cap_words(daily, True)[2] == "Wait for the next period, or raise the cap to go on."


def test_a_refusal_says_the_cap_the_spending_and_what_to_do() -> None:
    cap = BudgetLimit("session", "s", max_tokens=150)
    hold = BudgetHold("s", 31, 0.0, datetime.now(UTC))
    refusal = BudgetRefusal(cap, spent_tokens=100, spent_usd=0.0, held_tokens=20, held_usd=0.0)
    error = exceeded(refusal, hold, sent_so_far(0, 0, summary=False))
    assert str(error) == (
        "Budget exceeded: the cap for session 's' is 150 tokens; it has used 120 tokens and "
        "this turn needs at least 31 (including turns in flight). Nothing was sent or stored. "
        "Raise CHATCHAIN_BUDGET_SESSION_TOKENS to go on."
    )
    assert (error.spent_tokens, error.needed_tokens, error.limit_tokens) == (120, 31, 150)


def test_a_refusal_after_billed_calls_says_they_are_recorded() -> None:
    assert sent_so_far(2, 1234, summary=True) == (
        "Nothing more was sent; 2 earlier calls of this turn (1,234 tokens) and the running "
        "summary's call had been sent and billed, and are recorded in the usage ledger."
    )


def test_a_cut_is_told_only_when_the_budget_made_it() -> None:
    assert cut_notice(500, None, max_tokens=500) is None  # the user's own cap
    assert "CHATCHAIN_MAX_TOKENS for longer replies" in str(cut_notice(1000, None, None))
    cap = BudgetLimit("session", "s", max_tokens=2000)
    assert cut_notice(42, (cap, False), max_tokens=None) == (
        "The reply was cut at 42 tokens: that is all the cap for session 's' (2,000 tokens) "
        "had left. Raise CHATCHAIN_BUDGET_SESSION_TOKENS for longer replies."
    )


def test_the_names_chatchain_usage_shipped_with_are_the_budgets_own() -> None:
    # 0.1.0 exported these from chatchain.usage (and told store writers to call check_limit).
    import chatchain.budgets
    import chatchain.usage

    for name in ("Budget", "BudgetHold", "BudgetLimit", "BudgetRefusal", "check_limit"):
        assert getattr(chatchain.usage, name) is getattr(chatchain.budgets, name), name
    assert chatchain.Budget is chatchain.budgets.Budget
