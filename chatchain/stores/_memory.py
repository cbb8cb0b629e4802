"""The in-memory store: a dict of `ChatMessageHistory`, one per session id."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from datetime import datetime

from langchain_core.messages import BaseMessage

from chatchain._locks import SessionLocks
from chatchain._memory_history import SessionHistory
from chatchain.stores._base import HistoryStore, SessionInfo, Summary, utcnow

__all__ = ["MemoryStore"]


class MemoryStore(HistoryStore):
    """Sessions in this process's memory; gone when it exits. The design's default.

    Example:
        >>> store = MemoryStore()
        >>> store("dp123").add_user_message("hi")
        >>> store.sessions(), store.count("dp123")
        (['dp123'], 1)
    """

    def __init__(self, *, lock_timeout: float = 120.0) -> None:
        self._histories: dict[str, SessionHistory] = {}
        self._created: dict[str, datetime] = {}
        self._updated: dict[str, datetime] = {}
        self._summaries: dict[str, Summary] = {}
        self._guard = threading.RLock()
        self._locks = SessionLocks(lock_timeout)

    def __call__(self, session_id: str) -> SessionHistory:
        """The session's `ChatMessageHistory` (the same object on every call)."""
        history = self._histories.get(session_id)
        if history is None:
            with self._guard:
                history = self._histories.setdefault(session_id, SessionHistory())
        return history

    def append(self, session_id: str, messages: Sequence[BaseMessage]) -> None:
        with self._guard:
            self(session_id).add_messages(messages)
            now = utcnow()
            self._created.setdefault(session_id, now)
            self._updated[session_id] = now

    def load(self, session_id: str, start: int = 0, stop: int | None = None) -> list[BaseMessage]:
        history = self._histories.get(session_id)
        return [] if history is None else history.messages[start:stop]

    def count(self, session_id: str) -> int:
        history = self._histories.get(session_id)
        return 0 if history is None else len(history.messages)

    def sessions(self) -> list[str]:
        with self._guard:
            live = [sid for sid, history in self._histories.items() if history.messages]
            return sorted(live, key=lambda sid: self._created.get(sid, utcnow()))

    def info(self, session_id: str) -> SessionInfo | None:
        with self._guard:
            count = self.count(session_id)
            if not count:
                return None
            now = utcnow()
            created = self._created.get(session_id, now)
            return SessionInfo(session_id, count, created, self._updated.get(session_id, created))

    def delete(self, session_id: str) -> None:
        with self._guard:
            for table in (self._histories, self._created, self._updated, self._summaries):
                table.pop(session_id, None)

    def prune(self, before: datetime) -> list[str]:
        with self._guard:
            old = [sid for sid in self.sessions() if self._updated.get(sid, before) < before]
            for session_id in old:
                self.delete(session_id)
            return old

    def get_summary(self, session_id: str) -> Summary | None:
        return self._summaries.get(session_id)

    def set_summary(self, session_id: str, summary: Summary) -> None:
        with self._guard:
            self._summaries[session_id] = summary

    def lock(self, session_id: str) -> AbstractContextManager[None]:
        return self._locks.hold(session_id)

    def alock(self, session_id: str) -> AbstractAsyncContextManager[None]:
        return self._locks.ahold(session_id)

    # In memory there is nothing to wait for: no thread hop for the async twins.
    async def aappend(self, session_id: str, messages: Sequence[BaseMessage]) -> None:
        self.append(session_id, messages)

    async def aload(
        self, session_id: str, start: int = 0, stop: int | None = None
    ) -> list[BaseMessage]:
        return self.load(session_id, start, stop)

    async def acount(self, session_id: str) -> int:
        return self.count(session_id)

    async def adelete(self, session_id: str) -> None:
        self.delete(session_id)

    async def aget_summary(self, session_id: str) -> Summary | None:
        return self.get_summary(session_id)

    async def aset_summary(self, session_id: str, summary: Summary) -> None:
        self.set_summary(session_id, summary)
