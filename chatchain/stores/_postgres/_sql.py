"""The PostgreSQL store's statements, composed once for its table prefix, and how times
cross into and out of the database."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from chatchain.stores._base import USER_CHANGES
from chatchain.stores._ledger import ENTRY_COLUMNS, TOTAL_COLUMNS
from chatchain.stores._postgres._schema import _MIGRATIONS

if TYPE_CHECKING:
    from psycopg.sql import Composed

__all__ = ["_HOLD_COLUMNS", "_Sql", "_aware", "_utc"]


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


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
            "throttle",
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
        user_columns = (
            "name, created_at, budget_usd, daily_usd, monthly_usd, revoked, token_hash,"
            " requests_per_minute, streams"
        )
        self.add_user = q(
            f"INSERT INTO {{users}} ({user_columns}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (name) DO NOTHING RETURNING name"
        )
        self.get_user = q(f"SELECT {user_columns} FROM {{users}} WHERE name = %s")
        self.find_user = q(f"SELECT {user_columns} FROM {{users}} WHERE token_hash = %s")
        self.list_users = q(f"SELECT {user_columns} FROM {{users}} ORDER BY created_at, name")
        self.update_user = {
            column: q(f"UPDATE {{users}} SET {column} = %(value)s WHERE name = %(name)s")
            for column in (*sorted(USER_CHANGES), "token_hash")
        }
        # -- throttle: each check one upsert of the user's row. ON CONFLICT DO UPDATE locks
        # the row and judges its newest version, so concurrent checks take turns on it. Times
        # are the database's clock in Unix seconds, so every machine counts on one clock.
        self.count_request = q(
            "WITH now AS (SELECT extract(epoch FROM clock_timestamp())::float8 AS at),"
            " hit AS ("
            "  INSERT INTO {throttle} AS t (user_name, hits)"
            "  SELECT %(user)s, ARRAY[at] FROM now"
            "  ON CONFLICT (user_name) DO UPDATE"
            "  SET hits = ARRAY(SELECT h FROM unnest(t.hits) AS h"
            "                   WHERE h > excluded.hits[1] - %(window)s) || excluded.hits[1]"
            "  WHERE (SELECT count(*) FROM unnest(t.hits) AS h"
            "         WHERE h > excluded.hits[1] - %(window)s) < %(limit)s"
            "  RETURNING 1)"
            # A refused request's wait, from the row as it was when the statement began (a
            # request counted at that very moment elsewhere only makes the wait longer).
            " SELECT EXISTS (SELECT 1 FROM hit),"
            " (SELECT min(h) + %(window)s - now.at FROM {throttle}, unnest(hits) AS h"
            "  WHERE user_name = %(user)s AND h > now.at - %(window)s)"
            " FROM now"
        )
        self.take_stream = q(
            "INSERT INTO {throttle} AS t (user_name, streams)"
            " VALUES (%(user)s, jsonb_build_object(%(slot)s::text,"
            "  extract(epoch FROM clock_timestamp())::float8 + %(lease)s))"
            " ON CONFLICT (user_name) DO UPDATE"
            " SET streams = (SELECT coalesce(jsonb_object_agg(key, value), '{{}}'::jsonb)"
            "                FROM jsonb_each(t.streams)"
            "                WHERE value::float8 > extract(epoch FROM clock_timestamp()))"
            "  || excluded.streams"
            " WHERE (SELECT count(*) FROM jsonb_each(t.streams)"
            "        WHERE value::float8 > extract(epoch FROM clock_timestamp())) < %(limit)s"
            " RETURNING 1"
        )
        self.renew_stream = q(
            "UPDATE {throttle} SET streams = jsonb_set(streams, ARRAY[%(slot)s::text],"
            "  to_jsonb(extract(epoch FROM clock_timestamp())::float8 + %(lease)s))"
            " WHERE user_name = %(user)s"
            " AND (streams ->> %(slot)s::text)::float8 > extract(epoch FROM clock_timestamp())"
            " RETURNING 1"
        )
        self.release_stream = q(
            "UPDATE {throttle} SET streams = streams - %(slot)s::text WHERE user_name = %(user)s"
        )
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
