"""The PostgreSQL store's write-ahead records of turns in flight (`chatchain._pending`):
one row of ``<prefix>_pending_turns`` per session."""

from __future__ import annotations

from chatchain.stores._postgres._connection import _Connections

__all__ = ["_Pending"]


class _Pending(_Connections):
    """The write-ahead records of `HistoryStore.write_pending` and its kin."""

    def write_pending(self, session_id: str, token: str, record: str) -> bool:
        return bool(self._fetch(self._sql.write_pending, (session_id, token, record)))

    async def awrite_pending(self, session_id: str, token: str, record: str) -> bool:
        return bool(await self._afetch(self._sql.write_pending, (session_id, token, record)))

    def read_pending(self, session_id: str) -> tuple[str, str] | None:
        for token, record in self._fetch(self._sql.read_pending, (session_id,)):
            return str(token), str(record)
        return None

    async def aread_pending(self, session_id: str) -> tuple[str, str] | None:
        for token, record in await self._afetch(self._sql.read_pending, (session_id,)):
            return str(token), str(record)
        return None

    def drop_pending(self, session_id: str, token: str) -> bool:
        return bool(self._fetch(self._sql.drop_pending, (session_id, token)))

    async def adrop_pending(self, session_id: str, token: str) -> bool:
        return bool(await self._afetch(self._sql.drop_pending, (session_id, token)))

    def pending_sessions(self) -> list[str]:
        return [str(sid) for (sid,) in self._fetch(self._sql.pending_sessions)]
