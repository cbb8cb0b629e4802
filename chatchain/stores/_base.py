"""The storage contract every history store meets."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractAsyncContextManager, AbstractContextManager

from langchain_core.chat_history import BaseChatMessageHistory

__all__ = ["HistoryStore"]


class HistoryStore(ABC):
    """Where sessions live: a message history per session id, and one writer per session.

    A store is itself a ``get_session_history`` callable, so it can be handed straight to
    `RunnableWithMessageHistory` or `create_chat_chain`.
    """

    @abstractmethod
    def __call__(self, session_id: str) -> BaseChatMessageHistory:
        """The history of ``session_id``, created empty on first use."""

    @abstractmethod
    def sessions(self) -> list[str]:
        """The ids of the sessions that hold messages, oldest first."""

    @abstractmethod
    def delete(self, session_id: str) -> None:
        """Forget a session and its messages; an unknown id is not an error."""

    @abstractmethod
    def lock(self, session_id: str) -> AbstractContextManager[None]:
        """Hold the session for one turn (threads).

        Raises:
            SessionBusyError: Another turn kept it past the lock timeout.
        """

    @abstractmethod
    def alock(self, session_id: str) -> AbstractAsyncContextManager[None]:
        """Hold the session for one turn (asyncio tasks).

        Raises:
            SessionBusyError: Another turn kept it past the lock timeout.
        """
