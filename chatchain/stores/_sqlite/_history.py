"""The SQLite store's transcripts: messages, sessions, running summaries and titles."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from langchain_core.messages import BaseMessage

from chatchain.stores._base import (
    SessionInfo,
    Summary,
    dump_message,
    load_message,
    prefix_end,
    session_times,
    utcnow,
)
from chatchain.stores._sqlite._connection import _Connections, _stamp

if TYPE_CHECKING:
    import sqlite3


__all__ = ["_History", "_append", "_session_infos_sql"]


# Upper bound for a slice's stop when none is given (seq never comes near it).
_NO_END = 2**62


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


class _History(_Connections):
    """Transcripts (`HistoryBackend`), session times, summaries (`SummaryBackend`) and
    titles (`TitleBackend`)."""

    def append(self, session_id: str, messages: Sequence[BaseMessage]) -> None:
        if not messages:
            return
        texts = [dump_message(m) for m in messages]
        with self._write("append messages") as conn:
            _append(conn, session_id, texts)

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
