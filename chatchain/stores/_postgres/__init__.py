"""The PostgreSQL store: sessions shared by many processes and machines (``chatchain[postgres]``).

Not langchain-postgres: its ``PostgresChatMessageHistory`` requires UUID session ids and loads
whole sessions, where chatchain needs any string id and windowed reads.

The store is one class composed of a part per contract, each in a module of its own:

- `_schema`: the tables, as ordered, named migrations (their names are recorded in users'
  databases: never rename one);
- `_sql`: the statements, composed once for the table prefix;
- `_connection`: the pools (sync, and async on a loop of the store's own), the migration
  run, and driver errors as `StoreError`;
- `_history`: messages, sessions, running summaries and titles;
- `_ledger`: the usage ledger and budget holds;
- `_commit`: `commit_turn`, a whole turn in one transaction on the lock's connection;
- `_pending`: the write-ahead records of turns in flight;
- `_users`: the users of a chat service;
- `_locks`: one writer per session, by advisory locks.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING

from chatchain._locks import SessionLocks
from chatchain.errors import ConfigurationError
from chatchain.stores._base import (
    HistoryStore,
    ThrottleBackend,
    TitleBackend,
    UserBackend,
    driver_missing,
)
from chatchain.stores._postgres._commit import _Commit
from chatchain.stores._postgres._connection import _AsyncSide
from chatchain.stores._postgres._history import _History
from chatchain.stores._postgres._ledger import _Ledger
from chatchain.stores._postgres._locks import _Locks
from chatchain.stores._postgres._pending import _Pending
from chatchain.stores._postgres._schema import _MIGRATIONS
from chatchain.stores._postgres._sql import _Sql
from chatchain.stores._postgres._throttle import _Throttle
from chatchain.stores._postgres._users import _Users

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg.rows import TupleRow
    from psycopg_pool import ConnectionPool

__all__ = ["_MIGRATIONS", "PostgresStore"]


_PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,39}")  # the longest table name stays under 63 bytes


class PostgresStore(
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
