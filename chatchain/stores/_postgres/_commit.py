"""The PostgreSQL store's `commit_turn`: a finished turn in one transaction.

A turn is saved (`PostgresStore.commit_turn`: messages, usage entry and totals, end of the
budget hold) in one transaction *on the connection that holds the lock*: if that connection
was killed (a network cut, a failover, ``pg_terminate_backend``), the lock went with it and
the write fails with it, and no other turn can take the lock while the transaction is open.
The usage is then recorded on another connection and the turn raises `SessionLockLostError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from langchain_core.messages import BaseMessage

from chatchain._flow import Effect, Flow, arun, run
from chatchain.stores._base import Fence, dump_message, lock_lost
from chatchain.stores._postgres._connection import _AsyncSide
from chatchain.stores._postgres._history import _insert_args
from chatchain.stores._postgres._ledger import _entry_args, _total_args
from chatchain.stores._postgres._locks import _LockFence, _Locks
from chatchain.usage import UsageEntry

if TYPE_CHECKING:
    from psycopg import AsyncConnection, Connection
    from psycopg.rows import TupleRow
    from psycopg.sql import Composed

__all__ = ["_Commit"]


class _Commit(_Locks):
    """A turn's messages, usage entry and the end of its budget hold, in one transaction on
    the connection that holds its session's lock (`HistoryStore.commit_turn`)."""

    def _turn_writes(
        self,
        conn: Connection[TupleRow] | AsyncConnection[TupleRow],
        session_id: str,
        texts: list[str],
        entry: UsageEntry | None,
        release: str | None,
    ) -> Flow[None]:
        """The writes of `commit_turn` in ``conn``'s transaction, once for both sides (see
        `_flow`): `_write_turn` runs them on a sync connection, `_awrite_turn` on an async one."""
        fresh = True  # a turn whose entry is in the ledger was saved before (a replay)
        if entry is not None:
            record = _Statement(conn, self._sql.record_entry, _entry_args(entry), fetch=True)
            fresh = (yield record) is not None
            if fresh:  # a new id: add it up
                yield _Statement(conn, self._sql.add_total, _total_args(entry), many=True)
        if release is not None:
            yield _Statement(conn, self._sql.release_hold, (release,))
        if texts and fresh:
            bump = {"sid": session_id, "n": len(texts)}
            row = yield _Statement(conn, self._sql.bump, bump, fetch=True)
            yield _Statement(conn, self._sql.insert, _insert_args(session_id, texts, row))

    def _write_turn(
        self,
        conn: Connection[TupleRow],
        session_id: str,
        texts: list[str],
        entry: UsageEntry | None,
        release: str | None,
    ) -> None:
        """The writes of `commit_turn` (`_turn_writes`), in ``conn``'s transaction."""
        run(self._turn_writes(conn, session_id, texts, entry, release))

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
        await arun(self._turn_writes(conn, session_id, texts, entry, release))


class _Statement(Effect):
    """One write of `_Commit._turn_writes` on its transaction's connection: `run` on a sync
    connection, `arun` on an async one (the flow's driver is the connection's side). Its
    result is the statement's first row if ``fetch``, else ``None``."""

    __slots__ = ("conn", "fetch", "many", "params", "query")

    def __init__(
        self,
        conn: Connection[TupleRow] | AsyncConnection[TupleRow],
        query: Composed,
        params: Any,
        *,
        fetch: bool = False,
        many: bool = False,  # ``params`` is a sequence of rows: ``executemany``
    ) -> None:
        self.conn, self.query, self.params, self.fetch, self.many = conn, query, params, fetch, many

    def run(self) -> Any:
        conn = cast("Connection[TupleRow]", self.conn)
        if self.many:
            with conn.cursor() as cursor:
                cursor.executemany(self.query, self.params)
            return None
        cursor = conn.execute(self.query, self.params)
        return cursor.fetchone() if self.fetch else None

    async def arun(self) -> Any:
        conn = cast("AsyncConnection[TupleRow]", self.conn)
        if self.many:
            async with conn.cursor() as cursor:
                await cursor.executemany(self.query, self.params)
            return None
        cursor = await conn.execute(self.query, self.params)
        return await cursor.fetchone() if self.fetch else None
