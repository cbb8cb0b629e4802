"""The in-memory store: a dict of `ChatMessageHistory`, one per session id."""

from __future__ import annotations

import threading
from contextlib import AbstractAsyncContextManager, AbstractContextManager

from chatchain._locks import SessionLocks
from chatchain._memory_history import SessionHistory
from chatchain.stores._base import HistoryStore

__all__ = ["MemoryStore"]


class MemoryStore(HistoryStore):
    """Sessions in this process's memory; gone when it exits.

    Example:
        >>> store = MemoryStore()
        >>> store("dp123").add_user_message("hi")
        >>> store.sessions()
        ['dp123']
    """

    def __init__(self, *, lock_timeout: float = 120.0) -> None:
        self._histories: dict[str, SessionHistory] = {}
        self._guard = threading.Lock()
        self._locks = SessionLocks(lock_timeout)

    def __call__(self, session_id: str) -> SessionHistory:
        history = self._histories.get(session_id)
        if history is None:
            with self._guard:
                history = self._histories.setdefault(session_id, SessionHistory())
        return history

    def sessions(self) -> list[str]:
        with self._guard:
            return [sid for sid, history in self._histories.items() if history.messages]

    def delete(self, session_id: str) -> None:
        with self._guard:
            self._histories.pop(session_id, None)

    def lock(self, session_id: str) -> AbstractContextManager[None]:
        return self._locks.hold(session_id)

    def alock(self, session_id: str) -> AbstractAsyncContextManager[None]:
        return self._locks.ahold(session_id)
