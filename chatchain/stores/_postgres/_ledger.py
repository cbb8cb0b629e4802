"""The PostgreSQL store's usage ledger and budget holds.

The usage ledger: an entry is one row of ``<prefix>_usage`` (indexed by session, user and
time; ``seq`` keeps entries of the same moment in the order they were recorded). Recording
inserts it and, only when the id is new, adds it to the running sums of its session, its user
and ``"all"`` in ``<prefix>_usage_totals``, always in the order all, session, user so that
concurrent recordings queue on those rows instead of deadlocking; it also drops the budget
hold it replaces, all in one transaction. A total is then one primary-key read. Budget holds
are checked and kept in one transaction under a transaction-level advisory lock of the prefix
(in the two-key space, with second key 1: apart from the session locks, which use the
one-key space, and from the schema lock, whose second key is 0); each limit's total and holds
are read by one statement, so a hold that a concurrent commit turns into spending is counted
once, either as the hold or in the total. Each recording also adds to its scopes' sums per
UTC day (``<prefix>_usage_days``), so that a period cap (`BudgetLimit.since`: a day, a
month) reads a row per day of its period, plus the entries of a day it starts within.
A hold's expiry is the server's clock (``clock_timestamp()``) plus the hold's time to live,
so that clients whose clocks disagree agree on it; taking a hold deletes the expired ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from chatchain.budgets import BudgetHold, BudgetLimit, BudgetRefusal, first_refusal
from chatchain.stores._base import utcnow
from chatchain.stores._ledger import (
    ENTRY_COLUMNS,
    TOTAL_COLUMNS,
    increments,
    period_bounds,
    scopes_of,
    total_usage,
)
from chatchain.stores._postgres._connection import _AsyncSide, _Connections
from chatchain.stores._postgres._sql import _HOLD_COLUMNS, _aware, _utc
from chatchain.usage import Scope, Usage, UsageEntry

if TYPE_CHECKING:
    from psycopg.sql import Composed

__all__ = ["_Ledger", "_entry_args", "_total_args"]


def _entry_args(entry: UsageEntry) -> dict[str, Any]:
    args = {name: getattr(entry, name) for name in ENTRY_COLUMNS}
    args["at"] = _aware(entry.at)
    return args


def _total_args(entry: UsageEntry) -> list[dict[str, Any]]:
    """What ``entry`` adds to each of its totals (and to its UTC day's sums), in the one order
    every recording locks them (`scopes_of`)."""
    added = {**increments(entry), "day": entry.day}
    return [{"scope": scope, "key": key, **added} for scope, key in scopes_of(entry)]


def _total(row: Sequence[Any] | None) -> Usage:
    """The `Usage` of a totals row (its first columns), or zeros for no row."""
    if row is None or row[0] is None:
        return Usage()
    return total_usage(dict(zip(TOTAL_COLUMNS, row, strict=False)))


def _entries(rows: list[Any]) -> list[UsageEntry]:
    entries = []
    for row in rows:
        values = dict(zip(ENTRY_COLUMNS, row, strict=True))
        values["at"] = _utc(values["at"])
        entries.append(UsageEntry(**values))
    return entries


def _hold_args(hold: BudgetHold) -> dict[str, Any]:
    args = {name: getattr(hold, name) for name in _HOLD_COLUMNS[:-1]}
    args["ttl"] = max(timedelta(0), _aware(hold.expires_at) - utcnow())
    return args


def _spending_read(limit: BudgetLimit, rows: list[Any]) -> tuple[Usage, list[BudgetHold]]:
    """What a `_Sql.spending` (or for a period, `_Sql.spending_since`: tokens and cost)
    statement read, as `chatchain.budgets.first_refusal` takes it."""
    if limit.since is not None:
        tokens, cost = (int(rows[0][0]), float(rows[0][1])) if rows else (0, 0.0)
        spent = Usage(total_tokens=tokens, cost_usd=cost, priced_cost_usd=cost)
        return spent, _holds(rows, 2)
    return _total(rows[0] if rows else None), _holds(rows, len(TOTAL_COLUMNS))


def _holds(rows: list[Any], n: int) -> list[BudgetHold]:
    """The holds a spending statement read (its columns from the ``n``-th on)."""
    held = [
        BudgetHold(session_id, int(tokens), float(cost), _utc(expires), user_id=user_id, id=hold_id)
        for hold_id, session_id, user_id, tokens, cost, expires in (row[n:] for row in rows)
        if hold_id is not None
    ]
    return held


class _Ledger(_Connections):
    """The usage ledger and budget holds (`LedgerBackend`)."""

    def record_usage(self, entry: UsageEntry, *, release: str | None = None) -> None:
        args = _entry_args(entry)
        with self._connection() as conn, conn.transaction():
            if conn.execute(self._sql.record_entry, args).fetchone() is not None:
                with conn.cursor() as cursor:
                    cursor.executemany(self._sql.add_total, _total_args(entry))
            if release is not None:
                conn.execute(self._sql.release_hold, (release,))

    async def arecord_usage(self, entry: UsageEntry, *, release: str | None = None) -> None:
        side = self._async_side()
        await side.call(self._arecord_there(side, entry, release))

    async def _arecord_there(
        self, side: _AsyncSide, entry: UsageEntry, release: str | None
    ) -> None:
        args = _entry_args(entry)
        async with self._aconnection(side) as conn, conn.transaction():
            cursor = await conn.execute(self._sql.record_entry, args)
            if await cursor.fetchone() is not None:
                async with conn.cursor() as many:
                    await many.executemany(self._sql.add_total, _total_args(entry))
            if release is not None:
                await conn.execute(self._sql.release_hold, (release,))

    def usage_total(self, scope: Scope, key: str) -> Usage:
        rows = self._fetch(self._sql.usage_total, (scope, key))
        return _total(rows[0] if rows else None)

    def usage_entries(
        self,
        *,
        session_id: str | None = None,
        user_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[UsageEntry]:
        query, params = self._sql.entries_where(session_id, user_id, since, until)
        return _entries(self._fetch(query, params))

    def _budget_key(self) -> str:
        return f"{self.table_prefix} budgets"

    def _spending(self, limit: BudgetLimit) -> tuple[Composed, dict[str, Any]]:
        """The statement that reads a limit's spending and holds, and its parameters."""
        read: dict[str, Any] = {"scope": limit.scope, "key": limit.key}
        if limit.since is None:
            return self._sql.spending[limit.scope], read
        first_day, part = period_bounds(limit.since)
        midnight = datetime.combine(first_day, datetime.min.time(), UTC)
        read["day"] = first_day
        read["since"], read["until"] = (midnight, midnight) if part is None else part
        return self._sql.spending_since[limit.scope], read

    def hold_budget(self, hold: BudgetHold, limits: Sequence[BudgetLimit]) -> BudgetRefusal | None:
        with self._connection() as conn, conn.transaction():
            # Its own statement: each statement after it reads a snapshot taken once the
            # lock is ours, so it sees every hold kept before.
            conn.execute(self._sql.budget_lock, (self._budget_key(),))
            conn.execute(self._sql.expire_holds)

            def spending(limit: BudgetLimit) -> tuple[Usage, list[BudgetHold]]:
                return _spending_read(limit, conn.execute(*self._spending(limit)).fetchall())

            refusal = first_refusal(hold, limits, spending)
            if refusal is not None:
                return refusal
            conn.execute(self._sql.keep_hold, _hold_args(hold))
        return None

    async def ahold_budget(
        self, hold: BudgetHold, limits: Sequence[BudgetLimit]
    ) -> BudgetRefusal | None:
        side = self._async_side()
        return await side.call(self._abudget_there(side, hold, list(limits)))

    async def _abudget_there(
        self, side: _AsyncSide, hold: BudgetHold, limits: list[BudgetLimit]
    ) -> BudgetRefusal | None:
        async with self._aconnection(side) as conn, conn.transaction():
            await conn.execute(self._sql.budget_lock, (self._budget_key(),))
            await conn.execute(self._sql.expire_holds)
            # Every limit's spending first: the rule is a plain function, not a coroutine.
            read: dict[BudgetLimit, tuple[Usage, list[BudgetHold]]] = {}
            for limit in limits:
                cursor = await conn.execute(*self._spending(limit))
                read[limit] = _spending_read(limit, await cursor.fetchall())
            refusal = first_refusal(hold, limits, read.__getitem__)
            if refusal is not None:
                return refusal
            await conn.execute(self._sql.keep_hold, _hold_args(hold))
        return None

    def release_budget(self, hold_id: str) -> None:
        self._fetch(self._sql.release_hold, (hold_id,))

    async def arelease_budget(self, hold_id: str) -> None:
        await self._afetch(self._sql.release_hold, (hold_id,))
