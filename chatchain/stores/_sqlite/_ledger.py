"""The SQLite store's usage ledger and budget holds.

A period cap (`BudgetLimit.since`) reads its scope's sums per UTC day (``usage_days``, kept
with the totals) since its start, plus the entries of a day it starts within (a range of the
``usage`` index on session or user and time), in the same transaction as the check.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
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
from chatchain.stores._sqlite._connection import _Connections, _stamp
from chatchain.usage import Scope, Usage, UsageEntry

if TYPE_CHECKING:
    import sqlite3


__all__ = ["_Ledger", "_part_query", "_record"]


# The ledger's statements, over the columns `chatchain.stores._ledger` names.
_SELECT_TOTAL = f"SELECT {', '.join(TOTAL_COLUMNS)} FROM usage_totals WHERE scope = ? AND key = ?"
_INSERT_ENTRY = (
    f"INSERT INTO usage ({', '.join(ENTRY_COLUMNS)})"
    f" VALUES ({', '.join(f':{c}' for c in ENTRY_COLUMNS)}) ON CONFLICT (id) DO NOTHING"
)
_ADD_TOTAL = (
    f"INSERT INTO usage_totals (scope, key, {', '.join(TOTAL_COLUMNS)})"
    f" VALUES (:scope, :key, {', '.join(f':{c}' for c in TOTAL_COLUMNS)})"
    " ON CONFLICT (scope, key) DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in TOTAL_COLUMNS)
)


_ADD_DAY = (
    "INSERT INTO usage_days (scope, key, day, total_tokens, cost_usd) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (scope, key, day) DO UPDATE SET"
    " total_tokens = total_tokens + excluded.total_tokens, cost_usd = cost_usd + excluded.cost_usd"
)


def _read_total(conn: sqlite3.Connection, scope: Scope, key: str) -> Usage:
    """A scope's running total, read in ``conn``'s transaction (if any)."""
    row = conn.execute(_SELECT_TOTAL, (scope, key)).fetchone()
    return total_usage(None if row is None else dict(zip(TOTAL_COLUMNS, row, strict=True)))


_SUM_DAYS = (
    "SELECT coalesce(sum(total_tokens), 0), coalesce(sum(cost_usd), 0) FROM usage_days"
    " WHERE scope = ? AND key = ? AND day >= ?"
)


def _part_query(
    scope: Scope, key: str, start: datetime, end: datetime
) -> tuple[str, tuple[str, ...]]:
    """The statement summing a scope's entries of ``start <= at < end`` (part of a day), and
    its parameters: one range read of the index on (session or user, at), or on at."""
    sql = (
        "SELECT coalesce(sum(total_tokens), 0), coalesce(sum(cost_usd), 0) FROM usage"
        " WHERE at >= ? AND at < ?"
    )
    if scope == "all":
        return sql, (_stamp(start), _stamp(end))
    column = "session_id" if scope == "session" else "user_id"
    return f"{sql} AND {column} = ?", (_stamp(start), _stamp(end), key)


def _read_spent(conn: sqlite3.Connection, limit: BudgetLimit) -> Usage:
    """What a limit's scope spent: its running total, or for a period (`BudgetLimit.since`)
    the sums of its whole days plus the entries of a day it starts within."""
    if limit.since is None:
        return _read_total(conn, limit.scope, limit.key)
    first_day, part = period_bounds(limit.since)
    params = (limit.scope, limit.key, first_day.isoformat())
    tokens, cost = conn.execute(_SUM_DAYS, params).fetchone()
    if part is not None:
        more_tokens, more_cost = conn.execute(
            *_part_query(limit.scope, limit.key, *part)
        ).fetchone()
        tokens, cost = tokens + more_tokens, cost + more_cost
    return Usage(total_tokens=int(tokens), cost_usd=float(cost), priced_cost_usd=float(cost))


def _read_holds(conn: sqlite3.Connection, scope: Scope, key: str) -> list[BudgetHold]:
    """The holds that count for a scope (`BudgetHold.counts_for`), oldest first."""
    sql = "SELECT session_id, tokens, cost_usd, expires_at, user_id, id FROM budget_holds"
    params: tuple[str, ...] = ()
    if scope == "session":
        sql, params = sql + " WHERE session_id = ?", (key,)
    elif scope == "user":
        sql, params = sql + " WHERE user_id = ?", (key,)
    return [
        BudgetHold(sid, tokens, cost, datetime.fromisoformat(expires), user_id=uid, id=id_)
        for sid, tokens, cost, expires, uid, id_ in conn.execute(sql + " ORDER BY rowid", params)
    ]


def _record(conn: sqlite3.Connection, entry: UsageEntry, release: str | None) -> bool:
    """`SQLiteStore.record_usage` in ``conn``'s write transaction; False when the entry was
    recorded before."""
    if release is not None:
        conn.execute("DELETE FROM budget_holds WHERE id = ?", (release,))
    if conn.execute(_INSERT_ENTRY, _entry_row(entry)).rowcount != 1:
        return False  # recorded before (a retry): its totals already count it
    added = increments(entry)
    scopes = scopes_of(entry)
    conn.executemany(_ADD_TOTAL, [{"scope": s, "key": k, **added} for s, k in scopes])
    day = (entry.day.isoformat(), added["total_tokens"], added["cost_usd"])
    conn.executemany(_ADD_DAY, [(s, k, *day) for s, k in scopes])
    return True


def _entry_row(entry: UsageEntry) -> dict[str, Any]:
    """The ``usage`` row of an entry (flags as 0/1, the time as fixed-width text)."""
    row = {name: getattr(entry, name) for name in ENTRY_COLUMNS}
    row.update(
        summary=int(entry.summary),
        estimated=int(entry.estimated),
        cached=int(entry.cached),
        at=_stamp(entry.at),
    )
    return row


def _entry(row: Sequence[Any]) -> UsageEntry:
    """The entry of a ``usage`` row (its columns in `ENTRY_COLUMNS` order)."""
    values = dict(zip(ENTRY_COLUMNS, row, strict=True))
    values.update(
        summary=bool(values["summary"]),
        estimated=bool(values["estimated"]),
        cached=bool(values["cached"]),
        at=datetime.fromisoformat(values["at"]),
    )
    return UsageEntry(**values)


class _Ledger(_Connections):
    """The usage ledger and budget holds (`LedgerBackend`)."""

    def record_usage(self, entry: UsageEntry, *, release: str | None = None) -> None:
        with self._write("record usage") as conn:
            _record(conn, entry, release)

    def usage_total(self, scope: Scope, key: str) -> Usage:
        with self._connection("read a usage total") as conn:
            return _read_total(conn, scope, key)

    def usage_entries(
        self,
        *,
        session_id: str | None = None,
        user_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[UsageEntry]:
        # Only fixed fragments go into the SQL; every value is a parameter.
        where: list[str] = []
        params: list[str] = []
        if session_id is not None:
            where.append("session_id = ?")
            params.append(session_id)
        if user_id is not None:
            where.append("user_id = ?")
            params.append(user_id)
        if since is not None:
            where.append("at >= ?")
            params.append(_stamp(since))
        if until is not None:
            where.append("at < ?")
            params.append(_stamp(until))
        sql = f"SELECT {', '.join(ENTRY_COLUMNS)} FROM usage"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY at, rowid"  # entries of the same moment in the order recorded
        with self._connection("read usage entries") as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_entry(row) for row in rows]

    def hold_budget(self, hold: BudgetHold, limits: Sequence[BudgetLimit]) -> BudgetRefusal | None:
        # One BEGIN IMMEDIATE transaction: SQLite's write lock keeps every other thread and
        # process out between reading the spending and keeping the hold.
        with self._write("hold a budget") as conn:
            now = _stamp(utcnow())  # once we may write: a wait for the lock must not age it
            conn.execute("DELETE FROM budget_holds WHERE expires_at <= ?", (now,))
            refusal = first_refusal(
                hold,
                limits,
                lambda limit: (_read_spent(conn, limit), _read_holds(conn, limit.scope, limit.key)),
            )
            if refusal is not None:
                return refusal
            conn.execute(
                """
                INSERT INTO budget_holds (id, session_id, user_id, tokens, cost_usd, expires_at)
                VALUES (?, ?, ?, ?, ?, ?)
                ON CONFLICT (id) DO UPDATE SET
                    session_id = excluded.session_id, user_id = excluded.user_id,
                    tokens = excluded.tokens, cost_usd = excluded.cost_usd,
                    expires_at = excluded.expires_at
                """,
                (
                    hold.id,
                    hold.session_id,
                    hold.user_id,
                    hold.tokens,
                    hold.cost_usd,
                    _stamp(hold.expires_at),
                ),
            )
        return None

    def release_budget(self, hold_id: str) -> None:
        with self._write("release a budget hold") as conn:
            conn.execute("DELETE FROM budget_holds WHERE id = ?", (hold_id,))
