"""The SQLite store: every session in one local file, shared by threads and processes.

The file is in WAL mode (readers never wait for the writer) and readable by its owner only.
Each operation borrows a connection from a small pool, so threads read in parallel, and
writes are short ``BEGIN IMMEDIATE`` transactions that wait up to a busy timeout for one
another.

One writer per session across processes is a lease: a row of the ``locks`` table naming its
holder and when it expires. A live holder renews it in the background, so a long turn keeps
it; a crashed one stops renewing, so its session frees itself within `SQLiteStore.lease`
seconds. SQLite has no row locks, and holding a write transaction for a turn would stall
every other session, hence the table.

A turn is saved by `SQLiteStore.commit_turn` in one ``BEGIN IMMEDIATE`` transaction: its
messages, its usage entry and totals, and the end of its budget hold. The same transaction
first checks that the lease still names the turn (its `Fence`); taking a lease needs the
write lock too, so it cannot change hands in between. A turn paused past its lease whose
session another process took gets only its usage recorded, and `SessionLockLostError`.

A period cap (`BudgetLimit.since`) reads its scope's sums per UTC day (``usage_days``, kept
with the totals) since its start, plus the entries of a day it starts within (a range of the
``usage`` index on session or user and time), in the same transaction as the check.

Clocks: lease and budget-hold expiries are wall-clock times of the machine (``time.time``,
UTC), which every process using the file shares.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_core.messages import BaseMessage

from chatchain._locks import SessionLocks, apoll, busy_error, poll
from chatchain.budgets import BudgetHold, BudgetLimit, BudgetRefusal, first_refusal
from chatchain.errors import ConfigurationError, StoreError
from chatchain.stores._base import (
    DEFAULT_LEASE,
    Fence,
    HistoryStore,
    SessionInfo,
    Summary,
    TitleBackend,
    UserBackend,
    check_user_changes,
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
from chatchain.stores._migrations import migrate
from chatchain.usage import Scope, Usage, UsageEntry
from chatchain.users import User

if TYPE_CHECKING:
    import sqlite3

__all__ = ["SQLiteStore"]

logger = logging.getLogger("chatchain")

# How long one write waits for another process's write before failing. Writes last
# milliseconds; a wait this long means a stuck process, which the StoreError points to.
_BUSY_TIMEOUT_S = 15.0
# Idle connections kept for reuse; more are opened while more threads work at once.
_MAX_IDLE = 8
# Upper bound for a slice's stop when none is given (seq never comes near it).
_NO_END = 2**62
# Upserts (INSERT ... ON CONFLICT DO UPDATE) arrived in SQLite 3.24 (2018).
_MIN_SQLITE = (3, 24, 0)

_URL_PREFIX = "sqlite:///"


def _path_from_url(url: str) -> Path:
    """The file a ``sqlite:///...`` URL names, as SQLAlchemy reads it.

    ``sqlite:///chat.db`` is relative to the working directory, ``sqlite:////var/chat.db``
    absolute, and ``~`` is the home directory.
    """
    if not url.lower().startswith(_URL_PREFIX):
        raise ConfigurationError(
            f"SQLite store URLs look like sqlite:///relative/path.db or "
            f"sqlite:////absolute/path.db, not {url!r} (CHATCHAIN_STORE)."
        )
    path = url[len(_URL_PREFIX) :]
    if not path or path == ":memory:" or "?" in path:
        raise ConfigurationError(
            f"{url!r} names no file: give a path, as in sqlite:///chat.db "
            "(for a store in memory, use memory://)."
        )
    return Path(path).expanduser()


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


def _stamp(moment: datetime) -> str:
    # Fixed width (always microseconds, always +00:00), so text order is time order.
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


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


def _append(conn: sqlite3.Connection, session_id: str, texts: list[str]) -> None:
    """Add messages at the end of a session, in ``conn``'s write transaction."""
    row = conn.execute(
        "SELECT message_count FROM sessions WHERE session_id = ?", (session_id,)
    ).fetchone()
    first = 0 if row is None else row[0]
    now = _stamp(utcnow())  # taken under the write lock: updated_at never goes back
    # A session that held only a summary starts its life at its first message.
    conn.execute(
        """
        INSERT INTO sessions (session_id, created_at, updated_at, message_count)
        VALUES (?, ?, ?, ?)
        ON CONFLICT (session_id) DO UPDATE SET
            created_at = CASE WHEN message_count = 0
                              THEN excluded.created_at ELSE created_at END,
            updated_at = excluded.updated_at,
            message_count = excluded.message_count
        """,
        (session_id, now, now, first + len(texts)),
    )
    conn.executemany(
        "INSERT INTO messages (session_id, seq, json) VALUES (?, ?, ?)",
        [(session_id, first + i, text) for i, text in enumerate(texts)],
    )


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


_DAMAGED = (
    "The file is not a SQLite database or is damaged: check the path (CHATCHAIN_STORE), or "
    "move the file aside to start a new store."
)


def _is_busy(exc: BaseException | None) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _advice(exc: Exception) -> str:
    """What to check, given what SQLite said."""
    text = str(exc).lower()
    if _is_busy(exc):
        return (
            f"Another process kept the file locked for more than {_BUSY_TIMEOUT_S:g} s: check "
            "for a stuck process using it."
        )
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return _DAMAGED
    if "full" in text:
        return "The disk is full: free some space."
    if "readonly" in text or "unable to open" in text or "permission" in text:
        return "Check that the file and its folder exist and that this user may write them."
    if "i/o" in text:
        return (
            "Check the disk, and that the file is on a local filesystem (SQLite's WAL mode "
            "does not work over network filesystems)."
        )
    return "Check the file and its disk."


_USER_COLUMNS = "name, created_at, budget_usd, daily_usd, monthly_usd, revoked, token_hash"


def _user(row: Sequence[Any]) -> tuple[User, str]:
    """The user of a ``users`` row (`_USER_COLUMNS`), and their token's hash."""
    name, created, budget, daily, monthly, revoked, token_hash = row
    user = User(name, datetime.fromisoformat(created), budget, daily, monthly, bool(revoked))
    return user, token_hash


def _session_infos_sql(*, bounded: bool) -> str:
    """The statement of `SQLiteStore.session_infos`: parameters low, (high,) and limit.

    A range of the primary key's index (BINARY collation: code point order), not LIKE, whose
    wildcards an id may hold; SQLite then sorts only the rows in the range.
    """
    return (
        "SELECT session_id, message_count, created_at, updated_at FROM sessions "
        f"WHERE session_id >= ? {'AND session_id < ? ' if bounded else ''}"
        "AND message_count > 0 ORDER BY updated_at DESC, session_id LIMIT ?"
    )


class SQLiteStore(HistoryStore, UserBackend, TitleBackend):
    """Sessions in one SQLite file: persistent, for the threads and processes of one machine.

    Args:
        path: The database file; created (readable by its owner only) with its folder.
        lock_timeout: How long `lock` waits for a session another turn holds, in seconds.
        lease: How long a lease outlives a crashed holder, in seconds. A live holder renews it
            every third of that, so it never bounds the length of a turn.

    Raises:
        StoreError: The file cannot be created or opened, or is not a SQLite database.

    Example:
        >>> import tempfile
        >>> store = SQLiteStore(Path(tempfile.mkdtemp()) / "chat.db")  # or open_store(url)
        >>> with store.lock("dp123"):  # one turn
        ...     store("dp123").add_user_message("hi")
        >>> store.sessions(), store.count("dp123"), store.load("dp123", -10)[0].content
        (['dp123'], 1, 'hi')
        >>> store.close()
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lock_timeout: float = 120.0,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        try:
            import sqlite3
        except ImportError as exc:  # Python built without its sqlite3 module
            raise ConfigurationError(
                "This Python has no sqlite3 module (no pip install adds it): use a Python "
                "built with SQLite, or another store (memory://, redis://, postgresql://)."
            ) from exc
        if sqlite3.sqlite_version_info < _MIN_SQLITE:
            raise ConfigurationError(
                f"The SQLite store needs SQLite {'.'.join(map(str, _MIN_SQLITE))} or newer; this "
                f"Python has {sqlite3.sqlite_version}: use a newer Python, or another store."
            )
        # Absolute, so connections opened later still find it after a chdir.
        self.path = Path(os.path.abspath(Path(path).expanduser()))
        self.lease = lease
        self._lock_timeout = lock_timeout
        self._locks = SessionLocks(lock_timeout)
        self._guard = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._closed = False
        self._leased: set[tuple[str, str]] = set()  # (session id, owner) of leases we renew
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()
        self._create_file()
        try:
            with self._connection("open the database") as conn:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode != "wal":
                    raise StoreError(
                        f"The SQLite store {self.path} cannot use WAL mode (it is in {mode!r} "
                        "mode): put it on a local filesystem."
                    )
                migrate(conn)
        except StoreError as exc:
            self.close()
            # A damaged file may read as a schema that is merely odd ("table sessions already
            # exists"): name the damage, not its symptom.
            cause = exc.__cause__
            damage = None if _DAMAGED in str(exc) or _is_busy(cause) else self._damage()
            if damage is not None:
                raise StoreError(
                    f"The SQLite store {self.path} could not open the database: {damage}. "
                    f"{_DAMAGED}"
                ) from cause
            raise
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_url(
        cls, url: str, *, lock_timeout: float = 120.0, lease: float = DEFAULT_LEASE
    ) -> SQLiteStore:
        """The store at ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` (``~`` allowed).

        Raises:
            ConfigurationError: The URL names no file.
            StoreError: The file cannot be created or opened.
        """
        return cls(_path_from_url(url), lock_timeout=lock_timeout, lease=lease)

    # -- connections -----------------------------------------------------------------------

    def _create_file(self) -> None:
        # Create it ourselves, owner-only, before SQLite would create it world-readable;
        # SQLite gives the -wal and -shm files the database file's permissions.
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        except OSError as exc:
            raise StoreError(
                f"The SQLite store {self.path} could not be created: {exc}. Check that its "
                "folder is writable by this user."
            ) from exc
        os.close(fd)

    def _damage(self) -> str | None:
        """What SQLite's ``quick_check`` finds wrong with the file, or ``None``."""
        import sqlite3

        try:
            conn = self._open_connection()
            try:
                rows = conn.execute("PRAGMA quick_check(1)").fetchall()
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            return str(exc)
        problem = str(rows[0][0]) if rows else "ok"
        return None if problem == "ok" else f"the file is damaged ({problem})"

    def _open_connection(self) -> sqlite3.Connection:
        import sqlite3

        # isolation_level=None: no implicit transactions; every write says BEGIN IMMEDIATE.
        # timeout is SQLite's busy_timeout. Each connection serves one thread at a time.
        return sqlite3.connect(
            self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )

    @contextmanager
    def _connection(self, action: str) -> Iterator[sqlite3.Connection]:
        """A pooled connection for one operation; SQLite failures become `StoreError`."""
        import sqlite3

        try:
            with self._guard:
                if self._closed:
                    raise StoreError(f"The SQLite store {self.path} is closed: open it again.")
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = self._open_connection()
            try:
                yield conn
            except BaseException:
                # Never hand on a connection that failed half-way: closing it also rolls back
                # whatever transaction the operation had begun.
                conn.close()
                raise
            with self._guard:
                if not self._closed and len(self._idle) < _MAX_IDLE:
                    self._idle.append(conn)
                    return
            conn.close()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, (sqlite3.ProgrammingError, sqlite3.IntegrityError)):
                raise  # a bug here, not a fault of the file
            raise StoreError(
                f"The SQLite store {self.path} could not {action}: {exc}. {_advice(exc)}"
            ) from exc

    @contextmanager
    def _write(self, action: str) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it is stored, or none of it."""
        with self._connection(action) as conn:
            # IMMEDIATE takes the write lock up front, so the transaction never has to be
            # retried because another process wrote between our read and our write.
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")

    def close(self) -> None:
        """Close the connections and stop renewing leases. Idempotent."""
        with self._guard:
            self._closed = True
            idle, self._idle = self._idle, []
            renewer, self._renewer = self._renewer, None
        self._stop.set()
        if renewer is not None and renewer is not threading.current_thread():
            renewer.join()
        for conn in idle:
            conn.close()

    # -- messages --------------------------------------------------------------------------

    def append(self, session_id: str, messages: Sequence[BaseMessage]) -> None:
        if not messages:
            return
        texts = [dump_message(m) for m in messages]
        with self._write("append messages") as conn:
            _append(conn, session_id, texts)

    def commit_turn(
        self,
        session_id: str,
        messages: Sequence[BaseMessage],
        entry: UsageEntry | None = None,
        *,
        release: str | None = None,
        fence: Fence | None = None,
    ) -> None:
        texts = [dump_message(m) for m in messages]  # before any write: all or nothing
        with self._write("save a turn") as conn:
            # Under the write lock, which taking a lease needs too: the lease cannot change
            # hands between this check and the commit.
            owned = fence is None or (
                conn.execute(
                    "SELECT 1 FROM locks WHERE session_id = ? AND owner = ?",
                    (fence.session_id, fence.token),
                ).fetchone()
                is not None
            )
            fresh = True  # a turn whose entry is in the ledger was saved before (a replay)
            if entry is not None:
                fresh = _record(conn, entry, release)
            elif release is not None:
                conn.execute("DELETE FROM budget_holds WHERE id = ?", (release,))
            if owned and texts and fresh:
                _append(conn, session_id, texts)
        if not owned:
            raise lock_lost(session_id, messages)

    # -- write-ahead records of turns in flight ----------------------------------------------

    def write_pending(self, session_id: str, token: str, record: str) -> bool:
        with self._write("keep a turn in flight") as conn:
            return (
                conn.execute(
                    """
                    INSERT INTO pending_turns (session_id, token, record) VALUES (?, ?, ?)
                    ON CONFLICT (session_id) DO UPDATE SET record = excluded.record
                    WHERE pending_turns.token = excluded.token
                    """,
                    (session_id, token, record),
                ).rowcount
                == 1
            )

    def read_pending(self, session_id: str) -> tuple[str, str] | None:
        with self._connection("read a turn in flight") as conn:
            row = conn.execute(
                "SELECT token, record FROM pending_turns WHERE session_id = ?", (session_id,)
            ).fetchone()
        return None if row is None else (row[0], row[1])

    def drop_pending(self, session_id: str, token: str) -> bool:
        with self._write("end a turn in flight") as conn:
            return (
                conn.execute(
                    "DELETE FROM pending_turns WHERE session_id = ? AND token = ?",
                    (session_id, token),
                ).rowcount
                == 1
            )

    def pending_sessions(self) -> list[str]:
        with self._connection("list turns in flight") as conn:
            rows = conn.execute("SELECT session_id FROM pending_turns ORDER BY session_id")
            return [session_id for (session_id,) in rows.fetchall()]

    def load(self, session_id: str, start: int = 0, stop: int | None = None) -> list[BaseMessage]:
        # One statement, so one consistent snapshot: negative bounds count back from the
        # session's message_count, read in the same statement. The bounds are constants to
        # the planner, so this is a range scan of the primary key.
        with self._connection("load messages") as conn:
            rows = conn.execute(
                """
                SELECT json FROM messages
                WHERE session_id = :sid
                  AND seq >= CASE WHEN :start < 0 THEN
                      (SELECT message_count FROM sessions WHERE session_id = :sid) + :start
                      ELSE :start END
                  AND seq < CASE WHEN :stop < 0 THEN
                      (SELECT message_count FROM sessions WHERE session_id = :sid) + :stop
                      ELSE :stop END
                ORDER BY seq
                """,
                {"sid": session_id, "start": start, "stop": _NO_END if stop is None else stop},
            ).fetchall()
        return [load_message(text) for (text,) in rows]

    def count(self, session_id: str) -> int:
        with self._connection("count messages") as conn:
            row = conn.execute(
                "SELECT message_count FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
        return 0 if row is None else int(row[0])

    # -- sessions --------------------------------------------------------------------------

    def sessions(self) -> list[str]:
        with self._connection("list sessions") as conn:
            rows = conn.execute(
                "SELECT session_id FROM sessions WHERE message_count > 0 ORDER BY created_at, rowid"
            ).fetchall()
        return [session_id for (session_id,) in rows]

    def info(self, session_id: str) -> SessionInfo | None:
        with self._connection("read a session") as conn:
            row = conn.execute(
                "SELECT message_count, created_at, updated_at FROM sessions "
                "WHERE session_id = ? AND message_count > 0",
                (session_id,),
            ).fetchone()
        if row is None:
            return None
        count, created, updated = row
        return SessionInfo(
            session_id, count, datetime.fromisoformat(created), datetime.fromisoformat(updated)
        )

    def session_infos(self, prefix: str = "", limit: int | None = None) -> list[SessionInfo]:
        end = prefix_end(prefix)
        bounds = (prefix,) if end is None else (prefix, end)
        with self._connection("list sessions") as conn:
            rows = conn.execute(
                _session_infos_sql(bounded=end is not None),
                (*bounds, -1 if limit is None else max(0, limit)),
            ).fetchall()
        return [
            SessionInfo(
                sid, count, datetime.fromisoformat(created), datetime.fromisoformat(updated)
            )
            for sid, count, created, updated in rows
        ]

    def delete(self, session_id: str) -> None:
        with self._write("delete a session") as conn:
            conn.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
            conn.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))

    def prune(self, before: datetime) -> list[str]:
        with self._write("prune sessions") as conn:
            rows = conn.execute(
                "SELECT session_id, message_count FROM sessions WHERE updated_at < ? "
                "ORDER BY created_at, rowid",
                (_stamp(before),),
            ).fetchall()
            for session_id, _ in rows:
                conn.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
                conn.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
            # Leases of crashed holders are harmless but would pile up; sweep them too.
            conn.execute("DELETE FROM locks WHERE expires_at < ?", (time.time(),))
        return [session_id for session_id, count in rows if count > 0]

    def replace_session(
        self,
        session_id: str,
        messages: Sequence[BaseMessage],
        summary: Summary | None = None,
        *,
        created_at: datetime | None = None,
        updated_at: datetime | None = None,
    ) -> None:
        texts = [dump_message(m) for m in messages]  # before the transaction: all or nothing
        created, updated = session_times(created_at, updated_at)
        with self._write("replace a session") as conn:
            conn.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
            conn.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
            conn.execute(
                """
                INSERT INTO sessions
                    (session_id, created_at, updated_at, message_count, summary, summary_covers)
                VALUES (?, ?, ?, ?, ?, ?)
                """,
                (
                    session_id,
                    _stamp(created),
                    _stamp(updated),
                    len(texts),
                    None if summary is None else summary.text,
                    None if summary is None else summary.covers,
                ),
            )
            conn.executemany(
                "INSERT INTO messages (session_id, seq, json) VALUES (?, ?, ?)",
                [(session_id, i, text) for i, text in enumerate(texts)],
            )

    # -- running summary -------------------------------------------------------------------

    def get_summary(self, session_id: str) -> Summary | None:
        with self._connection("read a summary") as conn:
            row = conn.execute(
                "SELECT summary, summary_covers FROM sessions "
                "WHERE session_id = ? AND summary IS NOT NULL",
                (session_id,),
            ).fetchone()
        return None if row is None else Summary(row[0], int(row[1]))

    def set_summary(self, session_id: str, summary: Summary) -> None:
        now = _stamp(utcnow())
        with self._write("store a summary") as conn:
            conn.execute(
                """
                INSERT INTO sessions (session_id, created_at, updated_at, summary, summary_covers)
                VALUES (?, ?, ?, ?, ?)
                ON CONFLICT (session_id) DO UPDATE SET
                    summary = excluded.summary, summary_covers = excluded.summary_covers
                """,
                (session_id, now, now, summary.text, summary.covers),
            )

    # -- usage ledger ----------------------------------------------------------------------

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

    # -- titles ----------------------------------------------------------------------------

    def titles(self, session_ids: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        ids = list(session_ids)
        with self._connection("read session titles") as conn:
            # In slices: SQLite caps the parameters of one statement.
            for start in range(0, len(ids), 500):
                part = ids[start : start + 500]
                marks = ", ".join("?" * len(part))
                rows = conn.execute(
                    f"SELECT session_id, title FROM session_titles WHERE session_id IN ({marks})",
                    part,
                )
                found.update(rows.fetchall())
        return found

    def set_title(self, session_id: str, title: str | None) -> None:
        with self._write("set a session title") as conn:
            if title is None:
                conn.execute("DELETE FROM session_titles WHERE session_id = ?", (session_id,))
            else:
                conn.execute(
                    "INSERT INTO session_titles (session_id, title) VALUES (?, ?) "
                    "ON CONFLICT (session_id) DO UPDATE SET title = excluded.title",
                    (session_id, title),
                )

    # -- users -----------------------------------------------------------------------------

    def add_user(self, user: User, token_hash: str) -> None:
        with self._write("add a user") as conn:
            added = conn.execute(
                f"INSERT INTO users ({_USER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (name) DO NOTHING",
                (
                    user.name,
                    _stamp(user.created_at),
                    user.budget_usd,
                    user.daily_usd,
                    user.monthly_usd,
                    int(user.revoked),
                    token_hash,
                ),
            ).rowcount
        if added != 1:
            raise user_exists(user.name)

    def get_user(self, name: str) -> User | None:
        with self._connection("read a user") as conn:
            row = conn.execute(
                f"SELECT {_USER_COLUMNS} FROM users WHERE name = ?", (name,)
            ).fetchone()
        return None if row is None else _user(row)[0]

    def find_user(self, token_hash: str) -> tuple[User, str] | None:
        with self._connection("find a user") as conn:
            row = conn.execute(
                f"SELECT {_USER_COLUMNS} FROM users WHERE token_hash = ?", (token_hash,)
            ).fetchone()
        return None if row is None else _user(row)

    def list_users(self) -> list[User]:
        with self._connection("list users") as conn:
            rows = conn.execute(
                f"SELECT {_USER_COLUMNS} FROM users ORDER BY created_at, name"
            ).fetchall()
        return [_user(row)[0] for row in rows]

    def update_user(
        self, name: str, changes: Mapping[str, Any], *, token_hash: str | None = None
    ) -> User | None:
        check_user_changes(changes)  # so only known column names go into the SQL
        values = {k: int(v) if k == "revoked" else v for k, v in changes.items()}
        if token_hash is not None:
            values["token_hash"] = token_hash
        with self._write("change a user") as conn:
            if values:
                conn.execute(
                    f"UPDATE users SET {', '.join(f'{k} = :{k}' for k in values)} "
                    "WHERE name = :name",
                    {**values, "name": name},
                )
            row = conn.execute(
                f"SELECT {_USER_COLUMNS} FROM users WHERE name = ?", (name,)
            ).fetchone()
        return None if row is None else _user(row)[0]

    # -- one writer per session ------------------------------------------------------------

    @contextmanager
    def lock(self, session_id: str) -> Iterator[Fence]:
        deadline = time.monotonic() + self._lock_timeout
        with self._locks.locked(session_id):  # threads of this process queue here, not in SQL
            owner = self._new_owner()
            if not poll(partial(self._take_lease, session_id, owner), deadline):
                raise busy_error(session_id, self._lock_timeout, anywhere=True)
            try:
                yield Fence(session_id, owner)
            finally:
                self._drop_lease(session_id, owner)

    @asynccontextmanager
    async def alock(self, session_id: str) -> AsyncIterator[Fence]:
        deadline = time.monotonic() + self._lock_timeout
        async with self._locks.alocked(session_id):
            owner = self._new_owner()
            if not await apoll(partial(self._atake_lease, session_id, owner), deadline):
                raise busy_error(session_id, self._lock_timeout, anywhere=True)
            try:
                yield Fence(session_id, owner)
            finally:
                # Runs to the end in its thread even if this task is being cancelled.
                await asyncio.to_thread(self._drop_lease, session_id, owner)

    async def _atake_lease(self, session_id: str, owner: str) -> bool:
        outcome: concurrent.futures.Future[bool] = concurrent.futures.Future()

        def attempt() -> bool:
            taken = False
            try:
                taken = self._take_lease(session_id, owner)
                return taken
            finally:
                outcome.set_result(taken)

        try:
            return await asyncio.to_thread(attempt)
        except asyncio.CancelledError:
            # The attempt goes on in its thread, and may take the lease after all: give it
            # back then, or no one would release it (and our renewer would keep it alive).
            def give_back(done: concurrent.futures.Future[bool]) -> None:
                if done.result():
                    threading.Thread(target=self._drop_lease, args=(session_id, owner)).start()

            outcome.add_done_callback(give_back)
            raise

    @staticmethod
    def _new_owner() -> str:
        # Names the holder for whoever inspects the locks table; the uuid makes it unique.
        return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"

    def _take_lease(self, session_id: str, owner: str) -> bool:
        """Take the session's lease if it is free or expired; True if we now hold it."""
        with self._write("lock a session") as conn:
            now = time.time()  # once we may write: a wait for the write lock must not age it
            taken = conn.execute(
                """
                INSERT INTO locks (session_id, owner, expires_at) VALUES (?, ?, ?)
                ON CONFLICT (session_id) DO UPDATE SET
                    owner = excluded.owner, expires_at = excluded.expires_at
                WHERE locks.expires_at < ?
                """,
                (session_id, owner, now + self.lease, now),
            ).rowcount
        if taken != 1:
            return False
        with self._guard:
            self._leased.add((session_id, owner))
            if self._renewer is None and not self._closed:
                self._renewer = threading.Thread(
                    target=self._renew_leases, name="chatchain-sqlite-leases", daemon=True
                )
                self._renewer.start()
        return True

    def _drop_lease(self, session_id: str, owner: str) -> None:
        with self._guard:
            self._leased.discard((session_id, owner))
        try:
            with self._write("unlock a session") as conn:
                conn.execute(
                    "DELETE FROM locks WHERE session_id = ? AND owner = ?", (session_id, owner)
                )
        except StoreError as exc:
            # The turn itself is done; the lease expires on its own, so don't fail it.
            logger.warning("Could not release session %r (it frees itself): %s", session_id, exc)

    def _renew_leases(self) -> None:
        """Push back the expiry of the leases this store holds until none is left."""
        while not self._stop.wait(self.lease / 3):
            with self._guard:
                if not self._leased:
                    self._renewer = None  # the next lease taken starts a new renewer
                    return
            try:
                with self._write("renew session locks") as conn:
                    # Read what we hold only under the write lock: a turn that gives its lease
                    # back in between has then left both, and is not taken for one that expired.
                    with self._guard:
                        leased = sorted(self._leased)
                    renewed = conn.executemany(
                        "UPDATE locks SET expires_at = ? WHERE session_id = ? AND owner = ?",
                        [(time.time() + self.lease, sid, owner) for sid, owner in leased],
                    ).rowcount
                if renewed < len(leased):  # this process stalled for longer than a lease
                    logger.warning(
                        "A session lock expired while its turn was still running (the process "
                        "was paused for more than %g s); if another turn took its session "
                        "meanwhile, its messages are refused (SessionLockLostError).",
                        self.lease,
                    )
            except StoreError as exc:  # try again next round, well before the leases expire
                if not self._stop.is_set():
                    logger.warning("Could not renew session locks: %s", exc)
