"""Budgets: every rule of a spending cap, in one place.

A `Budget` caps spending per session, per user and overall (USD, tokens, or both); a call's
own caps (``limits=``, e.g. a user's daily cap from `chatchain.users`) are `BudgetLimit`\\ s.
Before a call is sent, its turn takes a `BudgetHold`: the prompt plus the ``max_tokens`` the
call is sent with, priced, so the hold is never below what the endpoint can bill. This module
holds the rules; the turn (`chatchain._turn`) and the stores only apply them:

- **Checking a hold** (`check_limit`, `first_refusal`): a hold passes a cap when the scope's
  recorded spending, plus the holds of its turns in flight, plus this hold stay within it.
  Each store runs `first_refusal` inside its own atomic section (a lock, a transaction);
  Redis runs the same rule in a Lua script, and a contract test (``tests/stores/
  test_budget_rule_contract.py``) runs one table of cases against every store and this
  function, so that the copies cannot drift.
- **Sizing a hold** (`HoldSizing`): a hold is sized to the reply cap first
  (`DEFAULT_REPLY_LIMIT` or ``CHATCHAIN_MAX_TOKENS``); when a cap refuses it, the refusal
  says what that cap has left, and the reply is cut to fit, down to `MIN_REPLY_TOKENS`.
- **Words for people**: the refusal (`exceeded`) and the notices of a reply the budget cut
  short (`cut_notice`, `past_hold_notice`, `billed_past_notice`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from uuid import uuid4

from chatchain._money import format_usd
from chatchain.errors import BudgetExceeded, ConfigurationError, InvalidInputError
from chatchain.pricing import Pricer

if TYPE_CHECKING:  # chatchain.usage imports this module: its types are for the checker only
    from chatchain.usage import Scope, Usage

__all__ = [
    "Budget",
    "BudgetHold",
    "BudgetLimit",
    "BudgetRefusal",
    "Cut",
    "HoldSizing",
    "billed_past_notice",
    "call_limits",
    "cap_words",
    "check_limit",
    "cut_notice",
    "exceeded",
    "first_refusal",
    "past_hold_notice",
    "sent_so_far",
]

DEFAULT_REPLY_LIMIT = 1000
"""The most reply tokens a call is sent with under a budget when no ``CHATCHAIN_MAX_TOKENS``
caps replies: each turn in flight holds that much of every cap (the whole remaining budget
would leave nothing to concurrent turns, and endpoints refuse a ``max_tokens`` above the
model's own limit)."""

MIN_REPLY_TOKENS = 1
"""The fewest reply tokens a budgeted call is sent with: a turn that cannot pay for even these
is refused with `BudgetExceeded`; one that can is sent with ``max_tokens`` cut to what it can
pay for (and a notice when that cut the reply)."""

_PRICE_PROBE = 1_000_000  # reply tokens priced at once to find the price of one


# -- caps and holds --------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetLimit:
    """A cap on one scope's spending: USD, tokens, or both.

    Attributes:
        scope: ``"session"``, ``"user"`` or ``"all"``.
        key: The session or user id (``""`` for ``"all"``).
        max_usd: Most USD the scope may spend, or ``None``.
        max_tokens: Most tokens (prompt + completion) the scope may spend, or ``None``.
        since: Count only the spending recorded at or after this moment (a period cap: a
            day's or a month's), or ``None`` for all of it. Turns in flight (their holds)
            count either way.
        label: How a refusal names the cap (``"user alice's daily cap"``), or ``None``
            for the default wording.

    Example:
        >>> day = datetime(2026, 1, 31, tzinfo=UTC)
        >>> BudgetLimit("user", "alice", max_usd=1.0, since=day).since.isoformat()
        '2026-01-31T00:00:00+00:00'
    """

    scope: Scope
    key: str
    max_usd: float | None = None
    max_tokens: int | None = None
    since: datetime | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        if self.since is not None and self.since.tzinfo is None:  # naive times are UTC
            object.__setattr__(self, "since", self.since.replace(tzinfo=UTC))


@dataclass(frozen=True)
class BudgetHold:
    """Spending set aside for a turn in flight, so that concurrent turns cannot overspend.

    A hold is replaced by the turn's entry when the turn is recorded, released when the turn
    fails, and ignored after ``expires_at`` (its process died).
    """

    session_id: str
    tokens: int
    cost_usd: float
    expires_at: datetime
    user_id: str | None = None
    id: str = field(default_factory=lambda: uuid4().hex)

    def counts_for(self, scope: Scope, key: str) -> bool:
        """Whether this hold is part of a scope's spending."""
        if scope == "session":
            return self.session_id == key
        if scope == "user":
            return self.user_id == key
        return True


@dataclass(frozen=True)
class BudgetRefusal:
    """Why a hold was refused: the limit it would pass and the scope's spending so far."""

    limit: BudgetLimit
    spent_tokens: int
    spent_usd: float
    held_tokens: int
    held_usd: float


def check_limit(
    limit: BudgetLimit,
    spent: Usage,
    held: Sequence[BudgetHold],
    hold: BudgetHold,
) -> BudgetRefusal | None:
    """The refusal if ``hold`` on top of ``spent`` and ``held`` would pass ``limit``.

    A cap is passed when the sum is above it (a hold that reaches it exactly is kept). The
    USD part counts the priced entries only (``Usage.priced_cost_usd``): the cost of an
    entry of unknown price cannot be counted. Stores call this under their own atomicity
    (a lock, a transaction or a script's logic), through `first_refusal`.

    Example:
        >>> from chatchain.usage import Usage
        >>> cap = BudgetLimit("session", "s", max_tokens=100)
        >>> hold = BudgetHold("s", 30, 0.0, datetime.now(UTC))
        >>> check_limit(cap, Usage(total_tokens=70), [], hold) is None  # 70 + 30 = 100
        True
        >>> check_limit(cap, Usage(total_tokens=71), [], hold).spent_tokens
        71
    """
    held_tokens = sum(h.tokens for h in held)
    held_usd = sum(h.cost_usd for h in held)
    spent_usd = spent.priced_cost_usd or 0.0  # entries of unknown price cannot be counted
    over_tokens = (
        limit.max_tokens is not None
        and spent.total_tokens + held_tokens + hold.tokens > limit.max_tokens
    )
    over_usd = limit.max_usd is not None and spent_usd + held_usd + hold.cost_usd > limit.max_usd
    if over_tokens or over_usd:
        return BudgetRefusal(limit, spent.total_tokens, spent_usd, held_tokens, held_usd)
    return None


def first_refusal(
    hold: BudgetHold,
    limits: Sequence[BudgetLimit],
    spending: Callable[[BudgetLimit], tuple[Usage, Sequence[BudgetHold]]],
) -> BudgetRefusal | None:
    """The refusal of the first of ``limits`` that ``hold`` would pass, or ``None``.

    This is what `HistoryStore.hold_budget` decides, inside the store's atomic section:
    every limit must pass, in order, and the first that does not is the refusal (the store
    then keeps nothing). ``spending`` reads what a limit's scope has spent (its running total,
    or for a period cap what was recorded since `BudgetLimit.since`) and the unexpired holds
    that count for it (`BudgetHold.counts_for`); it is called once per limit, until one
    refuses.

    Example:
        >>> from chatchain.usage import Usage
        >>> caps = [BudgetLimit("session", "s", max_tokens=500), BudgetLimit("all", "", 0.01)]
        >>> hold = BudgetHold("s", 100, 0.002, datetime.now(UTC))
        >>> first_refusal(hold, caps, lambda cap: (Usage(cost_usd=0.009), [])).limit.scope
        'all'
    """
    for limit in limits:
        refusal = check_limit(limit, *spending(limit), hold)
        if refusal is not None:
            return refusal
    return None


@dataclass(frozen=True)
class Budget:
    """Spending caps: per session, per user and overall, in USD and/or tokens.

    Each turn is checked before it is sent against every cap that applies to it, using an
    estimate of its prompt tokens plus the most tokens the reply may take.

    Example:
        >>> Budget(session_usd=0.50).limits("s1", None)  # doctest: +NORMALIZE_WHITESPACE
        [BudgetLimit(scope='session', key='s1', max_usd=0.5, max_tokens=None,
                     since=None, label=None)]
    """

    session_usd: float | None = None
    session_tokens: int | None = None
    user_usd: float | None = None
    user_tokens: int | None = None
    total_usd: float | None = None
    total_tokens: int | None = None

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    @property
    def needs_price(self) -> bool:
        """Whether any cap is in USD (so a turn needs a known price to be checked)."""
        return any(x is not None for x in (self.session_usd, self.user_usd, self.total_usd))

    def limits(self, session_id: str, user_id: str | None) -> list[BudgetLimit]:
        """The caps that apply to a turn of ``session_id`` by ``user_id``."""
        limits = []
        if self.session_usd is not None or self.session_tokens is not None:
            limits.append(BudgetLimit("session", session_id, self.session_usd, self.session_tokens))
        if user_id is not None and (self.user_usd is not None or self.user_tokens is not None):
            limits.append(BudgetLimit("user", user_id, self.user_usd, self.user_tokens))
        if self.total_usd is not None or self.total_tokens is not None:
            limits.append(BudgetLimit("all", "", self.total_usd, self.total_tokens))
        return limits


def call_limits(value: object, user_id: str | None) -> tuple[BudgetLimit, ...]:
    """A call's own caps (``configurable["limits"]``), checked.

    Raises:
        InvalidInputError: Not a sequence of `BudgetLimit`, or a user's cap on a turn that
            is not filed under that user (their spending could not be counted).
    """
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise InvalidInputError(
            f"limits must be a list of BudgetLimit, not {type(value).__name__}."
        )
    for limit in value:
        if not isinstance(limit, BudgetLimit):
            raise InvalidInputError(
                f"limits must be a list of BudgetLimit, not of {type(limit).__name__}: "
                "build them with Budget(...).limits(...) or Users(store).limits(user)."
            )
        if limit.scope == "user" and limit.key != user_id:
            raise InvalidInputError(
                f"A cap for user {limit.key!r} applies only to turns filed under that user: "
                f"pass user_id={limit.key!r} with it."
            )
    return tuple(value)


# -- sizing a hold ---------------------------------------------------------------------------
#
# A hold is sized to the reply cap first. When a cap refuses it, the refusal says what that
# cap has left, and the hold is tried again with the reply cut to fit; the store's atomic
# check decides each try, so turns racing for the same budget cannot both take it (the
# loser's next try sees the winner's hold). Each try asks for fewer tokens. A summary call
# is never cut: a summary cut short would be kept as the conversation's memory.


@dataclass(frozen=True)
class Cut:
    """A smaller hold that a refusing cap can pay for, and whether its USD part bound."""

    hold: BudgetHold
    limit: BudgetLimit
    in_usd: bool


@dataclass(frozen=True)
class HoldSizing:
    """How one call's budget hold is sized, from plain values.

    Attributes:
        session_id: The turn's session.
        user_id: The turn's user, or ``None``.
        limits: Every cap the call is checked against (the budget's and the call's own).
        pricer: Prices the call's tokens.
        model: The model the call is priced as (named when its price is unknown).
        needs_price: Whether a cap is in USD, so that an unknown price refuses the call.
        ttl: How long the hold outlives a process that dies holding it.
        spent: Prompt and reply tokens of the turn's earlier calls (tool rounds): they are
            recorded only when the turn ends, so the turn's one hold covers them too.

    Example:
        >>> sizing = HoldSizing("s", None, (), Pricer(), "my-model", False, timedelta(minutes=15))
        >>> sizing.hold(prompt_tokens=120, reply_tokens=1000).tokens  # the prompt + max_tokens
        1120
    """

    session_id: str
    user_id: str | None
    limits: tuple[BudgetLimit, ...]
    pricer: Pricer
    model: str | None
    needs_price: bool
    ttl: timedelta
    spent: tuple[int, int] = (0, 0)

    def hold(self, prompt_tokens: int, reply_tokens: int) -> BudgetHold:
        """The hold of a call of ``prompt_tokens`` sent with ``max_tokens=reply_tokens``:
        both, plus the turn's earlier calls, priced.

        Raises:
            ConfigurationError: A cap is in USD but the model's price is unknown.
        """
        spent_prompt, spent_reply = self.spent
        prompt_tokens += spent_prompt
        reply_tokens += spent_reply
        cost = self.pricer.price(self.model, prompt_tokens, reply_tokens).cost_usd
        if cost is None and self.needs_price:
            raise _unknown_price(self.model)
        expires = datetime.now(UTC) + self.ttl
        tokens = prompt_tokens + reply_tokens
        return BudgetHold(self.session_id, tokens, cost or 0.0, expires, user_id=self.user_id)

    def reply_tokens(self, hold: BudgetHold, prompt_tokens: int) -> int:
        """The ``max_tokens`` a call of ``prompt_tokens`` is sent with under ``hold``."""
        return hold.tokens - prompt_tokens - sum(self.spent)

    def smaller(self, prompt_tokens: int, hold: BudgetHold, refusal: BudgetRefusal) -> Cut | None:
        """A hold with fewer reply tokens than ``hold`` that the cap of ``refusal`` has left
        room for, or ``None`` when not even `MIN_REPLY_TOKENS` fit."""
        tried = self.reply_tokens(hold, prompt_tokens)
        fits, in_usd = self.affordable(prompt_tokens, refusal, tried - 1)
        if fits < MIN_REPLY_TOKENS:
            return None
        return Cut(self.hold(prompt_tokens, fits), refusal.limit, in_usd)

    def affordable(self, prompt_tokens: int, refusal: BudgetRefusal, most: int) -> tuple[int, bool]:
        """The most reply tokens (up to ``most``) the refusing cap has left, and whether
        its USD part is what binds."""
        limit, fits, in_usd = refusal.limit, most, False
        if limit.max_tokens is not None:
            used = refusal.spent_tokens + refusal.held_tokens + prompt_tokens + sum(self.spent)
            fits = min(fits, limit.max_tokens - used)
        if limit.max_usd is not None:
            left = limit.max_usd - refusal.spent_usd - refusal.held_usd
            usd_fits = self.affordable_usd(prompt_tokens, left, fits)
            if usd_fits < fits:
                fits, in_usd = usd_fits, True
        return fits, in_usd

    def affordable_usd(self, prompt_tokens: int, left: float, most: int) -> int:
        """The most reply tokens (up to ``most``) that ``left`` USD pays for on top of the
        prompt; -1 when not even the prompt fits."""
        pricer, model = self.pricer, self.model
        prompt_tokens += self.spent[0]
        spent = self.spent[1]  # reply tokens of the turn's earlier calls

        def cost(reply: int) -> float:
            return pricer.price(model, prompt_tokens, spent + reply).cost_usd or 0.0

        base = cost(0)
        per_token = (cost(_PRICE_PROBE) - base) / _PRICE_PROBE
        if base > left:
            return -1
        if per_token <= 0:
            return most
        fits = min(most, math.floor((left - base) / per_token))
        while fits >= 0 and cost(fits) > left:
            fits -= 1  # float rounding (or a tiered price) put it one over
        return fits


def _unknown_price(model: str | None) -> ConfigurationError:
    return ConfigurationError(
        f"A budget in USD is set (CHATCHAIN_BUDGET_*_USD, or the call's limits) but "
        f"the price of model "
        f"{model!r} is unknown, so the turn cannot be checked and was not sent. Set its "
        'price in CHATCHAIN_PRICES (e.g. {"' + str(model) + '": {"input": 0.15, '
        '"output": 0.6}} in USD per million tokens), or cap tokens instead '
        "(CHATCHAIN_BUDGET_*_TOKENS)."
    )


# -- words for people ------------------------------------------------------------------------


def cap_words(limit: BudgetLimit, in_usd: bool) -> tuple[str, str, str]:
    """Whose cap ``limit`` is, the cap, and the setting that raises it (USD or tokens); for a
    call's own (labelled) cap, what to do instead of a setting.

    Example:
        >>> cap_words(BudgetLimit("session", "s", max_tokens=5000), in_usd=False)
        ("session 's'", '5,000 tokens', 'CHATCHAIN_BUDGET_SESSION_TOKENS')
    """
    who = {"session": f"session {limit.key!r}", "user": f"user {limit.key!r}"}.get(
        limit.scope, "everything in this store"
    )
    # A cap may be in USD only or in tokens only: name the part it has, whichever bound.
    in_usd = limit.max_usd is not None and (in_usd or limit.max_tokens is None)
    cap = format_usd(limit.max_usd or 0.0) if in_usd else f"{limit.max_tokens or 0:,} tokens"
    if limit.label is not None:
        wait = "" if limit.since is None else "Wait for the next period, or raise"
        return who, cap, f"{wait or 'Raise'} the cap to go on."
    variable = {"session": "SESSION", "user": "USER"}.get(limit.scope, "TOTAL")
    return who, cap, f"CHATCHAIN_BUDGET_{variable}_{'USD' if in_usd else 'TOKENS'}"


def sent_so_far(calls: int, tokens: int, summary: bool) -> str:
    """What a refused turn had already sent (``calls`` of ``tokens``, a running ``summary``)
    and what of it is recorded: a refusal must not say nothing was sent when calls were
    billed.

    Example:
        >>> sent_so_far(0, 0, summary=False)
        'Nothing was sent or stored.'
    """
    sent = []
    if calls > 0:
        plural = "s" if calls > 1 else ""
        sent.append(f"{calls} earlier call{plural} of this turn ({tokens:,} tokens)")
    if summary:
        sent.append("the running summary's call")
    if not sent:
        return "Nothing was sent or stored."
    return (
        f"Nothing more was sent; {' and '.join(sent)} had been sent and billed, and "
        "are recorded in the usage ledger."
    )


def exceeded(refusal: BudgetRefusal, hold: BudgetHold, sent: str) -> BudgetExceeded:
    """The error of a turn refused by a cap: the cap, what its scope spent, the least
    ``hold`` the turn needs, ``sent`` (`sent_so_far`), and what to do next."""
    limit = refusal.limit
    spent_usd = refusal.spent_usd + refusal.held_usd
    spent_tokens = refusal.spent_tokens + refusal.held_tokens
    in_usd = limit.max_usd is not None and spent_usd + hold.cost_usd > limit.max_usd
    who, cap, setting = cap_words(limit, in_usd)
    if in_usd:
        status = (
            f"has spent {format_usd(spent_usd)} and this turn needs at least "
            f"{format_usd(hold.cost_usd)}"
        )
    else:
        status = f"has used {spent_tokens:,} tokens and this turn needs at least {hold.tokens:,}"
    in_flight = " (including turns in flight)" if refusal.held_tokens else ""
    if limit.label is None:
        message = (
            f"Budget exceeded: the cap for {who} is {cap}; it {status}{in_flight}. "
            f"{sent} Raise {setting} to go on."
        )
    else:
        period = "" if limit.since is None else f" since {limit.since:%Y-%m-%d %H:%M} UTC"
        message = (
            f"Budget exceeded: {limit.label} of {cap} is reached; {who}{period} {status}"
            f"{in_flight}. {sent} {setting}"
        )
    return BudgetExceeded(
        message,
        scope=limit.scope,
        key=limit.key,
        limit_usd=limit.max_usd,
        limit_tokens=limit.max_tokens,
        spent_usd=spent_usd,
        spent_tokens=spent_tokens,
        needed_usd=hold.cost_usd,
        needed_tokens=hold.tokens,
    )


def past_hold_notice(held: int) -> str:
    """The notice of a reply chatchain stopped reading at the ``held`` reply tokens, as the
    endpoint went on past the ``max_tokens`` it was sent with."""
    return (
        f"The endpoint went on past the {held:,} reply tokens this call "
        "was sent with (max_tokens, held in the budget if one applies), so chatchain stopped "
        "reading there: the reply is kept cut short (marked cut_at_hold), and its usage "
        "is recorded as counted here (the endpoint reported none)."
    )


def billed_past_notice(billed: int, limit: int) -> str:
    """The notice of an endpoint that billed ``billed`` reply tokens for a call sent with
    ``max_tokens=limit``."""
    return (
        f"The endpoint billed {billed:,} reply tokens although this call was sent with "
        f"max_tokens={limit:,} and held that much in the budget: all {billed:,} are "
        "recorded, so the cap may be passed by the difference."
    )


def cut_notice(
    limit: int, cut_by: tuple[BudgetLimit, bool] | None, max_tokens: int | None
) -> str | None:
    """The notice of a reply cut at ``limit`` tokens (finish reason ``length``) when the
    budget, not the user's own cap (``max_tokens``), cut it; ``cut_by`` is the cap that
    sized the hold and whether its USD part bound (``None``: the default reply limit did).

    Example:
        >>> cut_notice(1000, None, max_tokens=1000) is None  # CHATCHAIN_MAX_TOKENS did
        True
    """
    if max_tokens is not None and limit >= max_tokens:
        return None  # their CHATCHAIN_MAX_TOKENS did
    if cut_by is None:
        return (
            f"The reply was cut at {limit:,} tokens: under a budget, a reply takes at most "
            f"{DEFAULT_REPLY_LIMIT:,} tokens unless CHATCHAIN_MAX_TOKENS says otherwise. "
            "Set CHATCHAIN_MAX_TOKENS for longer replies."
        )
    cap_limit = cut_by[0]
    who, cap, setting = cap_words(*cut_by)
    if cap_limit.label is not None:
        return (
            f"The reply was cut at {limit:,} tokens: that is all {cap_limit.label} ({cap}) "
            "had left."
        )
    return (
        f"The reply was cut at {limit:,} tokens: that is all the cap for {who} ({cap}) "
        f"had left. Raise {setting} for longer replies."
    )
