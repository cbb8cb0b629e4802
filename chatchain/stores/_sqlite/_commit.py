"""The SQLite store's `commit_turn`: a finished turn in one transaction.

A turn is saved by `SQLiteStore.commit_turn` in one ``BEGIN IMMEDIATE`` transaction: its
messages, its usage entry and totals, and the end of its budget hold. The same transaction
first checks that the lease still names the turn (its `Fence`); taking a lease needs the
write lock too, so it cannot change hands in between. A turn paused past its lease whose
session another process took gets only its usage recorded, and `SessionLockLostError`.
"""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.messages import BaseMessage

from chatchain.stores._base import Fence, dump_message, lock_lost
from chatchain.stores._sqlite._connection import _Connections
from chatchain.stores._sqlite._history import _append
from chatchain.stores._sqlite._ledger import _record
from chatchain.usage import UsageEntry

__all__ = ["_Commit"]


class _Commit(_Connections):
    """A turn's messages, usage entry and the end of its budget hold, in one transaction
    fenced by the session's lease (`HistoryStore.commit_turn`)."""

    def commit_turn(
        self,
        session_id: str,
        messages: Sequence[BaseMessage],
        entry: UsageEntry | None = None,
        *,
        release: str | None = None,
        fence: Fence | None = None,
    ) -> None:
        texts = [dump_message(m) for m in messages]  # before any write: all or nothing
        with self._write("save a turn") as conn:
            # Under the write lock, which taking a lease needs too: the lease cannot change
            # hands between this check and the commit.
            owned = fence is None or (
                conn.execute(
                    "SELECT 1 FROM locks WHERE session_id = ? AND owner = ?",
                    (fence.session_id, fence.token),
                ).fetchone()
                is not None
            )
            fresh = True  # a turn whose entry is in the ledger was saved before (a replay)
            if entry is not None:
                fresh = _record(conn, entry, release)
            elif release is not None:
                conn.execute("DELETE FROM budget_holds WHERE id = ?", (release,))
            if owned and texts and fresh:
                _append(conn, session_id, texts)
        if not owned:
            raise lock_lost(session_id, messages)
