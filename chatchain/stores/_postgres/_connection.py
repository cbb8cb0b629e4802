"""The PostgreSQL store's connections: the pools, the schema's migration, and driver errors
as `StoreError`.

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
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from chatchain._locks import SessionLocks
from chatchain.errors import ConfigurationError, StoreError
from chatchain.stores._postgres._sql import _Sql

if TYPE_CHECKING:
    from psycopg import AsyncConnection, Connection
    from psycopg.rows import TupleRow
    from psycopg.sql import Composed
    from psycopg_pool import AsyncConnectionPool, ConnectionPool

__all__ = ["_AsyncSide", "_Connections"]


_T = TypeVar("_T")

_DEFAULT_WAIT_S = 10.0


# Server-side TCP keepalives: a lock whose holder's machine vanished is freed in ~2 minutes.
_KEEPALIVES = (
    "SELECT set_config('tcp_keepalives_idle', '60', false),"
    " set_config('tcp_keepalives_interval', '10', false),"
    " set_config('tcp_keepalives_count', '6', false)"
)


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


class _Connections:
    """What every part of `PostgresStore` runs its statements through: the pools, and
    driver errors as `StoreError`. `PostgresStore.__init__` sets the attributes."""

    lock_timeout: float
    table_prefix: str
    _url: str
    _secret: str  # the URL's password, never shown
    _where: str  # the URL without its password
    _wait: float
    _connect_args: dict[str, Any]
    _sql: _Sql
    _min_size: int
    _max_size: int
    _locks: SessionLocks
    _lock_slots: threading.BoundedSemaphore
    _guard: threading.Lock
    _async: _AsyncSide | None
    _closed: bool
    _pool: ConnectionPool[Connection[TupleRow]]

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
