"""The SQLite store's file and connections, and SQLite failures as `StoreError`.

The file is in WAL mode (readers never wait for the writer) and readable by its owner only.
Each operation borrows a connection from a small pool, so threads read in parallel, and
writes are short ``BEGIN IMMEDIATE`` transactions that wait up to a busy timeout for one
another.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from chatchain._locks import SessionLocks
from chatchain.errors import ConfigurationError, StoreError

if TYPE_CHECKING:
    import sqlite3


__all__ = ["_DAMAGED", "_Connections", "_is_busy", "_path_from_url", "_stamp"]


# How long one write waits for another process's write before failing. Writes last
# milliseconds; a wait this long means a stuck process, which the StoreError points to.
_BUSY_TIMEOUT_S = 15.0
# Idle connections kept for reuse; more are opened while more threads work at once.
_MAX_IDLE = 8


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


def _stamp(moment: datetime) -> str:
    # Fixed width (always microseconds, always +00:00), so text order is time order.
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


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


class _Connections:
    """What every part of `SQLiteStore` runs its statements through: a small pool of
    connections, write transactions, and SQLite failures as `StoreError`.
    `SQLiteStore.__init__` sets the attributes."""

    path: Path
    lease: float
    _lock_timeout: float
    _locks: SessionLocks
    _guard: threading.Lock
    _idle: list[sqlite3.Connection]
    _closed: bool
    _leased: set[tuple[str, str]]  # (session id, owner) of leases we renew
    _renewer: threading.Thread | None
    _stop: threading.Event

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
