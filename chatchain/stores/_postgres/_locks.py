"""The PostgreSQL store's one writer per session: session-level advisory locks.

One writer per session across processes: a turn holds a session-level advisory lock keyed by
a 64-bit hash of the prefix and session id, on a connection it keeps out of the pool until
the turn ends. Two ids whose hashes collide merely take turns. The lock's lease is that
connection: PostgreSQL drops the lock when the connection closes, so a holder that dies
frees it at once, and a live turn never loses it while its connection lives. Server-side TCP
keepalives (about two minutes) also free it when the holder's machine vanishes without
closing the connection. A turn is saved on the connection that holds its lock (see
`chatchain.stores._postgres._commit`). Advisory locks need a direct connection (or PgBouncer
in session mode), and the key needs PostgreSQL 11 or later (``hashtextextended``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    contextmanager,
)
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chatchain._locks import busy_error
from chatchain.errors import SessionBusyError
from chatchain.stores._base import Fence
from chatchain.stores._postgres._connection import _AsyncSide, _Connections

if TYPE_CHECKING:
    from psycopg import AsyncConnection, Connection
    from psycopg.rows import TupleRow

__all__ = ["_LockFence", "_Locks"]


_TRY_LOCK = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"
_LOCK = "SELECT pg_advisory_lock(hashtextextended(%s, 0))"
_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', %s, true)"  # until the transaction ends
_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended(%s, 0))"


@dataclass(frozen=True)
class _LockFence(Fence):
    """The fence of a session lock: the connection that holds it (``token`` is its pid).

    The turn's final write runs on that very connection, in one transaction: if the
    connection was killed, the lock went with it and so does the write, and no other
    process can have taken the lock while the transaction is open.
    """

    conn: Any = field(default=None, compare=False, repr=False)


class _Locks(_Connections):
    """One writer per session across processes (`LockBackend`)."""

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
