"""A full `HistoryStore` from a store that implements only part of the contract.

A third-party store may implement only `HistoryBackend` (append, windowed load, count,
sessions, delete). `as_store` completes it with what this process can provide itself:

- the ledger is a `MemoryLedger`: usage and budget holds are lost when the process exits,
  and a budget counts this process's turns only (a store with a ledger of its own
  implements `HistoryStore`);
- the summary and the lock come from the backend when it implements `SummaryBackend` or
  `LockBackend`, else from this process: summaries are lost when it exits, and the lock
  serialises the turns of this process only (two processes on one backend can interleave
  their turns);
- session times (`HistoryStore.info`, `HistoryStore.prune`) are this process's view: when
  it first saw a session and when it last wrote it;
- `HistoryStore.commit_turn` records the usage, then appends the messages (two writes, not
  one), and cannot check the lock's fence.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from datetime import UTC, datetime

from langchain_core.messages import BaseMessage

from chatchain.stores._base import (
    Fence,
    HistoryBackend,
    HistoryStore,
    LockBackend,
    SessionInfo,
    Summary,
    SummaryBackend,
    session_times,
    utcnow,
)
from chatchain.stores._memory import MemoryLedger, MemoryStore

__all__ = ["ComposedStore", "as_store"]

_LONG_AGO = datetime.min.replace(tzinfo=UTC)


def as_store(backend: HistoryBackend, *, lock_timeout: float = 120.0) -> HistoryStore:
    """``backend`` as a full `HistoryStore`: itself if it is one, else completed in memory.

    Args:
        backend: A store implementing at least `HistoryBackend`.
        lock_timeout: How long a turn waits for its session's in-process lock, in seconds
            (used only when ``backend`` has no lock of its own).

    Example:
        >>> from chatchain.stores import MemoryStore
        >>> store = MemoryStore()
        >>> as_store(store) is store
        True
    """
    if isinstance(backend, HistoryStore):
        return backend
    return ComposedStore(backend, lock_timeout=lock_timeout)


class ComposedStore(MemoryLedger, HistoryStore):
    """A `HistoryBackend` with the parts it lacks kept in this process (see the module)."""

    def __init__(self, backend: HistoryBackend, *, lock_timeout: float = 120.0) -> None:
        super().__init__()  # the ledger
        local = MemoryStore(lock_timeout=lock_timeout)  # the summaries and the lock, if need be
        self.backend = backend
        self._local = local
        self._summaries: SummaryBackend = backend if isinstance(backend, SummaryBackend) else local
        self._locks: LockBackend = backend if isinstance(backend, LockBackend) else local
        self._times: dict[str, tuple[datetime, datetime]] = {}  # session: (created, updated)

    def _touch(self, session_id: str, created: datetime, updated: datetime) -> None:
        with self._guard:
            self._times[session_id] = (self._times.get(session_id, (created,))[0], updated)

    # -- history: the backend's ------------------------------------------------------------

    def append(self, session_id: str, messages: Sequence[BaseMessage]) -> None:
        self.backend.append(session_id, messages)
        now = utcnow()
        self._touch(session_id, now, now)

    async def aappend(self, session_id: str, messages: Sequence[BaseMessage]) -> None:
        await self.backend.aappend(session_id, messages)
        now = utcnow()
        self._touch(session_id, now, now)

    def load(self, session_id: str, start: int = 0, stop: int | None = None) -> list[BaseMessage]:
        return self.backend.load(session_id, start, stop)

    async def aload(
        self, session_id: str, start: int = 0, stop: int | None = None
    ) -> list[BaseMessage]:
        return await self.backend.aload(session_id, start, stop)

    def count(self, session_id: str) -> int:
        return self.backend.count(session_id)

    async def acount(self, session_id: str) -> int:
        return await self.backend.acount(session_id)

    def sessions(self) -> list[str]:
        # The backend's order, except that what this process knows the creation time of
        # (what it wrote, or imported with its times) goes by that time.
        with self._guard:
            times = dict(self._times)
        return sorted(self.backend.sessions(), key=lambda sid: times.get(sid, (_LONG_AGO,))[0])

    def delete(self, session_id: str) -> None:
        self.backend.delete(session_id)
        self._local.delete(session_id)  # the summary, when it is kept here
        with self._guard:
            self._times.pop(session_id, None)

    # -- session times: this process's view ------------------------------------------------

    def info(self, session_id: str) -> SessionInfo | None:
        count = self.count(session_id)
        if not count:
            return None
        now = utcnow()
        with self._guard:
            created, updated = self._times.setdefault(session_id, (now, now))
        return SessionInfo(session_id, count, created, updated)

    def prune(self, before: datetime) -> list[str]:
        old = [sid for sid in self.sessions() if (i := self.info(sid)) and i.updated_at < before]
        for session_id in old:
            self.delete(session_id)
        return old

    def replace_session(
        self,
        session_id: str,
        messages: Sequence[BaseMessage],
        summary: Summary | None = None,
        *,
        created_at: datetime | None = None,
        updated_at: datetime | None = None,
    ) -> None:
        super().replace_session(session_id, messages, summary)
        created, updated = session_times(created_at, updated_at)
        with self._guard:
            self._times[session_id] = (created, updated)

    # -- summary and lock: the backend's if it has them, else this process's -------------

    def get_summary(self, session_id: str) -> Summary | None:
        return self._summaries.get_summary(session_id)

    def set_summary(self, session_id: str, summary: Summary) -> None:
        self._summaries.set_summary(session_id, summary)

    def lock(self, session_id: str) -> AbstractContextManager[Fence | None]:
        return self._locks.lock(session_id)

    def alock(self, session_id: str) -> AbstractAsyncContextManager[Fence | None]:
        return self._locks.alock(session_id)

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if callable(close):
            close()
