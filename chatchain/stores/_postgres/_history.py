"""The PostgreSQL store's transcripts: messages, sessions, running summaries and titles.

Messages are the exact JSON text `dump_message` writes (``text``, not ``jsonb``, which would
reorder keys for nothing). A session's messages are numbered ``0..message_count-1``; an
append bumps ``message_count`` on the session row (which locks it until the commit) and
inserts its messages under the numbers that returned, in one transaction. A window is one
range read of the primary key; ``count`` reads only the session row.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from langchain_core.messages import BaseMessage

from chatchain.stores._base import (
    SessionInfo,
    Summary,
    dump_message,
    load_message,
    prefix_end,
    session_times,
)
from chatchain.stores._postgres._connection import _AsyncSide, _Connections
from chatchain.stores._postgres._sql import _utc

__all__ = ["_History", "_insert_args"]


_NO_STOP = 2**62  # "to the end" for the range read


def _load_args(session_id: str, start: int, stop: int | None) -> dict[str, Any]:
    return {"sid": session_id, "start": start, "stop": _NO_STOP if stop is None else stop}


def _insert_args(
    session_id: str, texts: list[str], bumped: tuple[Any, ...] | None
) -> dict[str, Any]:
    """Number the messages after those before them: ``bumped`` is the new message_count."""
    assert bumped is not None  # INSERT ... RETURNING always returns the row
    return {"sid": session_id, "first": int(bumped[0]) - len(texts), "texts": texts}


def _messages(rows: list[Any]) -> list[BaseMessage]:
    return [load_message(text) for (text,) in rows]


def _count(rows: list[Any]) -> int:
    return int(rows[0][0]) if rows else 0


def _summary(rows: list[Any]) -> Summary | None:
    return Summary(rows[0][0], int(rows[0][1])) if rows else None


class _History(_Connections):
    """Transcripts (`HistoryBackend`), session times, summaries (`SummaryBackend`) and
    titles (`TitleBackend`)."""

    # -- messages ----------------------------------------------------------------------------

    def append(self, session_id: str, messages: Sequence[BaseMessage]) -> None:
        if not messages:
            return
        texts = [dump_message(m) for m in messages]  # before any write: all or nothing
        with self._connection() as conn, conn.transaction():
            row = conn.execute(self._sql.bump, {"sid": session_id, "n": len(texts)}).fetchone()
            conn.execute(self._sql.insert, _insert_args(session_id, texts, row))

    async def aappend(self, session_id: str, messages: Sequence[BaseMessage]) -> None:
        if not messages:
            return
        texts = [dump_message(m) for m in messages]
        side = self._async_side()
        await side.call(self._aappend_there(side, session_id, texts))

    async def _aappend_there(self, side: _AsyncSide, session_id: str, texts: list[str]) -> None:
        async with self._aconnection(side) as conn, conn.transaction():
            cursor = await conn.execute(self._sql.bump, {"sid": session_id, "n": len(texts)})
            row = await cursor.fetchone()
            await conn.execute(self._sql.insert, _insert_args(session_id, texts, row))

    def load(self, session_id: str, start: int = 0, stop: int | None = None) -> list[BaseMessage]:
        return _messages(self._fetch(self._sql.load, _load_args(session_id, start, stop)))

    async def aload(
        self, session_id: str, start: int = 0, stop: int | None = None
    ) -> list[BaseMessage]:
        return _messages(await self._afetch(self._sql.load, _load_args(session_id, start, stop)))

    def count(self, session_id: str) -> int:
        return _count(self._fetch(self._sql.count, (session_id,)))

    async def acount(self, session_id: str) -> int:
        return _count(await self._afetch(self._sql.count, (session_id,)))

    # -- sessions ----------------------------------------------------------------------------

    def sessions(self) -> list[str]:
        return [sid for (sid,) in self._fetch(self._sql.sessions)]

    def info(self, session_id: str) -> SessionInfo | None:
        for count, created, updated in self._fetch(self._sql.info, (session_id,)):
            return SessionInfo(session_id, int(count), _utc(created), _utc(updated))
        return None

    def session_infos(self, prefix: str = "", limit: int | None = None) -> list[SessionInfo]:
        high = prefix_end(prefix)
        params: dict[str, Any] = {"low": prefix, "limit": None if limit is None else max(0, limit)}
        if high is None:
            rows = self._fetch(self._sql.session_infos_from, params)
        else:
            rows = self._fetch(self._sql.session_infos, params | {"high": high})
        return [
            SessionInfo(sid, int(count), _utc(created), _utc(updated))
            for sid, count, created, updated in rows
        ]

    def delete(self, session_id: str) -> None:
        self._fetch(self._sql.delete, (session_id,))

    async def adelete(self, session_id: str) -> None:
        await self._afetch(self._sql.delete, (session_id,))

    def prune(self, before: datetime) -> list[str]:
        if before.tzinfo is None:
            before = before.replace(tzinfo=UTC)  # naive means UTC, as utcnow() gives
        return [sid for (sid,) in self._fetch(self._sql.prune, (before,))]

    def replace_session(
        self,
        session_id: str,
        messages: Sequence[BaseMessage],
        summary: Summary | None = None,
        *,
        created_at: datetime | None = None,
        updated_at: datetime | None = None,
    ) -> None:
        texts = [dump_message(m) for m in messages]  # before any write: all or nothing
        created, updated = session_times(created_at, updated_at)
        row = {
            "sid": session_id,
            "created": created,
            "updated": updated,
            "n": len(texts),
            "summary": None if summary is None else summary.text,
            "covers": None if summary is None else summary.covers,
        }
        with self._connection() as conn, conn.transaction():  # one transaction
            conn.execute(self._sql.delete, (session_id,))
            conn.execute(self._sql.replace_row, row)
            if texts:
                conn.execute(self._sql.insert, {"sid": session_id, "first": 0, "texts": texts})

    # -- running summary ---------------------------------------------------------------------

    def get_summary(self, session_id: str) -> Summary | None:
        return _summary(self._fetch(self._sql.get_summary, (session_id,)))

    async def aget_summary(self, session_id: str) -> Summary | None:
        return _summary(await self._afetch(self._sql.get_summary, (session_id,)))

    def set_summary(self, session_id: str, summary: Summary) -> None:
        self._fetch(self._sql.set_summary, (session_id, summary.text, summary.covers))

    async def aset_summary(self, session_id: str, summary: Summary) -> None:
        await self._afetch(self._sql.set_summary, (session_id, summary.text, summary.covers))

    # -- titles -------------------------------------------------------------------------------

    def titles(self, session_ids: Sequence[str]) -> dict[str, str]:
        return dict(self._fetch(self._sql.titles, (list(session_ids),)))

    def set_title(self, session_id: str, title: str | None) -> None:
        if title is None:
            self._fetch(self._sql.drop_title, (session_id,))
        else:
            self._fetch(self._sql.set_title, (session_id, title))
