"""The SQLite store: every session in one local file, shared by threads and processes.

The store is one class composed of a part per contract, each in a module of its own:

- `_connection`: the file, a small pool of connections, write transactions, and SQLite
  failures as `StoreError` (the schema's migrations are `chatchain.stores._migrations`);
- `_history`: messages, sessions, running summaries and titles;
- `_ledger`: the usage ledger and budget holds;
- `_commit`: `commit_turn`, a whole turn in one transaction fenced by the session's lease;
- `_pending`: the write-ahead records of turns in flight;
- `_users`: the users of a chat service;
- `_throttle`: each user's requests per minute and open streams (`ThrottleBackend`);
- `_locks`: one writer per session, by leases.

Clocks: lease and budget-hold expiries are wall-clock times of the machine (``time.time``,
UTC), which every process using the file shares.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from chatchain._locks import SessionLocks
from chatchain.errors import ConfigurationError, StoreError
from chatchain.stores._base import (
    DEFAULT_LEASE,
    HistoryStore,
    ThrottleBackend,
    TitleBackend,
    UserBackend,
)
from chatchain.stores._migrations import migrate
from chatchain.stores._sqlite._commit import _Commit
from chatchain.stores._sqlite._connection import _DAMAGED, _is_busy, _path_from_url
from chatchain.stores._sqlite._history import _History, _session_infos_sql
from chatchain.stores._sqlite._ledger import _Ledger, _part_query
from chatchain.stores._sqlite._locks import _Locks
from chatchain.stores._sqlite._pending import _Pending
from chatchain.stores._sqlite._throttle import _Throttle
from chatchain.stores._sqlite._users import _Users

if TYPE_CHECKING:
    import sqlite3

__all__ = ["SQLiteStore", "_part_query", "_path_from_url", "_session_infos_sql"]


# Upserts (INSERT ... ON CONFLICT DO UPDATE) arrived in SQLite 3.24 (2018).
_MIN_SQLITE = (3, 24, 0)


class SQLiteStore(
    _History,
    _Commit,
    _Ledger,
    _Locks,
    _Pending,
    _Users,
    _Throttle,
    HistoryStore,
    UserBackend,
    TitleBackend,
    ThrottleBackend,
):
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
