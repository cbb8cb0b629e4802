"""The SQLite store's write-ahead records of turns in flight (`chatchain._pending`): one
row of ``pending_turns`` per session."""

from __future__ import annotations

from chatchain.stores._sqlite._connection import _Connections

__all__ = ["_Pending"]


class _Pending(_Connections):
    """The write-ahead records of `HistoryStore.write_pending` and its kin."""

    def write_pending(self, session_id: str, token: str, record: str) -> bool:
        with self._write("keep a turn in flight") as conn:
            return (
                conn.execute(
                    """
                    INSERT INTO pending_turns (session_id, token, record) VALUES (?, ?, ?)
                    ON CONFLICT (session_id) DO UPDATE SET record = excluded.record
                    WHERE pending_turns.token = excluded.token
                    """,
                    (session_id, token, record),
                ).rowcount
                == 1
            )

    def read_pending(self, session_id: str) -> tuple[str, str] | None:
        with self._connection("read a turn in flight") as conn:
            row = conn.execute(
                "SELECT token, record FROM pending_turns WHERE session_id = ?", (session_id,)
            ).fetchone()
        return None if row is None else (row[0], row[1])

    def drop_pending(self, session_id: str, token: str) -> bool:
        with self._write("end a turn in flight") as conn:
            return (
                conn.execute(
                    "DELETE FROM pending_turns WHERE session_id = ? AND token = ?",
                    (session_id, token),
                ).rowcount
                == 1
            )

    def pending_sessions(self) -> list[str]:
        with self._connection("list turns in flight") as conn:
            rows = conn.execute("SELECT session_id FROM pending_turns ORDER BY session_id")
            return [session_id for (session_id,) in rows.fetchall()]
