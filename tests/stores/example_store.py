"""A third-party history store in under 60 lines: `HistoryBackend` only, on sqlite3."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence

from langchain_core.messages import BaseMessage

from chatchain.stores import HistoryBackend, dump_message, load_message


class TinyStore(HistoryBackend):
    """Transcripts in one SQLite file; chatchain keeps the rest in this process."""

    def __init__(self, path: str = ":memory:") -> None:
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS messages"
            " (id INTEGER PRIMARY KEY, session TEXT NOT NULL, body TEXT NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS by_session ON messages (session, id)")
        self._guard = threading.Lock()  # one connection, shared by the threads

    def append(self, session_id: str, messages: Sequence[BaseMessage]) -> None:
        rows = [(session_id, dump_message(m)) for m in messages]
        with self._guard, self._db:  # one transaction: all or none
            self._db.executemany("INSERT INTO messages (session, body) VALUES (?, ?)", rows)

    def load(self, session_id: str, start: int = 0, stop: int | None = None) -> list[BaseMessage]:
        first, end, _ = slice(start, stop).indices(self.count(session_id))
        with self._guard:  # read only the window asked for
            rows = self._db.execute(
                "SELECT body FROM messages WHERE session = ? ORDER BY id LIMIT ? OFFSET ?",
                (session_id, max(0, end - first), first),
            ).fetchall()
        return [load_message(body) for (body,) in rows]

    def count(self, session_id: str) -> int:
        with self._guard:
            sql = "SELECT count(*) FROM messages WHERE session = ?"
            return int(self._db.execute(sql, (session_id,)).fetchone()[0])

    def sessions(self) -> list[str]:
        with self._guard:
            sql = "SELECT session FROM messages GROUP BY session ORDER BY min(id)"
            return [session for (session,) in self._db.execute(sql)]

    def delete(self, session_id: str) -> None:
        with self._guard, self._db:
            self._db.execute("DELETE FROM messages WHERE session = ?", (session_id,))

    def close(self) -> None:
        self._db.close()
