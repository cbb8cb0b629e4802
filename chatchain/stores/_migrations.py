"""The SQLite store's schema, as ordered, named migrations applied once each.

Every function decorated with `migration` changes the schema one step. `migrate` applies, in
order, those a database has not seen yet, each in its own transaction together with its row
in ``_chatchain_migrations``, so a migration is applied once and never half-way, even when
several processes open a new file at the same moment. Add new steps at the end; never edit
or reorder one that has shipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from chatchain.stores._base import utcnow

if TYPE_CHECKING:
    import sqlite3

__all__ = ["MIGRATIONS", "migrate", "migration"]

Migration = Callable[["sqlite3.Connection"], None]

MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    """Register ``fn`` as the next schema step, named by its function name."""
    MIGRATIONS.append(fn)
    return fn


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply the migrations ``conn``'s database lacks, in order; return their names.

    ``conn`` must be in autocommit mode (``isolation_level=None``): each step opens its own
    ``BEGIN IMMEDIATE`` transaction.
    """
    applied = _applied(conn)
    newly: list[str] = []
    for fn in MIGRATIONS:
        name = fn.__name__
        if name in applied:
            continue
        # IMMEDIATE takes the write lock first, so another process opening the same file waits
        # here and then sees the step recorded instead of applying it a second time.
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS _chatchain_migrations "
                "(name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            done = conn.execute("SELECT 1 FROM _chatchain_migrations WHERE name = ?", (name,))
            if done.fetchone() is None:
                fn(conn)
                conn.execute(
                    "INSERT INTO _chatchain_migrations (name, applied_at) VALUES (?, ?)",
                    (name, utcnow().isoformat(timespec="microseconds")),
                )
                newly.append(name)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return newly


def _applied(conn: sqlite3.Connection) -> set[str]:
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_chatchain_migrations'"
    ).fetchone()
    if exists is None:
        return set()
    return {name for (name,) in conn.execute("SELECT name FROM _chatchain_migrations")}


@migration
def m001_initial(conn: sqlite3.Connection) -> None:
    # Times are ISO 8601 UTC text with microseconds ("2025-01-31T12:00:00.000001+00:00"):
    # readable in the sqlite3 shell, and they sort as they read.
    conn.execute(
        """
        CREATE TABLE sessions (
            session_id TEXT PRIMARY KEY,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            message_count INTEGER NOT NULL DEFAULT 0,
            summary TEXT,
            summary_covers INTEGER
        )
        """
    )
    conn.execute("CREATE INDEX sessions_by_created_at ON sessions (created_at)")
    conn.execute("CREATE INDEX sessions_by_updated_at ON sessions (updated_at)")
    # One row per message; the primary key's index makes a window of a session one range
    # scan. Not WITHOUT ROWID: that pays off for rows under ~1/20 of a page, and messages
    # (JSON with metadata) are often larger; measured, 2 kB messages loaded slower with it.
    conn.execute(
        """
        CREATE TABLE messages (
            session_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            json TEXT NOT NULL,
            PRIMARY KEY (session_id, seq)
        )
        """
    )
    # Leases: who holds a session for a turn, and until when (Unix time, seconds).
    conn.execute(
        """
        CREATE TABLE locks (
            session_id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            expires_at REAL NOT NULL
        ) WITHOUT ROWID
        """
    )


@migration
def m002_usage_ledger(conn: sqlite3.Connection) -> None:
    # The ledger: one row per turn or summary call, a column per UsageEntry field. Times are
    # text as in m001 (fixed width, so text order is time order); booleans are 0/1; an
    # unknown price is NULL. Sessions' rows never touch these tables: deleting or pruning a
    # session keeps what it spent.
    conn.execute(
        """
        CREATE TABLE usage (
            id TEXT PRIMARY KEY,
            session_id TEXT NOT NULL,
            model TEXT,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            total_tokens INTEGER NOT NULL,
            cached_tokens INTEGER NOT NULL,
            reasoning_tokens INTEGER NOT NULL,
            requests INTEGER NOT NULL,
            cost_usd REAL,
            price_source TEXT,
            latency_s REAL NOT NULL,
            first_token_s REAL,
            summary INTEGER NOT NULL,
            estimated INTEGER NOT NULL,
            user_id TEXT,
            at TEXT NOT NULL
        )
        """
    )
    # Each index ends in the time (and implicitly the rowid), so a filtered listing comes out
    # of its index already in order: no sort.
    conn.execute("CREATE INDEX usage_by_session ON usage (session_id, at)")
    conn.execute("CREATE INDEX usage_by_user ON usage (user_id, at)")
    conn.execute("CREATE INDEX usage_by_at ON usage (at)")
    # Running sums per ("session", id), ("user", id) and ("all", ""), kept in the same
    # transaction as the entries, so a total is one row read. cost_usd sums the priced
    # entries only; unpriced counts the others (a total's cost is unknown when it is > 0).
    conn.execute(
        """
        CREATE TABLE usage_totals (
            scope TEXT NOT NULL,
            key TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            total_tokens INTEGER NOT NULL DEFAULT 0,
            cached_tokens INTEGER NOT NULL DEFAULT 0,
            reasoning_tokens INTEGER NOT NULL DEFAULT 0,
            requests INTEGER NOT NULL DEFAULT 0,
            cost_usd REAL NOT NULL DEFAULT 0.0,
            unpriced INTEGER NOT NULL DEFAULT 0,
            latency_s REAL NOT NULL DEFAULT 0.0,
            turns INTEGER NOT NULL DEFAULT 0,
            summaries INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (scope, key)
        ) WITHOUT ROWID
        """
    )
    # Spending set aside for turns in flight; expires_at is a time as above.
    conn.execute(
        """
        CREATE TABLE budget_holds (
            id TEXT PRIMARY KEY,
            session_id TEXT NOT NULL,
            user_id TEXT,
            tokens INTEGER NOT NULL,
            cost_usd REAL NOT NULL,
            expires_at TEXT NOT NULL
        )
        """
    )
    conn.execute("CREATE INDEX budget_holds_by_session ON budget_holds (session_id)")
    conn.execute("CREATE INDEX budget_holds_by_user ON budget_holds (user_id)")


@migration
def m003_estimated_totals(conn: sqlite3.Connection) -> None:
    # How many of a total's entries hold tokens counted here, not reported by the endpoint.
    conn.execute("ALTER TABLE usage_totals ADD COLUMN estimated INTEGER NOT NULL DEFAULT 0")
    conn.execute(
        """
        UPDATE usage_totals SET estimated = (
            SELECT count(*) FROM usage AS u WHERE u.estimated AND (
                usage_totals.scope = 'all'
                OR (usage_totals.scope = 'session' AND u.session_id = usage_totals.key)
                OR (usage_totals.scope = 'user' AND u.user_id = usage_totals.key)
            )
        )
        """
    )


@migration
def m004_cached_turns(conn: sqlite3.Connection) -> None:
    # Turns answered from the response cache (CHATCHAIN_CACHE): flagged, with what they would
    # have cost (NULL when unknown). No entry before this step was a cache hit: all 0.
    conn.execute("ALTER TABLE usage ADD COLUMN cached INTEGER NOT NULL DEFAULT 0")
    conn.execute("ALTER TABLE usage ADD COLUMN saved_usd REAL")
    conn.execute("ALTER TABLE usage_totals ADD COLUMN cached_turns INTEGER NOT NULL DEFAULT 0")
    conn.execute("ALTER TABLE usage_totals ADD COLUMN saved_usd REAL NOT NULL DEFAULT 0.0")


@migration
def m005_users(conn: sqlite3.Connection) -> None:
    # The users of a chat service: the hash of each one's token (never the token), found by
    # its unique index on every request; caps in USD (NULL: none); times as in m001.
    conn.execute(
        """
        CREATE TABLE users (
            name TEXT PRIMARY KEY,
            token_hash TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL,
            budget_usd REAL,
            daily_usd REAL,
            monthly_usd REAL,
            revoked INTEGER NOT NULL DEFAULT 0
        )
        """
    )


@migration
def m006_usage_days(conn: sqlite3.Connection) -> None:
    # Spending per UTC day for each total (scope, key), kept in the same transaction as the
    # entries: a period cap (a day's, a month's) reads a row per day of its period instead
    # of every entry. cost_usd sums the priced entries only, as in usage_totals.
    conn.execute(
        """
        CREATE TABLE usage_days (
            scope TEXT NOT NULL,
            key TEXT NOT NULL,
            day TEXT NOT NULL,
            total_tokens INTEGER NOT NULL DEFAULT 0,
            cost_usd REAL NOT NULL DEFAULT 0.0,
            PRIMARY KEY (scope, key, day)
        ) WITHOUT ROWID
        """
    )
    # The entries recorded before: `at` is UTC text, so its first ten characters are its day.
    for scope, key in (("'all'", "''"), ("'session'", "session_id"), ("'user'", "user_id")):
        conn.execute(
            f"""
            INSERT INTO usage_days (scope, key, day, total_tokens, cost_usd)
            SELECT {scope}, {key}, substr(at, 1, 10), sum(total_tokens), coalesce(sum(cost_usd), 0)
            FROM usage WHERE {key} IS NOT NULL GROUP BY {key}, substr(at, 1, 10)
            """
        )


@migration
def m007_pending_turns(conn: sqlite3.Connection) -> None:
    # The write-ahead record of each session's turn in flight (`chatchain._pending`): kept
    # before its request goes out, dropped once the turn is stored; one a crash leaves
    # behind is stored as an interrupted turn by the next holder of the session's lock.
    conn.execute(
        """
        CREATE TABLE pending_turns (
            session_id TEXT PRIMARY KEY,
            token TEXT NOT NULL,
            record TEXT NOT NULL
        ) WITHOUT ROWID
        """
    )


@migration
def m008_session_titles(conn: sqlite3.Connection) -> None:
    # The titles people give their sessions: a table apart from `sessions`, so that renaming
    # never touches a session's row (its times, its count) or the turns' commit path.
    conn.execute("CREATE TABLE session_titles (session_id TEXT PRIMARY KEY, title TEXT NOT NULL)")


@migration
def m009_throttle(conn: sqlite3.Connection) -> None:
    # The chat service's limits counted for every process on the file (`ThrottleBackend`):
    # the times (Unix seconds) of each user's requests in the moving window, and the leases
    # of their open streams. A user's own limits live with the user (NULL: the deployment's).
    conn.execute("ALTER TABLE users ADD COLUMN requests_per_minute INTEGER")
    conn.execute("ALTER TABLE users ADD COLUMN streams INTEGER")
    conn.execute("CREATE TABLE throttle_requests (user_name TEXT NOT NULL, at REAL NOT NULL)")
    conn.execute("CREATE INDEX throttle_requests_user_at ON throttle_requests (user_name, at)")
    conn.execute(
        """
        CREATE TABLE throttle_streams (
            slot TEXT PRIMARY KEY,
            user_name TEXT NOT NULL,
            expires_at REAL NOT NULL
        ) WITHOUT ROWID
        """
    )
    conn.execute("CREATE INDEX throttle_streams_user ON throttle_streams (user_name, expires_at)")
