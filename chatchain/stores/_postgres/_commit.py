"""The PostgreSQL store's `commit_turn`: a finished turn in one transaction.

A turn is saved (`PostgresStore.commit_turn`: messages, usage entry and totals, end of the
budget hold) in one transaction *on the connection that holds the lock*: if that connection
was killed (a network cut, a failover, ``pg_terminate_backend``), the lock went with it and
the write fails with it, and no other turn can take the lock while the transaction is open.
The usage is then recorded on another connection and the turn raises `SessionLockLostError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from langchain_core.messages import BaseMessage

from chatchain.stores._base import Fence, dump_message, lock_lost
from chatchain.stores._postgres._connection import _AsyncSide
from chatchain.stores._postgres._history import _insert_args
from chatchain.stores._postgres._ledger import _entry_args, _total_args
from chatchain.stores._postgres._locks import _LockFence, _Locks
from chatchain.usage import UsageEntry

if TYPE_CHECKING:
    from psycopg import AsyncConnection, Connection
    from psycopg.rows import TupleRow

__all__ = ["_Commit"]


class _Commit(_Locks):
    """A turn's messages, usage entry and the end of its budget hold, in one transaction on
    the connection that holds its session's lock (`HistoryStore.commit_turn`)."""

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
