"""What the stores' ledgers share: the scopes an entry counts for, the columns of a running
total, what an entry adds to it (as `UsageEntry.usage` counts it), the `Usage` a total
row reads as, and how a period cap's span splits into whole days and a part of one. One
definition here, so the backends cannot count differently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from datetime import UTC, date, datetime, timedelta
from typing import Any

from chatchain.usage import Scope, Usage, UsageEntry

__all__ = [
    "ENTRY_COLUMNS",
    "TOTAL_COLUMNS",
    "in_scope",
    "increments",
    "period_bounds",
    "scopes_of",
    "total_usage",
]

ENTRY_COLUMNS = tuple(f.name for f in fields(UsageEntry))
"""Every field of a `UsageEntry`, in its order (the stores' column and key names)."""

TOTAL_COLUMNS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "requests",
    "cost_usd",  # of the priced entries only
    "unpriced",
    "latency_s",
    "turns",
    "summaries",
    "estimated",
    "cached_turns",
    "saved_usd",
)
"""The sums a running total keeps, per scope."""


def period_bounds(since: datetime) -> tuple[date, tuple[datetime, datetime] | None]:
    """How a store reads a period that starts at ``since`` (`BudgetLimit.since`): the first
    UTC day it covers whole (read from the per-day sums), and the part of a day it starts
    within, if any (read from the entries: ``start <= at < end``).

    Example:
        >>> period_bounds(datetime(2026, 3, 1, tzinfo=UTC))
        (datetime.date(2026, 3, 1), None)
        >>> day, (start, end) = period_bounds(datetime(2026, 3, 1, 6, tzinfo=UTC))
        >>> day.isoformat(), start.hour, end.isoformat()
        ('2026-03-02', 6, '2026-03-02T00:00:00+00:00')
    """
    start = since.replace(tzinfo=UTC) if since.tzinfo is None else since.astimezone(UTC)
    midnight = start.replace(hour=0, minute=0, second=0, microsecond=0)
    if start == midnight:
        return midnight.date(), None
    end = midnight + timedelta(days=1)
    return end.date(), (start, end)


def scopes_of(entry: UsageEntry) -> list[tuple[Scope, str]]:
    """The totals ``entry`` counts towards: everything, its session and its user (if any).

    Always in this order, the one every store takes the rows in: two recordings that add to
    the same totals then queue instead of deadlocking.
    """
    scopes: list[tuple[Scope, str]] = [("all", ""), ("session", entry.session_id)]
    if entry.user_id is not None:
        scopes.append(("user", entry.user_id))
    return scopes


def in_scope(entry: UsageEntry, scope: Scope, key: str) -> bool:
    """Whether ``entry`` counts towards the total of ``(scope, key)`` (as `scopes_of` says)."""
    if scope == "session":
        return entry.session_id == key
    if scope == "user":
        return entry.user_id == key
    return True


def increments(entry: UsageEntry) -> dict[str, int | float]:
    """What ``entry`` adds to each of `TOTAL_COLUMNS`, as `UsageEntry.usage` counts it."""
    usage = entry.usage()
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "cached_tokens": usage.cached_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "requests": usage.successful_requests,
        "cost_usd": float(usage.priced_cost_usd or 0.0),
        "unpriced": usage.unpriced,
        "latency_s": float(usage.latency_s),
        "turns": usage.turns,
        "summaries": usage.summaries,
        "estimated": usage.estimated,
        "cached_turns": usage.cached_turns,
        "saved_usd": float(usage.saved_usd),
    }


def total_usage(sums: Mapping[str, Any] | None) -> Usage:
    """The `Usage` of a running total (`TOTAL_COLUMNS` to values; missing or ``None``
    values are 0), or zeros for no total. ``cost_usd`` is ``None`` when any entry was
    unpriced; ``model`` and ``first_token_s`` are ``None``.

    Raises:
        ValueError: A value is not a number.
    """
    sums = sums or {}

    def number(column: str, kind: type[int] | type[float]) -> Any:
        value = sums.get(column)
        return kind(0 if value is None else value)

    cost, unpriced = number("cost_usd", float), number("unpriced", int)
    return Usage(
        prompt_tokens=number("prompt_tokens", int),
        completion_tokens=number("completion_tokens", int),
        total_tokens=number("total_tokens", int),
        cached_tokens=number("cached_tokens", int),
        reasoning_tokens=number("reasoning_tokens", int),
        successful_requests=number("requests", int),
        cost_usd=None if unpriced else cost,
        priced_cost_usd=cost,
        latency_s=number("latency_s", float),
        turns=number("turns", int),
        summaries=number("summaries", int),
        unpriced=unpriced,
        estimated=number("estimated", int),
        cached_turns=number("cached_turns", int),
        saved_usd=number("saved_usd", float),
    )
