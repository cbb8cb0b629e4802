"""One session's messages in memory (LangChain's `ChatMessageHistory`), behind this module only.

`InMemoryChatMessageHistory` (community's `ChatMessageHistory` is the same class) is
deprecated in langchain-core 1.x. langchain-core warns only when that exact class is
instantiated, so a subclass carries the behaviour without showing users a warning they
cannot act on. When a later engine replaces it, only this module changes.
"""

from __future__ import annotations

from langchain_core.chat_history import InMemoryChatMessageHistory

__all__ = ["SessionHistory"]


class SessionHistory(InMemoryChatMessageHistory):
    """One session's messages in memory: a `ChatMessageHistory`, without the warning."""
