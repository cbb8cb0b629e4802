"""What turns cost: usage entries, totals and the ledger that keeps them.

Every turn (and every summary call) leaves one `UsageEntry` in the ledger of the chain's
history store, so totals survive restarts and add up across the processes that share a store.
`Usage` is a total of entries. The budgets that cap spending (`Budget`, `BudgetLimit`, the
holds and their rules) live in `chatchain.budgets`; ``chatchain.usage`` still exports what
of them it shipped with in 0.1.0.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, Literal
from uuid import uuid4

from chatchain._money import format_usd

# Exported here as in 0.1.0, where they were defined (their home is chatchain.budgets):
# check_limit too, which 0.1.0's `HistoryStore.hold_budget` told store writers to call.
from chatchain.budgets import Budget, BudgetHold, BudgetLimit, BudgetRefusal, check_limit

if TYPE_CHECKING:
    from chatchain.stores import HistoryStore

__all__ = [
    "Budget",
    "BudgetHold",
    "BudgetLimit",
    "BudgetRefusal",
    "ReportKey",
    "Scope",
    "Usage",
    "UsageEntry",
    "UsageLedger",
    "UsageReport",
    "check_limit",
    "estimated_note",
    "total_of",
]

Scope = Literal["session", "user", "all"]
"""Whose spending a total or a limit is about: one session, one user, or everything."""

ReportKey = Literal["session", "user", "model", "day"]
"""What a usage report groups its rows by (`UsageLedger.report`'s ``by``)."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Usage:
    """Tokens, requests, cost and time of one turn, or the total of several.

    Example:
        >>> a = Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15, cost_usd=0.001)
        >>> (a + a).total_tokens
        30
        >>> (a + Usage(cost_usd=None, unpriced=1)).cost_usd is None  # unknown stays unknown
        True
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens the endpoint served from its cache, where it reports them."""
    reasoning_tokens: int = 0
    """Completion tokens spent on reasoning, where the endpoint reports them."""
    successful_requests: int = 0
    cost_usd: float | None = 0.0
    """List-price cost in USD; ``None`` when any part of it is for a model of unknown price."""
    latency_s: float = 0.0
    """Wall-clock seconds of the turn (summed over turns in a total)."""
    first_token_s: float | None = None
    """Seconds to the first streamed text; ``None`` for non-streamed turns and totals."""
    model: str | None = None
    """The model that answered, as the endpoint named it; ``None`` in a mixed total."""
    turns: int = 0
    summaries: int = 0
    """Summary calls included (their tokens and cost are in the totals above)."""
    unpriced: int = 0
    """Entries whose model has no known price; when above 0, ``cost_usd`` is ``None``."""
    priced_cost_usd: float | None = None
    """The cost of the priced entries alone (what a USD budget counts); ``cost_usd`` when
    every entry has a price."""
    estimated: int = 0
    """Entries whose tokens were counted here because the endpoint did not report them (see
    `UsageEntry.estimated`); when above 0, the tokens and cost are partly estimates."""
    cached_turns: int = 0
    """Turns answered from the response cache (``CHATCHAIN_CACHE``): no request, no tokens,
    no cost (see `UsageEntry.cached`)."""
    saved_usd: float = 0.0
    """What the cached turns would have cost at their model's price (those of a known price)."""

    def __post_init__(self) -> None:
        if self.priced_cost_usd is None:
            object.__setattr__(self, "priced_cost_usd", self.cost_usd or 0.0)

    def __add__(self, other: Usage) -> Usage:
        cost = (
            None
            if self.cost_usd is None or other.cost_usd is None
            else self.cost_usd + other.cost_usd
        )
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
            successful_requests=self.successful_requests + other.successful_requests,
            cost_usd=cost,
            latency_s=self.latency_s + other.latency_s,
            model=_merge_model(self, other),
            turns=self.turns + other.turns,
            summaries=self.summaries + other.summaries,
            unpriced=self.unpriced + other.unpriced,
            priced_cost_usd=(self.priced_cost_usd or 0.0) + (other.priced_cost_usd or 0.0),
            estimated=self.estimated + other.estimated,
            cached_turns=self.cached_turns + other.cached_turns,
            saved_usd=self.saved_usd + other.saved_usd,
        )

    @property
    def cost_text(self) -> str:
        """The cost for people: ``$0.00012``, ``~$0.00012`` when estimated, or
        ``cost unknown`` (never a silent $0)."""
        if self.cost_usd is None:
            return "cost unknown"
        return f"{'~' if self.estimated else ''}{format_usd(self.cost_usd)}"

    @property
    def line(self) -> str:
        """One turn's usage as the terminal chat shows it after a reply: tokens, cost (never
        a silent $0), latency and first token; ``~N tokens (...), estimated`` when the
        endpoint did not report the tokens.

        Example:
            >>> Usage(prompt_tokens=15, completion_tokens=8, total_tokens=23, cost_usd=None,
            ...       latency_s=0.412, first_token_s=0.1).line
            '23 tokens (15 prompt + 8 completion), cost unknown, 0.41 s, first token 0.10 s'
            >>> Usage(prompt_tokens=15, completion_tokens=8, total_tokens=23,
            ...       cost_usd=0.00002, estimated=1).line
            '~23 tokens (15 prompt + 8 completion), estimated, ~$0.000020, 0.00 s'
        """
        mark = "~" if self.estimated else ""
        parts = [
            f"{mark}{self.total_tokens} tokens ({self.prompt_tokens} prompt + "
            f"{self.completion_tokens} completion)",
            self.cost_text,
            f"{self.latency_s:.2f} s",
        ]
        if self.estimated:
            parts.insert(1, "estimated")
        if self.cached_turns:
            parts.insert(0, self.cached_text)
        if self.first_token_s is not None:
            parts.append(f"first token {self.first_token_s:.2f} s")
        return ", ".join(parts)

    def __str__(self) -> str:
        """The usage for people, marked ``(estimated)`` when the endpoint did not report it.

        Example:
            >>> print(Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15, estimated=1))
            10 prompt + 5 completion = 15 tokens (estimated), ~$0.00, 0.00 s
        """
        mark = " (estimated)" if self.estimated else ""
        text = (
            f"{self.prompt_tokens} prompt + {self.completion_tokens} completion = "
            f"{self.total_tokens} tokens{mark}, {self.cost_text}, {self.latency_s:.2f} s"
        )
        if self.cached_turns:
            text += f", {self.cached_text}"
        return text

    @property
    def cached_text(self) -> str:
        """The cache hits for people: ``cached`` for one turn, else ``3 cached``, and the
        money saved when known (``""`` without hits).

        Example:
            >>> Usage(turns=1, cached_turns=1, saved_usd=0.00012).cached_text
            'cached, saved $0.00012'
        """
        if not self.cached_turns:
            return ""
        hits = "cached" if self.cached_turns == self.turns == 1 else f"{self.cached_turns} cached"
        return f"{hits}, saved {format_usd(self.saved_usd)}" if self.saved_usd else hits


def _merge_model(a: Usage, b: Usage) -> str | None:
    if a.turns + a.summaries == 0:
        return b.model
    if b.turns + b.summaries == 0:
        return a.model
    return a.model if a.model == b.model else None


@dataclass(frozen=True)
class UsageEntry:
    """One line of the ledger: what one turn, or one summary call, cost.

    Attributes:
        session_id: The session the call was for.
        model: The model that answered (or the configured one when the reply never said).
        cost_usd: List-price cost; ``None`` when the model's price is unknown.
        price_source: Where the price came from: ``"settings"`` (``CHATCHAIN_PRICES``),
            ``"genai-prices"``, ``"langchain-community"``, ``"configured:<one of those>"``
            when the endpoint answered under a name no source knows and the call was priced
            as the configured model, or ``None`` when unknown.
        summary: Whether this was a running-summary call rather than a turn.
        estimated: The endpoint never reported the tokens (a stream stopped before its usage
            chunk), so they were counted here from what was sent and received.
        cached: The reply came from the response cache (``CHATCHAIN_CACHE``): no request
            was sent, so the tokens, requests and cost are 0.
        saved_usd: For a cached turn, what the reply would have cost at the model's price
            (its tokens as first reported); ``None`` when that price is unknown.
        user_id: The user the session belongs to, when the caller gave one.
        at: When the call ended (UTC).
        id: A unique id.
    """

    session_id: str
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    requests: int = 0
    cost_usd: float | None = None
    price_source: str | None = None
    latency_s: float = 0.0
    first_token_s: float | None = None
    summary: bool = False
    estimated: bool = False
    cached: bool = False
    saved_usd: float | None = None
    user_id: str | None = None
    at: datetime = field(default_factory=_utcnow)
    id: str = field(default_factory=lambda: uuid4().hex)

    @property
    def day(self) -> date:
        """The UTC day of the call."""
        return self.at.astimezone(UTC).date()

    def usage(self) -> Usage:
        """This entry as a `Usage`."""
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.total_tokens,
            cached_tokens=self.cached_tokens,
            reasoning_tokens=self.reasoning_tokens,
            successful_requests=self.requests,
            cost_usd=self.cost_usd,
            latency_s=self.latency_s,
            first_token_s=self.first_token_s,
            model=self.model,
            turns=0 if self.summary else 1,
            summaries=1 if self.summary else 0,
            unpriced=1 if self.cost_usd is None else 0,
            estimated=1 if self.estimated else 0,
            cached_turns=1 if self.cached and not self.summary else 0,
            saved_usd=self.saved_usd or 0.0,
        )

    def to_json(self) -> str:
        """The entry as JSON text (what stores without columns keep)."""
        data = asdict(self)
        data["at"] = self.at.isoformat()
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> UsageEntry:
        """The entry `to_json` wrote."""
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        data = {key: value for key, value in data.items() if key in known}
        data["at"] = datetime.fromisoformat(data["at"])
        return cls(**data)


def total_of(entries: Iterable[UsageEntry]) -> Usage:
    """The `Usage` total of some entries."""
    total = Usage()
    for entry in entries:
        total = total + entry.usage()
    return total


# -- reports ---------------------------------------------------------------------------------

_NUMBERS = (
    "turns",
    "summaries",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "total_tokens",
    "cost_usd",
    "unpriced",
    "estimated",
    "cached_turns",
    "saved_usd",
)


@dataclass(frozen=True)
class UsageReport:
    """Usage totals grouped by session, user, model and/or day.

    ``rows`` is a plain list of dicts (one per group, sorted; no pandas needed), ``total`` the
    grand total, and ``str(report)`` a text table. A row's ``estimated`` counts its entries
    whose tokens the endpoint did not report; the table marks their totals with ``~``. A
    row's ``cached_turns`` counts its turns answered from the response cache and
    ``saved_usd`` what they would have cost; the table shows them (columns ``cached`` and
    ``saved``) when the report has any.
    """

    by: tuple[ReportKey, ...]
    rows: list[dict[str, Any]]
    total: Usage

    @classmethod
    def of(cls, entries: Iterable[UsageEntry], by: Sequence[ReportKey]) -> UsageReport:
        """Group ``entries`` by the keys ``by``."""
        for key in by:
            if key not in ("session", "user", "model", "day"):
                raise ValueError(f"Cannot group usage by {key!r}: use session, user, model or day.")
        groups: dict[tuple[str, ...], Usage] = {}
        total = Usage()
        for entry in entries:
            usage = entry.usage()
            group = tuple(_group_value(entry, key) for key in by)
            groups[group] = groups.get(group, Usage()) + usage
            total = total + usage
        rows = [
            {**dict(zip(by, group, strict=True)), **_numbers(usage)}
            for group, usage in sorted(groups.items())
        ]
        return cls(tuple(by), rows, total)

    def __str__(self) -> str:
        t = self.total
        hits = bool(t.cached_turns)  # the cache columns only where the cache was at work
        headers = [*self.by, "turns", "summaries", "prompt", "completion", "total", "cost"]
        headers += ["cached", "saved"] if hits else []
        body = [
            [
                *(str(row[key]) for key in self.by),
                str(row["turns"]),
                str(row["summaries"]),
                *_token_cells(row, row["estimated"]),
                _cost_cell(row["cost_usd"], row["unpriced"]),
                *(_cache_cells(row) if hits else []),
            ]
            for row in self.rows
        ]
        body.append(
            [
                "TOTAL",
                *([""] * (len(self.by) - 1)),
                str(t.turns),
                str(t.summaries),
                *_token_cells(_numbers(t), t.estimated),
                _cost_cell(t.cost_usd, t.unpriced),
                *(_cache_cells(_numbers(t)) if hits else []),
            ]
        )
        if not self.by:
            body[-1] = body[-1][1:]
        widths = [max(len(line[i]) for line in [headers, *body]) for i in range(len(headers))]
        numeric = len(self.by)

        def render(line: list[str]) -> str:
            cells = [
                cell.rjust(width) if i >= numeric else cell.ljust(width)
                for i, (cell, width) in enumerate(zip(line, widths, strict=True))
            ]
            return "  ".join(cells).rstrip()

        rule = "  ".join("-" * width for width in widths)
        lines = [render(headers), rule, *(render(line) for line in body[:-1]), rule]
        lines.append(render(body[-1]))
        if t.estimated:
            lines.append(estimated_note(t.estimated))
        return "\n".join(lines)


def _group_value(entry: UsageEntry, key: ReportKey) -> str:
    if key == "session":
        return entry.session_id
    if key == "user":
        return entry.user_id or "-"
    if key == "model":
        return entry.model or "-"
    return entry.day.isoformat()


def _numbers(usage: Usage) -> dict[str, Any]:
    values = {
        "turns": usage.turns,
        "summaries": usage.summaries,
        "requests": usage.successful_requests,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.cached_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "total_tokens": usage.total_tokens,
        "cost_usd": usage.cost_usd,
        "unpriced": usage.unpriced,
        "estimated": usage.estimated,
        "cached_turns": usage.cached_turns,
        "saved_usd": usage.saved_usd,
    }
    assert tuple(values) == _NUMBERS
    return values


def _token_cells(numbers: dict[str, Any], estimated: int) -> list[str]:
    mark = "~" if estimated else ""
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return [f"{mark}{numbers[key]:,}" for key in keys]


def _cache_cells(numbers: dict[str, Any]) -> list[str]:
    return [str(numbers["cached_turns"]), format_usd(numbers["saved_usd"])]


def estimated_note(estimated: int) -> str:
    """The line under a usage table that says what its ``~`` marks."""
    calls = "call was" if estimated == 1 else "calls were"
    return (
        f"~ estimated: {estimated} {calls} counted here, as the endpoint did not report their usage"
    )


def _cost_cell(cost: float | None, unpriced: int) -> str:
    if cost is None:
        return f"unknown ({unpriced} unpriced)"
    return format_usd(cost)


# -- the ledger ------------------------------------------------------------------------------


class UsageLedger:
    """The usage entries of a history store, with totals, reports and budget holds.

    The ledger lives in the store: in memory for `MemoryStore`, in the database for SQLite,
    Redis and PostgreSQL, so that totals survive restarts and add up across processes.

    Example:
        >>> ledger = UsageLedger()  # a private in-memory store
        >>> ledger.record(UsageEntry("s1", "gpt-4o-mini", total_tokens=7, cost_usd=0.0001))
        >>> ledger.total("s1").total_tokens, ledger.total().turns
        (7, 1)
    """

    def __init__(self, store: HistoryStore | None = None) -> None:
        if store is None:
            from chatchain.stores import MemoryStore

            store = MemoryStore()
        self.store = store

    def record(self, entry: UsageEntry, *, release: str | None = None) -> None:
        """Add an entry to the ledger (and drop the budget hold ``release``, at once)."""
        self.store.record_usage(entry, release=release)

    async def arecord(self, entry: UsageEntry, *, release: str | None = None) -> None:
        """`record` for async callers."""
        await self.store.arecord_usage(entry, release=release)

    def total(self, session_id: str | None = None, *, user_id: str | None = None) -> Usage:
        """The total of one session, of one user, or of everything (no arguments)."""
        if session_id is not None and user_id is not None:
            return total_of(self.entries(session_id=session_id, user_id=user_id))
        if session_id is not None:
            return self.store.usage_total("session", session_id)
        if user_id is not None:
            return self.store.usage_total("user", user_id)
        return self.store.usage_total("all", "")

    def entries(
        self,
        *,
        session_id: str | None = None,
        user_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[UsageEntry]:
        """The entries matching every filter given, oldest first (``until`` excluded)."""
        return self.store.usage_entries(
            session_id=session_id, user_id=user_id, since=since, until=until
        )

    def report(
        self,
        by: Sequence[ReportKey] = ("session", "model", "day"),
        *,
        session_id: str | None = None,
        user_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> UsageReport:
        """Totals grouped by ``by`` (any of session, user, model, day) over the matching entries.

        Example:
            >>> ledger = UsageLedger()
            >>> ledger.record(UsageEntry("s1", "m", total_tokens=7, cost_usd=None))
            >>> ledger.report(by=["model"]).rows[0]["cost_usd"] is None  # unknown, not $0
            True
        """
        entries = self.entries(session_id=session_id, user_id=user_id, since=since, until=until)
        return UsageReport.of(entries, by)

    def hold(self, hold: BudgetHold, limits: Sequence[BudgetLimit]) -> BudgetRefusal | None:
        """Set ``hold`` aside unless it would pass a limit; then return the refusal."""
        return self.store.hold_budget(hold, limits)

    async def ahold(self, hold: BudgetHold, limits: Sequence[BudgetLimit]) -> BudgetRefusal | None:
        """`hold` for async callers."""
        return await self.store.ahold_budget(hold, limits)

    def release(self, hold_id: str) -> None:
        """Drop a hold whose turn failed (unknown ids are not an error)."""
        self.store.release_budget(hold_id)

    async def arelease(self, hold_id: str) -> None:
        """`release` for async callers."""
        await self.store.arelease_budget(hold_id)
