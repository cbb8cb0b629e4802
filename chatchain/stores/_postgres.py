"""The PostgreSQL store: sessions shared by many processes and machines (``chatchain[postgres]``).

Not langchain-postgres: its ``PostgresChatMessageHistory`` requires UUID session ids and loads
whole sessions, where chatchain needs any string id and windowed reads.

Schema (``<prefix>`` is ``chatchain`` unless ``table_prefix`` says otherwise)::

    <prefix>_sessions(session_id text PK, created_at, updated_at timestamptz,
                      message_count bigint, summary text, summary_covers int)
    <prefix>_messages(session_id text -> sessions ON DELETE CASCADE, seq bigint,
                      message text, PK (session_id, seq))
    <prefix>_migrations(name text PK, applied_at timestamptz)
    <prefix>_usage(id text PK, seq bigint identity, at timestamptz, session_id, user_id,
                   model text, prompt/completion/total/cached/reasoning_tokens, requests bigint,
                   cost_usd double NULL, price_source text, latency_s double,
                   first_token_s double NULL, summary, estimated, cached boolean,
                   saved_usd double NULL)
    <prefix>_usage_totals(scope text, key text, PK (scope, key), prompt/completion/total/
                          cached/reasoning_tokens, requests bigint, cost_usd double (the
                          priced entries' sum), unpriced bigint, latency_s double,
                          turns, summaries, estimated, cached_turns bigint,
                          saved_usd double)
    <prefix>_budget_holds(id text PK, session_id, user_id text, tokens bigint,
                          cost_usd double, expires_at timestamptz)
    <prefix>_usage_days(scope, key text, day date, PK (scope, key, day), total_tokens bigint,
                        cost_usd double (the priced entries' sum))
    <prefix>_users(name text PK, token_hash text UNIQUE, created_at timestamptz,
                   budget_usd, daily_usd, monthly_usd double NULL, revoked boolean)

The tables are created by ordered, named migrations, each recorded in ``<prefix>_migrations``,
under an advisory lock so that processes opening the store at once apply each migration once.
Messages are the exact JSON text `dump_message` writes (``text``, not ``jsonb``, which would
reorder keys for nothing). A session's messages are numbered ``0..message_count-1``; an
append bumps ``message_count`` on the session row (which locks it until the commit) and
inserts its messages under the numbers that returned, in one transaction. A window is one
range read of the primary key; ``count`` reads only the session row.

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

Users (`chatchain.users`) are rows of ``<prefix>_users``, keyed by name and found by the
unique index on their token's SHA-256 hash (the token itself is never stored); adding one is
``INSERT ... ON CONFLICT DO NOTHING``, so of two processes adding one name exactly one wins.

One writer per session across processes: a turn holds a session-level advisory lock keyed by
a 64-bit hash of the prefix and session id, on a connection it keeps out of the pool until
the turn ends. Two ids whose hashes collide merely take turns. The lock's lease is that
connection: PostgreSQL drops the lock when the connection closes, so a holder that dies
frees it at once, and a live turn never loses it while its connection lives. Server-side TCP
keepalives (about two minutes) also free it when the holder's machine vanishes without
closing the connection. A turn is saved (`PostgresStore.commit_turn`: messages, usage entry
and totals, end of the budget hold) in one transaction *on the connection that holds the
lock*: if that connection was killed (a network cut, a failover, ``pg_terminate_backend``),
the lock went with it and the write fails with it, and no other turn can take the lock while
the transaction is open. The usage is then recorded on another connection and the turn
raises `SessionLockLostError`. Advisory locks need a direct connection (or PgBouncer in
session mode), and the key needs PostgreSQL 11 or later (``hashtextextended``).

Connections: a pool for threads, and one for asyncio that lives on an event loop the store
runs in a thread of its own (see `_AsyncSide`), each of ``min_size`` to ``max_size``
connections. A turn uses up to two: the one holding its lock and, briefly, one per read or
write. At most ``max_size - 1`` turns hold locks at once, so reads and writes always find a
connection; a further turn waits for a lock connection as for a busy session. How long an
operation waits for a connection (all busy, or the server unreachable) is the URL's
``connect_timeout`` (default 10 s); then it fails with `StoreError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    contextmanager,
)
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from langchain_core.messages import BaseMessage

from chatchain._locks import SessionLocks, busy_error
from chatchain.budgets import BudgetHold, BudgetLimit, BudgetRefusal, first_refusal
from chatchain.errors import ConfigurationError, SessionBusyError, StoreError
from chatchain.stores._base import (
    USER_CHANGES,
    Fence,
    HistoryStore,
    SessionInfo,
    Summary,
    TitleBackend,
    UserBackend,
    check_user_changes,
    driver_missing,
    dump_message,
    load_message,
    lock_lost,
    prefix_end,
    session_times,
    user_exists,
    utcnow,
)
from chatchain.stores._ledger import (
    ENTRY_COLUMNS,
    TOTAL_COLUMNS,
    increments,
    period_bounds,
    scopes_of,
    total_usage,
)
from chatchain.usage import Scope, Usage, UsageEntry
from chatchain.users import User

if TYPE_CHECKING:
    from psycopg import AsyncConnection, Connection
    from psycopg.rows import TupleRow
    from psycopg.sql import Composed
    from psycopg_pool import AsyncConnectionPool, ConnectionPool

__all__ = ["PostgresStore"]

_T = TypeVar("_T")

_PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,39}")  # the longest table name stays under 63 bytes
_DEFAULT_WAIT_S = 10.0
_NO_STOP = 2**62  # "to the end" for the range read
# Server-side TCP keepalives: a lock whose holder's machine vanished is freed in ~2 minutes.
_KEEPALIVES = (
    "SELECT set_config('tcp_keepalives_idle', '60', false),"
    " set_config('tcp_keepalives_interval', '10', false),"
    " set_config('tcp_keepalives_count', '6', false)"
)

_TRY_LOCK = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"
_LOCK = "SELECT pg_advisory_lock(hashtextextended(%s, 0))"
_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', %s, true)"  # until the transaction ends
_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended(%s, 0))"

# Ordered and named; a migration, once released, never changes: add the next one instead.
_MIGRATIONS: list[tuple[str, list[str]]] = [
    (
        "0001_sessions_and_messages",
        [
            """CREATE TABLE IF NOT EXISTS {sessions} (
                session_id text PRIMARY KEY,
                created_at timestamptz NOT NULL,
                updated_at timestamptz NOT NULL,
                message_count bigint NOT NULL DEFAULT 0,
                summary text,
                summary_covers integer
            )""",
            "CREATE INDEX IF NOT EXISTS {sessions_created} ON {sessions} (created_at)",
            "CREATE INDEX IF NOT EXISTS {sessions_updated} ON {sessions} (updated_at)",
            """CREATE TABLE IF NOT EXISTS {messages} (
                session_id text NOT NULL REFERENCES {sessions} ON DELETE CASCADE,
                seq bigint NOT NULL,
                message text NOT NULL,
                PRIMARY KEY (session_id, seq)
            )""",
        ],
    ),
    (
        "0002_usage_ledger",
        [
            """CREATE TABLE IF NOT EXISTS {usage} (
                id text PRIMARY KEY,
                seq bigint GENERATED ALWAYS AS IDENTITY,
                at timestamptz NOT NULL,
                session_id text NOT NULL,
                user_id text,
                model text,
                prompt_tokens bigint NOT NULL,
                completion_tokens bigint NOT NULL,
                total_tokens bigint NOT NULL,
                cached_tokens bigint NOT NULL,
                reasoning_tokens bigint NOT NULL,
                requests bigint NOT NULL,
                cost_usd double precision,
                price_source text,
                latency_s double precision NOT NULL,
                first_token_s double precision,
                summary boolean NOT NULL,
                estimated boolean NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS {usage_session_at} ON {usage} (session_id, at, seq)",
            "CREATE INDEX IF NOT EXISTS {usage_user_at} ON {usage} (user_id, at, seq)",
            "CREATE INDEX IF NOT EXISTS {usage_at} ON {usage} (at, seq)",
            """CREATE TABLE IF NOT EXISTS {usage_totals} (
                scope text NOT NULL,
                key text NOT NULL,
                prompt_tokens bigint NOT NULL,
                completion_tokens bigint NOT NULL,
                total_tokens bigint NOT NULL,
                cached_tokens bigint NOT NULL,
                reasoning_tokens bigint NOT NULL,
                requests bigint NOT NULL,
                cost_usd double precision NOT NULL,
                unpriced bigint NOT NULL,
                latency_s double precision NOT NULL,
                turns bigint NOT NULL,
                summaries bigint NOT NULL,
                PRIMARY KEY (scope, key)
            )""",
            """CREATE TABLE IF NOT EXISTS {budget_holds} (
                id text PRIMARY KEY,
                session_id text NOT NULL,
                user_id text,
                tokens bigint NOT NULL,
                cost_usd double precision NOT NULL,
                expires_at timestamptz NOT NULL
            )""",
        ],
    ),
    (
        "0003_estimated_totals",
        [
            """ALTER TABLE {usage_totals}
                ADD COLUMN IF NOT EXISTS estimated bigint NOT NULL DEFAULT 0""",
            """UPDATE {usage_totals} AS t SET estimated = (
                SELECT count(*) FROM {usage} AS u WHERE u.estimated AND (
                    t.scope = 'all'
                    OR (t.scope = 'session' AND u.session_id = t.key)
                    OR (t.scope = 'user' AND u.user_id = t.key)
                )
            )""",
        ],
    ),
    (
        # Turns answered from the response cache (CHATCHAIN_CACHE), and what they would have
        # cost. No entry before this step was a cache hit: all 0.
        "0004_cached_turns",
        [
            """ALTER TABLE {usage}
                ADD COLUMN IF NOT EXISTS cached boolean NOT NULL DEFAULT false,
                ADD COLUMN IF NOT EXISTS saved_usd double precision""",
            """ALTER TABLE {usage_totals}
                ADD COLUMN IF NOT EXISTS cached_turns bigint NOT NULL DEFAULT 0,
                ADD COLUMN IF NOT EXISTS saved_usd double precision NOT NULL DEFAULT 0""",
        ],
    ),
    (
        "0005_users",
        [
            """CREATE TABLE IF NOT EXISTS {users} (
                name text PRIMARY KEY,
                token_hash text NOT NULL UNIQUE,
                created_at timestamptz NOT NULL,
                budget_usd double precision,
                daily_usd double precision,
                monthly_usd double precision,
                revoked boolean NOT NULL DEFAULT false
            )""",
        ],
    ),
    (
        "0006_usage_days",
        [
            """CREATE TABLE IF NOT EXISTS {usage_days} (
                scope text NOT NULL,
                key text NOT NULL,
                day date NOT NULL,
                total_tokens bigint NOT NULL,
                cost_usd double precision NOT NULL,
                PRIMARY KEY (scope, key, day)
            )""",
            """INSERT INTO {usage_days} (scope, key, day, total_tokens, cost_usd)
            SELECT 'all', '', (at AT TIME ZONE 'UTC')::date, sum(total_tokens),
                coalesce(sum(cost_usd), 0)
            FROM {usage} GROUP BY 3
            UNION ALL
            SELECT 'session', session_id, (at AT TIME ZONE 'UTC')::date, sum(total_tokens),
                coalesce(sum(cost_usd), 0)
            FROM {usage} GROUP BY 2, 3
            UNION ALL
            SELECT 'user', user_id, (at AT TIME ZONE 'UTC')::date, sum(total_tokens),
                coalesce(sum(cost_usd), 0)
            FROM {usage} WHERE user_id IS NOT NULL GROUP BY 2, 3""",
        ],
    ),
    (
        # `session_infos` reads an id range in code point order ("C"), whatever the
        # database's collation (under most others "al:x" sorts between "al" and "alice").
        "0007_sessions_by_id",
        ['CREATE INDEX IF NOT EXISTS {sessions_id} ON {sessions} (session_id COLLATE "C")'],
    ),
    (
        # The write-ahead record of each session's turn in flight (`chatchain._pending`).
        "0008_pending_turns",
        [
            """CREATE TABLE IF NOT EXISTS {pending_turns} (
                session_id text PRIMARY KEY,
                token text NOT NULL,
                record text NOT NULL
            )"""
        ],
    ),
    (
        # The titles people give their sessions, apart from {sessions}: renaming never
        # touches a session's row or the turns' commit path.
        "0009_session_titles",
        [
            """CREATE TABLE IF NOT EXISTS {session_titles} (
                session_id text PRIMARY KEY,
                title text NOT NULL
            )"""
        ],
    ),
]


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


@dataclass(frozen=True)
class _LockFence(Fence):
    """The fence of a session lock: the connection that holds it (``token`` is its pid).

    The turn's final write runs on that very connection, in one transaction: if the
    connection was killed, the lock went with it and so does the write, and no other
    process can have taken the lock while the transaction is open.
    """

    conn: Any = field(default=None, compare=False, repr=False)


class _Sql:
    """The store's statements, composed once for its table prefix."""

    def __init__(self, prefix: str) -> None:
        from psycopg import sql

        tables = (
            "sessions",
            "messages",
            "migrations",
            "sessions_created",
            "sessions_updated",
            "sessions_id",
            "usage",
            "usage_session_at",
            "usage_user_at",
            "usage_at",
            "usage_totals",
            "budget_holds",
            "users",
            "usage_days",
            "pending_turns",
            "session_titles",
        )
        names = {name: sql.Identifier(f"{prefix}_{name}") for name in tables}

        def q(text: str) -> Composed:
            return sql.SQL(text).format(**names)

        self.migrations_table = q(
            "CREATE TABLE IF NOT EXISTS {migrations} ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        self.applied = q("SELECT name FROM {migrations}")
        self.record = q("INSERT INTO {migrations} (name) VALUES (%s)")
        self.migrations = [(name, [q(step) for step in steps]) for name, steps in _MIGRATIONS]
        self.titles = q("SELECT session_id, title FROM {session_titles} WHERE session_id = ANY(%s)")
        self.set_title = q(
            "INSERT INTO {session_titles} (session_id, title) VALUES (%s, %s)"
            " ON CONFLICT (session_id) DO UPDATE SET title = excluded.title"
        )
        self.drop_title = q("DELETE FROM {session_titles} WHERE session_id = %s")
        # Locks the session row until the commit: appends to one session queue here.
        self.bump = q(
            "INSERT INTO {sessions} AS s (session_id, created_at, updated_at, message_count)"
            " VALUES (%(sid)s, now(), now(), %(n)s)"
            " ON CONFLICT (session_id) DO UPDATE"
            " SET message_count = s.message_count + excluded.message_count,"
            " updated_at = excluded.updated_at"
            " RETURNING message_count"
        )
        self.insert = q(
            "INSERT INTO {messages} (session_id, seq, message)"
            " SELECT %(sid)s, %(first)s::bigint + t.i - 1, t.m"
            " FROM unnest(%(texts)s::text[]) WITH ORDINALITY AS t(m, i)"
        )
        # Negative bounds count from message_count, read in the same snapshot; the bounds
        # are constants for the scan, so this is one range read of the primary key.
        count = "(SELECT message_count FROM {sessions} WHERE session_id = %(sid)s)"
        self.load = q(
            "SELECT message FROM {messages} WHERE session_id = %(sid)s"
            f" AND seq >= (CASE WHEN %(start)s::bigint >= 0 THEN %(start)s::bigint"
            f" ELSE {count} + %(start)s::bigint END)"
            f" AND seq < (CASE WHEN %(stop)s::bigint >= 0 THEN %(stop)s::bigint"
            f" ELSE {count} + %(stop)s::bigint END)"
            " ORDER BY seq"
        )
        self.count = q("SELECT message_count FROM {sessions} WHERE session_id = %s")
        self.sessions = q(
            "SELECT session_id FROM {sessions} WHERE message_count > 0"
            " ORDER BY created_at, session_id"
        )
        self.info = q(
            "SELECT message_count, created_at, updated_at FROM {sessions}"
            " WHERE session_id = %s AND message_count > 0"
        )
        # An index range of `0007_sessions_by_id`; the sort reads only the rows in it.
        infos = (
            "SELECT session_id, message_count, created_at, updated_at FROM {sessions}"
            ' WHERE session_id COLLATE "C" >= %(low)s{below} AND message_count > 0'
            ' ORDER BY updated_at DESC, session_id COLLATE "C" LIMIT %(limit)s'
        )
        self.session_infos = q(infos.replace("{below}", ' AND session_id COLLATE "C" < %(high)s'))
        self.session_infos_from = q(infos.replace("{below}", ""))
        self.delete = q("DELETE FROM {sessions} WHERE session_id = %s")  # messages cascade
        self.prune = q(
            "WITH gone AS (DELETE FROM {sessions} WHERE updated_at < %s"
            " RETURNING session_id, created_at)"
            " SELECT session_id FROM gone ORDER BY created_at, session_id"
        )
        self.get_summary = q(
            "SELECT summary, summary_covers FROM {sessions}"
            " WHERE session_id = %s AND summary IS NOT NULL"
        )
        self.set_summary = q(
            "INSERT INTO {sessions} AS s"
            " (session_id, created_at, updated_at, message_count, summary, summary_covers)"
            " VALUES (%s, now(), now(), 0, %s, %s)"
            " ON CONFLICT (session_id) DO UPDATE"
            " SET summary = excluded.summary, summary_covers = excluded.summary_covers"
        )
        # The session row of `replace_session`, after `delete` (its messages follow by `insert`).
        self.replace_row = q(
            "INSERT INTO {sessions}"
            " (session_id, created_at, updated_at, message_count, summary, summary_covers)"
            " VALUES (%(sid)s, %(created)s, %(updated)s, %(n)s, %(summary)s, %(covers)s)"
        )

        # -- usage ledger --
        entry_columns = ", ".join(ENTRY_COLUMNS)
        total_columns = ", ".join(TOTAL_COLUMNS)
        # RETURNING yields a row only when the id is new: then, and only then, add it up.
        self.record_entry = q(
            f"INSERT INTO {{usage}} ({entry_columns})"
            f" VALUES ({', '.join(f'%({c})s' for c in ENTRY_COLUMNS)})"
            " ON CONFLICT (id) DO NOTHING RETURNING seq"
        )
        # The running total, and the day's sum (`usage_days`) in the same statement.
        self.add_total = q(
            "WITH day AS (INSERT INTO {usage_days} AS d (scope, key, day, total_tokens, cost_usd)"
            " VALUES (%(scope)s, %(key)s, %(day)s, %(total_tokens)s, %(cost_usd)s)"
            " ON CONFLICT (scope, key, day) DO UPDATE SET"
            " total_tokens = d.total_tokens + excluded.total_tokens,"
            " cost_usd = d.cost_usd + excluded.cost_usd)"
            f" INSERT INTO {{usage_totals}} AS t (scope, key, {total_columns})"
            f" VALUES (%(scope)s, %(key)s, {', '.join(f'%({c})s' for c in TOTAL_COLUMNS)})"
            " ON CONFLICT (scope, key) DO UPDATE SET "
            + ", ".join(f"{c} = t.{c} + excluded.{c}" for c in TOTAL_COLUMNS)
        )
        self.usage_total = q(
            f"SELECT {total_columns} FROM {{usage_totals}} WHERE scope = %s AND key = %s"
        )
        self.entries = q(f"SELECT {entry_columns} FROM {{usage}}")
        self.entries_order = q(" ORDER BY at, seq")
        self.release_hold = q("DELETE FROM {budget_holds} WHERE id = %s")
        # -- write-ahead records of turns in flight --
        # Stored when the session has none, replaced when it is the same token's: RETURNING
        # yields a row only then.
        self.write_pending = q(
            "INSERT INTO {pending_turns} AS p (session_id, token, record) VALUES (%s, %s, %s)"
            " ON CONFLICT (session_id) DO UPDATE SET record = excluded.record"
            " WHERE p.token = excluded.token RETURNING 1"
        )
        self.read_pending = q("SELECT token, record FROM {pending_turns} WHERE session_id = %s")
        self.drop_pending = q(
            "DELETE FROM {pending_turns} WHERE session_id = %s AND token = %s RETURNING 1"
        )
        self.pending_sessions = q("SELECT session_id FROM {pending_turns} ORDER BY session_id")
        # -- users --
        user_columns = "name, created_at, budget_usd, daily_usd, monthly_usd, revoked, token_hash"
        self.add_user = q(
            f"INSERT INTO {{users}} ({user_columns}) VALUES (%s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (name) DO NOTHING RETURNING name"
        )
        self.get_user = q(f"SELECT {user_columns} FROM {{users}} WHERE name = %s")
        self.find_user = q(f"SELECT {user_columns} FROM {{users}} WHERE token_hash = %s")
        self.list_users = q(f"SELECT {user_columns} FROM {{users}} ORDER BY created_at, name")
        self.update_user = {
            column: q(f"UPDATE {{users}} SET {column} = %(value)s WHERE name = %(name)s")
            for column in (*sorted(USER_CHANGES), "token_hash")
        }
        # Whether the backend ``pid`` holds the session lock `_TRY_LOCK` takes for ``key``
        # (a bigint key is kept as its high and low 32 bits, with objsubid 1).
        self.lock_owned = q(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND pid = %(pid)s AND objsubid = 1"
            " AND classid = ((hashtextextended(%(key)s, 0) >> 32) & 4294967295)::oid"
            " AND objid = (hashtextextended(%(key)s, 0) & 4294967295)::oid)"
        )
        # Transaction-level, in the two-key space with second key 1: the session locks use
        # the one-key space and the schema lock second key 0, so neither can collide.
        self.budget_lock = q("SELECT pg_advisory_xact_lock(hashtext(%s), 1)")
        # The server's clock, the one every process and machine shares.
        self.expire_holds = q("DELETE FROM {budget_holds} WHERE expires_at <= clock_timestamp()")
        # A scope's total and its holds in one statement, so in one snapshot: a hold that a
        # concurrent commit turns into an entry is seen once, as the hold or in the total.
        # One row per hold (hold columns NULL when there are none), the total on each.
        held_by = {"session": "h.session_id = %(key)s", "user": "h.user_id = %(key)s"}
        self.spending = {
            scope: q(
                f"SELECT {', '.join(f't.{c}' for c in TOTAL_COLUMNS)},"
                f" {', '.join(f'h.{c}' for c in _HOLD_COLUMNS)}"
                " FROM (SELECT) AS one"
                " LEFT JOIN {usage_totals} AS t ON t.scope = %(scope)s AND t.key = %(key)s"
                f" LEFT JOIN {{budget_holds}} AS h ON {held_by.get(scope, 'true')}"
                " ORDER BY h.id"
            )
            for scope in ("session", "user", "all")
        }
        # The same for a period (`BudgetLimit.since`): the sums of its whole UTC days, plus
        # the entries of a day it starts within (``since <= at < until``; an empty range when
        # it starts at midnight), instead of the running total; one statement again.
        in_scope = {"session": "session_id = %(key)s", "user": "user_id = %(key)s"}
        self.spending_since = {
            scope: q(
                "SELECT d.tokens + p.tokens, d.cost + p.cost,"
                f" {', '.join(f'h.{c}' for c in _HOLD_COLUMNS)}"
                " FROM (SELECT coalesce(sum(total_tokens), 0) AS tokens,"
                " coalesce(sum(cost_usd), 0) AS cost FROM {usage_days}"
                " WHERE scope = %(scope)s AND key = %(key)s AND day >= %(day)s) AS d"
                " CROSS JOIN (SELECT coalesce(sum(total_tokens), 0) AS tokens,"
                " coalesce(sum(cost_usd), 0) AS cost FROM {usage}"
                f" WHERE {in_scope.get(scope, 'true')}"
                " AND at >= %(since)s AND at < %(until)s) AS p"
                f" LEFT JOIN {{budget_holds}} AS h ON {held_by.get(scope, 'true')}"
                " ORDER BY h.id"
            )
            for scope in ("session", "user", "all")
        }
        # The expiry is the server's clock plus the hold's time to live, so that holds of
        # clients whose clocks disagree expire when they should.
        self.keep_hold = q(
            f"INSERT INTO {{budget_holds}} ({', '.join(_HOLD_COLUMNS)})"
            f" VALUES ({', '.join(f'%({c})s' for c in _HOLD_COLUMNS[:-1])},"
            " clock_timestamp() + %(ttl)s::interval)"
            " ON CONFLICT (id) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in _HOLD_COLUMNS if c != "id")
        )

    def entries_where(
        self,
        session_id: str | None,
        user_id: str | None,
        since: datetime | None,
        until: datetime | None,
    ) -> tuple[Composed, dict[str, Any]]:
        """The `usage_entries` query for the filters given, and its parameters."""
        from psycopg import sql

        tests = {
            "session_id = %(session_id)s": session_id,
            "user_id = %(user_id)s": user_id,
            "at >= %(since)s": since,
            "at < %(until)s": until,
        }
        given = [sql.SQL(test) for test, value in tests.items() if value is not None]
        where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(given) if given else sql.SQL("")
        params = {
            "session_id": session_id,
            "user_id": user_id,
            "since": None if since is None else _aware(since),
            "until": None if until is None else _aware(until),
        }
        return sql.Composed([self.entries, where, self.entries_order]), params


# The columns of a `BudgetHold` (those of an entry and a total: chatchain.stores._ledger).
_HOLD_COLUMNS = ("id", "session_id", "user_id", "tokens", "cost_usd", "expires_at")


def _aware(moment: datetime) -> datetime:
    """A time as the database keeps it: naive means UTC, as `utcnow` gives."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


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


def _user(row: Sequence[Any]) -> tuple[User, str]:
    """The user of a ``users`` row, and their token's hash."""
    name, created, budget, daily, monthly, revoked, token_hash = row
    return User(name, _utc(created), budget, daily, monthly, bool(revoked)), token_hash


def _load_args(session_id: str, start: int, stop: int | None) -> dict[str, Any]:
    return {"sid": session_id, "start": start, "stop": _NO_STOP if stop is None else stop}


def _insert_args(
    session_id: str, texts: list[str], bumped: tuple[Any, ...] | None
) -> dict[str, Any]:
    """Number the messages after those before them: ``bumped`` is the new message_count."""
    assert bumped is not None  # INSERT ... RETURNING always returns the row
    return {"sid": session_id, "first": int(bumped[0]) - len(texts), "texts": texts}


def _messages(rows: list[Any]) -> list[BaseMessage]:
    return [load_message(text) for (text,) in rows]


def _count(rows: list[Any]) -> int:
    return int(rows[0][0]) if rows else 0


def _summary(rows: list[Any]) -> Summary | None:
    return Summary(rows[0][0], int(rows[0][1])) if rows else None


class _AsyncSide:
    """The store's asyncio half: an async pool on an event loop of its own, in its own thread.

    asyncio connections belong to one loop, and callers' loops come and go (every
    ``asyncio.run`` makes one). A pool opened in a caller's loop would also keep that loop
    from ending: psycopg_pool's workers swallow the cancellation ``asyncio.run`` sends at
    exit, so it hangs while one of them is connecting. So the pool lives on a loop that the
    store owns and closes, and callers await its work through thread-safe futures, without
    blocking their own loop or tying up a thread while they wait.
    """

    def __init__(self, pool: AsyncConnectionPool[Any], lock_slots: int) -> None:
        self.pool = pool
        self.lock_slots = asyncio.Semaphore(lock_slots)  # used on self.loop only
        self.holders: set[asyncio.Task[None]] = set()  # turns holding or taking a lock
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="chatchain-postgres", daemon=True)
        self._thread.start()
        self.submit(self.pool.open()).result(timeout=30)  # at once: it connects in the background

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    def submit(self, work: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Run ``work`` on the store's loop."""
        return asyncio.run_coroutine_threadsafe(work, self.loop)

    async def call(self, work: Coroutine[Any, Any, _T]) -> _T:
        """Run ``work`` on the store's loop and await its result from the caller's loop."""
        return await asyncio.wrap_future(self.submit(work))

    def close(self) -> None:
        self.submit(self._shutdown()).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)

    async def _shutdown(self) -> None:
        holders = list(self.holders)
        for holder in holders:  # turns never finished (abandoned streams) let go
            holder.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
        await self.pool.close()
        # Calls still under way (the store was closed while in use) end rather than hang.
        # Bounded: a pool worker still connecting would swallow its cancellation.
        others = asyncio.all_tasks() - {asyncio.current_task()}
        for task in others:
            task.cancel()
        if others:
            await asyncio.wait(others, timeout=5)


def _connect_timeout(value: Any) -> float:
    """Seconds of ``connect_timeout`` in the URL (the default when absent), or a clear error.

    libpq takes a whole number of seconds; it would refuse anything else only when connecting.
    """
    if not value:
        return _DEFAULT_WAIT_S
    try:
        seconds = int(str(value).strip())
    except ValueError:
        seconds = -1
    if seconds < 0:
        raise ConfigurationError(
            f"The PostgreSQL URL's connect_timeout must be a whole number of seconds, not "
            f"{value!r}. Fix it in CHATCHAIN_STORE (or in the URL given to the store), e.g. "
            "postgresql://user@host/db?connect_timeout=10."
        )
    return float(seconds)


class PostgresStore(HistoryStore, UserBackend, TitleBackend):
    """Sessions in PostgreSQL, shared by every process and machine that opens the same URL.

    Args:
        url: A libpq URL or conninfo string, e.g. ``postgresql://user:pw@host:5432/db``. Its
            ``connect_timeout`` (seconds, default 10) is also how long an operation waits
            for a pooled connection.
        lock_timeout: Seconds a turn waits for its session before `SessionBusyError`.
        table_prefix: Names the tables (``<prefix>_sessions`` ...): lowercase letters,
            digits and ``_``, at most 40 characters.
        min_size: Connections each pool keeps open.
        max_size: Most connections per pool (at least 2): each concurrent turn uses up to 2.

    Raises:
        ConfigurationError: psycopg is not installed, or an argument is unusable.
        StoreError: The server cannot be reached or refused the connection.

    Example:
        >>> store = PostgresStore("postgresql://app@db.internal/chat")  # doctest: +SKIP
        >>> with store.lock("dp123"):  # doctest: +SKIP
        ...     store.append("dp123", [HumanMessage("hi")])
        >>> store.load("dp123", -10)  # doctest: +SKIP
        [HumanMessage(content='hi', ...)]
    """

    def __init__(
        self,
        url: str,
        *,
        lock_timeout: float = 120.0,
        table_prefix: str = "chatchain",
        min_size: int = 1,
        max_size: int = 10,
    ) -> None:
        try:
            from psycopg_pool import ConnectionPool
        except ImportError as exc:
            raise driver_missing("PostgreSQL", "postgres", exc) from exc
        if not _PREFIX.fullmatch(table_prefix):
            raise ConfigurationError(
                f"Unusable table prefix {table_prefix!r}: use 1 to 40 lowercase letters, digits "
                "and '_', starting with a letter or '_'."
            )
        if max_size < 2 or not 0 <= min_size <= max_size:
            raise ConfigurationError(
                f"Unusable pool sizes min_size={min_size}, max_size={max_size}: a turn holds one "
                "connection for its lock and needs another to read and write, so use "
                "0 <= min_size <= max_size and max_size >= 2."
            )
        self.lock_timeout = lock_timeout
        self.table_prefix = table_prefix
        self._url = url
        self._parse_url()
        self._sql = _Sql(table_prefix)
        self._min_size, self._max_size = min_size, max_size
        self._locks = SessionLocks(lock_timeout)
        self._lock_slots = threading.BoundedSemaphore(max_size - 1)
        self._guard = threading.Lock()
        self._async: _AsyncSide | None = None  # started by the first async call
        self._closed = False
        self._migrate()
        self._pool: ConnectionPool[Connection[TupleRow]] = ConnectionPool(
            url,
            kwargs=self._connect_args,
            min_size=min_size,
            max_size=max_size,
            open=False,
            configure=self._configure,
            check=ConnectionPool.check_connection,  # after a restart, skip dead connections
            timeout=self._wait,
            name=f"chatchain-{table_prefix}",
        )
        self._pool.open()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        lock_timeout: float = 120.0,
        table_prefix: str = "chatchain",
        min_size: int = 1,
        max_size: int = 10,
    ) -> PostgresStore:
        """The store at a ``postgresql://`` URL (what `open_store` calls)."""
        return cls(
            url,
            lock_timeout=lock_timeout,
            table_prefix=table_prefix,
            min_size=min_size,
            max_size=max_size,
        )

    def __repr__(self) -> str:
        return f"PostgresStore({self._where!r}, table_prefix={self.table_prefix!r})"

    # -- connections -------------------------------------------------------------------------

    def _parse_url(self) -> None:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        try:
            params = conninfo_to_dict(self._url)
        except psycopg.Error:
            # Not chained: libpq's message quotes the URL, password and all.
            raise ConfigurationError(
                "The PostgreSQL URL is malformed: libpq cannot parse it. Expected "
                "postgresql://user:password@host:port/db (or key=value pairs)."
            ) from None
        self._secret = str(params.get("password") or "")
        host = str(params.get("host") or "localhost")
        db = params.get("dbname") or params.get("user") or "postgres"
        user = f"{params['user']}@" if params.get("user") else ""
        self._where = f"postgresql://{user}{host}:{params.get('port') or 5432}/{db}"
        self._wait = _connect_timeout(params.get("connect_timeout"))
        self._connect_args: dict[str, Any] = {"autocommit": True}
        if not params.get("connect_timeout"):
            self._connect_args["connect_timeout"] = round(self._wait)
        if not params.get("application_name"):
            self._connect_args["application_name"] = "chatchain"

    def _failure(self, exc: BaseException) -> StoreError:
        """A driver error as a `StoreError` that names the server and never the password."""
        from psycopg import InterfaceError, OperationalError
        from psycopg.errors import InsufficientResources
        from psycopg_pool import PoolClosed, PoolTimeout

        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if self._secret:
            reason = reason.replace(self._secret, "***")
        if isinstance(exc, PoolClosed):
            return StoreError(f"The PostgreSQL store {self._where} is closed: open a new one.")
        if isinstance(exc, PoolTimeout):
            hint = (
                f"no connection within {self._wait:g} s. Check that the server is up, reachable "
                "and below max_connections, or raise connect_timeout in the URL or max_size"
            )
        elif isinstance(exc, InsufficientResources):
            hint = "the server is out of disk space, memory or connections: free some and retry"
        elif isinstance(exc, (OperationalError, InterfaceError)):
            hint = "check that the server is up and reachable, and see its log"
        else:
            hint = "see the server log"
        return StoreError(f"The PostgreSQL store {self._where} failed ({reason}): {hint}.")

    def _configure(self, conn: Connection[TupleRow]) -> None:
        conn.execute(_KEEPALIVES)

    def _migrate(self) -> None:
        """Bring the tables up to date, once even when several processes open the store."""
        import psycopg

        try:
            with psycopg.connect(self._url, **self._connect_args) as conn, conn.transaction():
                # A transaction-level lock in the two-key space, apart from the session locks.
                conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(%s), 0)",
                    (f"{self.table_prefix} schema",),
                )
                conn.execute(self._sql.migrations_table)
                applied = {name for (name,) in conn.execute(self._sql.applied)}
                for name, steps in self._sql.migrations:
                    if name not in applied:
                        for step in steps:
                            conn.execute(step)
                        conn.execute(self._sql.record, (name,))
        except psycopg.Error as exc:
            raise self._failure(exc) from exc

    @contextmanager
    def _connection(self) -> Iterator[Connection[TupleRow]]:
        import psycopg

        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise self._failure(exc) from exc

    def _fetch(self, query: Composed, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        """The rows of one statement (none for a statement that returns none)."""
        with self._connection() as conn:
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description else []

    def _async_side(self) -> _AsyncSide:
        with self._guard:
            if self._closed:
                raise StoreError(f"The PostgreSQL store {self._where} is closed: open a new one.")
            if self._async is None:
                from psycopg_pool import AsyncConnectionPool

                pool: AsyncConnectionPool[AsyncConnection[TupleRow]] = AsyncConnectionPool(
                    self._url,
                    kwargs=self._connect_args,
                    min_size=self._min_size,
                    max_size=self._max_size,
                    open=False,  # an async pool opens inside its loop
                    configure=self._aconfigure,
                    check=AsyncConnectionPool.check_connection,
                    timeout=self._wait,
                    name=f"chatchain-{self.table_prefix}-async",
                )
                self._async = _AsyncSide(pool, self._max_size - 1)
            return self._async

    async def _aconfigure(self, conn: AsyncConnection[TupleRow]) -> None:
        await conn.execute(_KEEPALIVES)

    @asynccontextmanager
    async def _aconnection(self, side: _AsyncSide) -> AsyncIterator[AsyncConnection[TupleRow]]:
        """A connection of the async pool; used on the store's own loop only."""
        import psycopg

        try:
            async with side.pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise self._failure(exc) from exc

    async def _afetch(
        self, query: Composed, params: Sequence[Any] | dict[str, Any] = ()
    ) -> list[Any]:
        """`_fetch` for async callers."""
        side = self._async_side()
        return await side.call(self._afetch_there(side, query, params))

    async def _afetch_there(
        self, side: _AsyncSide, query: Composed, params: Sequence[Any] | dict[str, Any]
    ) -> list[Any]:
        async with self._aconnection(side) as conn:
            cursor = await conn.execute(query, params)
            return await cursor.fetchall() if cursor.description else []

    def close(self) -> None:
        """Close the pools; the store cannot be used afterwards."""
        with self._guard:
            if self._closed:
                return
            self._closed = True
        if self._async is not None:
            self._async.close()
        self._pool.close()

    # -- messages ----------------------------------------------------------------------------

    def append(self, session_id: str, messages: Sequence[BaseMessage]) -> None:
        if not messages:
            return
        texts = [dump_message(m) for m in messages]  # before any write: all or nothing
        with self._connection() as conn, conn.transaction():
            row = conn.execute(self._sql.bump, {"sid": session_id, "n": len(texts)}).fetchone()
            conn.execute(self._sql.insert, _insert_args(session_id, texts, row))

    async def aappend(self, session_id: str, messages: Sequence[BaseMessage]) -> None:
        if not messages:
            return
        texts = [dump_message(m) for m in messages]
        side = self._async_side()
        await side.call(self._aappend_there(side, session_id, texts))

    async def _aappend_there(self, side: _AsyncSide, session_id: str, texts: list[str]) -> None:
        async with self._aconnection(side) as conn, conn.transaction():
            cursor = await conn.execute(self._sql.bump, {"sid": session_id, "n": len(texts)})
            row = await cursor.fetchone()
            await conn.execute(self._sql.insert, _insert_args(session_id, texts, row))

    def load(self, session_id: str, start: int = 0, stop: int | None = None) -> list[BaseMessage]:
        return _messages(self._fetch(self._sql.load, _load_args(session_id, start, stop)))

    async def aload(
        self, session_id: str, start: int = 0, stop: int | None = None
    ) -> list[BaseMessage]:
        return _messages(await self._afetch(self._sql.load, _load_args(session_id, start, stop)))

    def count(self, session_id: str) -> int:
        return _count(self._fetch(self._sql.count, (session_id,)))

    async def acount(self, session_id: str) -> int:
        return _count(await self._afetch(self._sql.count, (session_id,)))

    # -- sessions ----------------------------------------------------------------------------

    def sessions(self) -> list[str]:
        return [sid for (sid,) in self._fetch(self._sql.sessions)]

    def info(self, session_id: str) -> SessionInfo | None:
        for count, created, updated in self._fetch(self._sql.info, (session_id,)):
            return SessionInfo(session_id, int(count), _utc(created), _utc(updated))
        return None

    def session_infos(self, prefix: str = "", limit: int | None = None) -> list[SessionInfo]:
        high = prefix_end(prefix)
        params: dict[str, Any] = {"low": prefix, "limit": None if limit is None else max(0, limit)}
        if high is None:
            rows = self._fetch(self._sql.session_infos_from, params)
        else:
            rows = self._fetch(self._sql.session_infos, params | {"high": high})
        return [
            SessionInfo(sid, int(count), _utc(created), _utc(updated))
            for sid, count, created, updated in rows
        ]

    def delete(self, session_id: str) -> None:
        self._fetch(self._sql.delete, (session_id,))

    async def adelete(self, session_id: str) -> None:
        await self._afetch(self._sql.delete, (session_id,))

    def prune(self, before: datetime) -> list[str]:
        if before.tzinfo is None:
            before = before.replace(tzinfo=UTC)  # naive means UTC, as utcnow() gives
        return [sid for (sid,) in self._fetch(self._sql.prune, (before,))]

    def replace_session(
        self,
        session_id: str,
        messages: Sequence[BaseMessage],
        summary: Summary | None = None,
        *,
        created_at: datetime | None = None,
        updated_at: datetime | None = None,
    ) -> None:
        texts = [dump_message(m) for m in messages]  # before any write: all or nothing
        created, updated = session_times(created_at, updated_at)
        row = {
            "sid": session_id,
            "created": created,
            "updated": updated,
            "n": len(texts),
            "summary": None if summary is None else summary.text,
            "covers": None if summary is None else summary.covers,
        }
        with self._connection() as conn, conn.transaction():  # one transaction
            conn.execute(self._sql.delete, (session_id,))
            conn.execute(self._sql.replace_row, row)
            if texts:
                conn.execute(self._sql.insert, {"sid": session_id, "first": 0, "texts": texts})

    # -- running summary ---------------------------------------------------------------------

    def get_summary(self, session_id: str) -> Summary | None:
        return _summary(self._fetch(self._sql.get_summary, (session_id,)))

    async def aget_summary(self, session_id: str) -> Summary | None:
        return _summary(await self._afetch(self._sql.get_summary, (session_id,)))

    def set_summary(self, session_id: str, summary: Summary) -> None:
        self._fetch(self._sql.set_summary, (session_id, summary.text, summary.covers))

    async def aset_summary(self, session_id: str, summary: Summary) -> None:
        await self._afetch(self._sql.set_summary, (session_id, summary.text, summary.covers))

    # -- write-ahead records of turns in flight ----------------------------------------------

    def write_pending(self, session_id: str, token: str, record: str) -> bool:
        return bool(self._fetch(self._sql.write_pending, (session_id, token, record)))

    async def awrite_pending(self, session_id: str, token: str, record: str) -> bool:
        return bool(await self._afetch(self._sql.write_pending, (session_id, token, record)))

    def read_pending(self, session_id: str) -> tuple[str, str] | None:
        for token, record in self._fetch(self._sql.read_pending, (session_id,)):
            return str(token), str(record)
        return None

    async def aread_pending(self, session_id: str) -> tuple[str, str] | None:
        for token, record in await self._afetch(self._sql.read_pending, (session_id,)):
            return str(token), str(record)
        return None

    def drop_pending(self, session_id: str, token: str) -> bool:
        return bool(self._fetch(self._sql.drop_pending, (session_id, token)))

    async def adrop_pending(self, session_id: str, token: str) -> bool:
        return bool(await self._afetch(self._sql.drop_pending, (session_id, token)))

    def pending_sessions(self) -> list[str]:
        return [str(sid) for (sid,) in self._fetch(self._sql.pending_sessions)]

    # -- usage ledger ------------------------------------------------------------------------

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

    def _write_turn(
        self,
        conn: Connection[TupleRow],
        session_id: str,
        texts: list[str],
        entry: UsageEntry | None,
        release: str | None,
    ) -> None:
        """The writes of `commit_turn`, in ``conn``'s transaction."""
        fresh = True  # a turn whose entry is in the ledger was saved before (a replay)
        if entry is not None:
            fresh = conn.execute(self._sql.record_entry, _entry_args(entry)).fetchone() is not None
            if fresh:  # a new id: add it up
                with conn.cursor() as cursor:
                    cursor.executemany(self._sql.add_total, _total_args(entry))
        if release is not None:
            conn.execute(self._sql.release_hold, (release,))
        if texts and fresh:
            row = conn.execute(self._sql.bump, {"sid": session_id, "n": len(texts)}).fetchone()
            conn.execute(self._sql.insert, _insert_args(session_id, texts, row))

    def commit_turn(
        self,
        session_id: str,
        messages: Sequence[BaseMessage],
        entry: UsageEntry | None = None,
        *,
        release: str | None = None,
        fence: Fence | None = None,
    ) -> None:
        import psycopg

        texts = [dump_message(m) for m in messages]  # before any write: all or nothing
        holder = fence.conn if isinstance(fence, _LockFence) else None
        if isinstance(holder, psycopg.Connection):
            try:
                with holder.transaction():
                    self._write_turn(holder, session_id, texts, entry, release)
                return
            except psycopg.Error as exc:
                if not (holder.broken or holder.closed):
                    raise self._failure(exc) from exc
            # The lock's connection is gone, and the lock with it: keep what was billed.
            with self._connection() as conn, conn.transaction():
                self._write_turn(conn, session_id, [], entry, release)
            raise lock_lost(session_id, messages)
        with self._connection() as conn, conn.transaction():
            owned = fence is None or bool(
                conn.execute(self._sql.lock_owned, self._owner_args(fence)).fetchone() == (True,)
            )
            self._write_turn(conn, session_id, texts if owned else [], entry, release)
        if not owned:
            raise lock_lost(session_id, messages)

    def _owner_args(self, fence: Fence) -> dict[str, Any]:
        # A fence taken on the other (sync or async) side: checked by the holder's pid.
        return {"pid": int(fence.token), "key": self._lock_key(fence.session_id)}

    async def acommit_turn(
        self,
        session_id: str,
        messages: Sequence[BaseMessage],
        entry: UsageEntry | None = None,
        *,
        release: str | None = None,
        fence: Fence | None = None,
    ) -> None:
        texts = [dump_message(m) for m in messages]
        side = self._async_side()
        if not await side.call(self._acommit_there(side, session_id, texts, entry, release, fence)):
            raise lock_lost(session_id, messages)

    async def _acommit_there(
        self,
        side: _AsyncSide,
        session_id: str,
        texts: list[str],
        entry: UsageEntry | None,
        release: str | None,
        fence: Fence | None,
    ) -> bool:
        """`commit_turn` on the store's loop; False when the lock was lost."""
        import psycopg

        holder = fence.conn if isinstance(fence, _LockFence) else None
        if isinstance(holder, psycopg.AsyncConnection):
            try:
                async with holder.transaction():
                    await self._awrite_turn(holder, session_id, texts, entry, release)
                return True
            except psycopg.Error as exc:
                if not (holder.broken or holder.closed):
                    raise self._failure(exc) from exc
            async with self._aconnection(side) as conn, conn.transaction():
                await self._awrite_turn(conn, session_id, [], entry, release)
            return False
        async with self._aconnection(side) as conn, conn.transaction():
            owned = True
            if fence is not None:
                cursor = await conn.execute(self._sql.lock_owned, self._owner_args(fence))
                owned = await cursor.fetchone() == (True,)
            await self._awrite_turn(conn, session_id, texts if owned else [], entry, release)
        return owned

    async def _awrite_turn(
        self,
        conn: AsyncConnection[TupleRow],
        session_id: str,
        texts: list[str],
        entry: UsageEntry | None,
        release: str | None,
    ) -> None:
        """`_write_turn` for async connections."""
        fresh = True
        if entry is not None:
            cursor = await conn.execute(self._sql.record_entry, _entry_args(entry))
            fresh = await cursor.fetchone() is not None
            if fresh:
                async with conn.cursor() as many:
                    await many.executemany(self._sql.add_total, _total_args(entry))
        if release is not None:
            await conn.execute(self._sql.release_hold, (release,))
        if texts and fresh:
            cursor = await conn.execute(self._sql.bump, {"sid": session_id, "n": len(texts)})
            row = await cursor.fetchone()
            await conn.execute(self._sql.insert, _insert_args(session_id, texts, row))

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

    # -- users -------------------------------------------------------------------------------

    def add_user(self, user: User, token_hash: str) -> None:
        row = (
            user.name,
            _aware(user.created_at),
            user.budget_usd,
            user.daily_usd,
            user.monthly_usd,
            user.revoked,
            token_hash,
        )
        if not self._fetch(self._sql.add_user, row):
            raise user_exists(user.name)

    def titles(self, session_ids: Sequence[str]) -> dict[str, str]:
        return dict(self._fetch(self._sql.titles, (list(session_ids),)))

    def set_title(self, session_id: str, title: str | None) -> None:
        if title is None:
            self._fetch(self._sql.drop_title, (session_id,))
        else:
            self._fetch(self._sql.set_title, (session_id, title))

    def get_user(self, name: str) -> User | None:
        rows = self._fetch(self._sql.get_user, (name,))
        return _user(rows[0])[0] if rows else None

    def find_user(self, token_hash: str) -> tuple[User, str] | None:
        rows = self._fetch(self._sql.find_user, (token_hash,))
        return _user(rows[0]) if rows else None

    def list_users(self) -> list[User]:
        return [_user(row)[0] for row in self._fetch(self._sql.list_users)]

    def update_user(
        self, name: str, changes: Mapping[str, Any], *, token_hash: str | None = None
    ) -> User | None:
        check_user_changes(changes)
        values = dict(changes) if token_hash is None else {**changes, "token_hash": token_hash}
        with self._connection() as conn, conn.transaction():
            for column, value in values.items():
                conn.execute(self._sql.update_user[column], {"value": value, "name": name})
            row = conn.execute(self._sql.get_user, (name,)).fetchone()
        return None if row is None else _user(row)[0]

    # -- one writer per session --------------------------------------------------------------

    def _lock_key(self, session_id: str) -> str:
        # The prefix has no ':', so the first ':' separates it from any session id.
        return f"{self.table_prefix}:{session_id}"

    def _no_slot(self, session_id: str) -> SessionBusyError:
        return SessionBusyError(
            f"Session {session_id!r} is busy: all {self._max_size - 1} lock connections of the "
            f"PostgreSQL store were held by other turns for more than {self.lock_timeout:g} s. "
            "Wait for them to finish, raise max_size (each concurrent turn needs up to 2 "
            "connections), or raise CHATCHAIN_LOCK_TIMEOUT."
        )

    def lock(self, session_id: str) -> AbstractContextManager[Fence]:
        return self._locked(session_id)

    def alock(self, session_id: str) -> AbstractAsyncContextManager[Fence]:
        return self._alocked(session_id)

    @contextmanager
    def _locked(self, session_id: str) -> Iterator[Fence]:
        import psycopg

        deadline = time.monotonic() + self.lock_timeout
        with self._locks.locked(session_id):
            if not self._lock_slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise self._no_slot(session_id)
            try:
                try:
                    conn = self._pool.getconn()
                except psycopg.Error as exc:
                    raise self._failure(exc) from exc
                try:
                    self._take(conn, session_id, deadline)
                except BaseException:
                    self._pool.putconn(conn)
                    raise
                try:
                    yield _LockFence(session_id, str(conn.info.backend_pid), conn)
                finally:
                    self._release(conn, session_id)
            finally:
                self._lock_slots.release()

    def _take(self, conn: Connection[TupleRow], session_id: str, deadline: float) -> None:
        """Take the advisory lock on ``conn``, or raise (with ``conn`` closed if in doubt)."""
        import psycopg
        from psycopg.errors import LockNotAvailable

        key = self._lock_key(session_id)
        try:
            row = conn.execute(_TRY_LOCK, (key,)).fetchone()
            if row == (True,):
                return
            wait_ms = int((deadline - time.monotonic()) * 1000)
            if wait_ms >= 1:
                # Wait in the server, which hands the lock over the moment it is free.
                with conn.transaction():
                    conn.execute(_LOCK_TIMEOUT, (f"{wait_ms}ms",))
                    conn.execute(_LOCK, (key,))
                return
        except LockNotAvailable:
            pass
        except psycopg.Error as exc:
            conn.close()  # closing drops whatever the server may have granted
            raise self._failure(exc) from exc
        except BaseException:  # interrupted while waiting: the lock may have been granted
            conn.close()
            raise
        raise busy_error(session_id, self.lock_timeout, anywhere=True)

    def _release(self, conn: Connection[TupleRow], session_id: str) -> None:
        import psycopg

        try:
            if not conn.closed:
                conn.execute(_UNLOCK, (self._lock_key(session_id),))
        except BaseException as exc:
            # A connection that cannot unlock is closed, which unlocks; the turn is over, so
            # a connection broken by now is no error of the turn's.
            conn.close()
            if not isinstance(exc, psycopg.Error):
                raise
        finally:
            self._pool.putconn(conn)

    @asynccontextmanager
    async def _alocked(self, session_id: str) -> AsyncIterator[Fence]:
        deadline = time.monotonic() + self.lock_timeout
        async with self._locks.alocked(session_id):
            side = self._async_side()
            # The lock connection lives on the store's loop, held there by a task until
            # `release` is set; it lets go on its own if this task is cancelled meanwhile.
            taken: concurrent.futures.Future[Fence] = concurrent.futures.Future()
            release = asyncio.Event()
            holder = side.submit(self._lock_there(side, session_id, deadline, taken, release))
            try:
                fence = await asyncio.wrap_future(taken)
            except BaseException:  # the lock was not taken, or this task is cancelled
                holder.cancel()
                raise
            try:
                yield fence
            finally:
                side.loop.call_soon_threadsafe(release.set)
                # Shielded: the unlock completes even if this task is cancelled now.
                await asyncio.shield(asyncio.wrap_future(holder))

    async def _lock_there(
        self,
        side: _AsyncSide,
        session_id: str,
        deadline: float,
        taken: concurrent.futures.Future[Fence],
        release: asyncio.Event,
    ) -> None:
        """Keep the session's lock for a caller on another loop, until ``release`` is set.

        Outcomes reach the caller through ``taken`` only; this task itself never fails, so
        nothing is left unretrieved when the caller has gone.
        """
        if not taken.set_running_or_notify_cancel():
            return  # the caller gave up before this started
        me = asyncio.current_task()
        assert me is not None
        side.holders.add(me)
        try:
            async with self._ahold_there(side, session_id, deadline) as fence:
                taken.set_result(fence)
                await release.wait()
        except BaseException as exc:
            if taken.running():
                taken.set_exception(exc)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        finally:
            side.holders.discard(me)

    @asynccontextmanager
    async def _ahold_there(
        self, side: _AsyncSide, session_id: str, deadline: float
    ) -> AsyncIterator[Fence]:
        import psycopg

        if not await _acquire(side.lock_slots, deadline - time.monotonic()):
            raise self._no_slot(session_id)
        try:
            try:
                conn = await side.pool.getconn()
            except psycopg.Error as exc:
                raise self._failure(exc) from exc
            try:
                await self._atake(conn, session_id, deadline)
            except BaseException:
                await side.pool.putconn(conn)
                raise
            try:
                yield _LockFence(session_id, str(conn.info.backend_pid), conn)
            finally:
                await self._arelease(side, conn, session_id)
        finally:
            side.lock_slots.release()

    async def _atake(
        self, conn: AsyncConnection[TupleRow], session_id: str, deadline: float
    ) -> None:
        import psycopg
        from psycopg.errors import LockNotAvailable

        key = self._lock_key(session_id)
        try:
            row = await (await conn.execute(_TRY_LOCK, (key,))).fetchone()
            if row == (True,):
                return
            wait_ms = int((deadline - time.monotonic()) * 1000)
            if wait_ms >= 1:
                async with conn.transaction():
                    await conn.execute(_LOCK_TIMEOUT, (f"{wait_ms}ms",))
                    await conn.execute(_LOCK, (key,))
                return
        except LockNotAvailable:
            pass
        except psycopg.Error as exc:
            await conn.close()
            raise self._failure(exc) from exc
        except BaseException:  # cancelled while waiting: the lock may have been granted
            await conn.close()
            raise
        raise busy_error(session_id, self.lock_timeout, anywhere=True)

    async def _arelease(
        self, side: _AsyncSide, conn: AsyncConnection[TupleRow], session_id: str
    ) -> None:
        import psycopg

        try:
            if not conn.closed:
                await conn.execute(_UNLOCK, (self._lock_key(session_id),))
        except BaseException as exc:
            await conn.close()
            if not isinstance(exc, psycopg.Error):
                raise
        finally:
            await side.pool.putconn(conn)


async def _acquire(slots: asyncio.Semaphore, wait_s: float) -> bool:
    """Take a slot, waiting up to ``wait_s`` seconds."""
    if not slots.locked():
        await slots.acquire()  # free: returns at once
        return True
    try:
        await asyncio.wait_for(slots.acquire(), max(0.0, wait_s))
    except TimeoutError:
        return False
    return True
