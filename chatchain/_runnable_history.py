"""`RunnableWithMessageHistory`, kept behind this one module.

langchain-core 1.x deprecates it (removal announced for 2.0) and warns on every construction.
chatchain keeps the shape the user asked for, so the warning is filtered here, narrowly, while
the base class is built; a later engine can replace this module without touching the API.
It loads the history into the prompt; saving is chatchain's (see `chatchain.chain`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from langchain_core._api import LangChainDeprecationWarning
from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.runnables import Runnable, RunnableBinding
from langchain_core.runnables.history import RunnableWithMessageHistory

__all__ = ["HistoryRunnable"]


class _WithoutListeners(RunnableBinding[Any, Any]):
    """The inner runnable, refusing the save-on-end listener `RunnableWithMessageHistory` adds.

    chatchain saves each turn itself (so that failed and interrupted turns follow one path);
    the listener's tracer would only build run records for every step of every turn, which
    costs about a tenth of a loopback turn.
    """

    def with_listeners(self, **listeners: Any) -> Runnable[Any, Any]:
        return self

    def with_alisteners(self, **listeners: Any) -> Runnable[Any, Any]:
        return self


class HistoryRunnable(RunnableWithMessageHistory):
    """`RunnableWithMessageHistory` without the deprecation warning users cannot act on."""

    def __init__(
        self,
        runnable: Runnable[Any, Any],
        get_session_history: Callable[[str], BaseChatMessageHistory],
        *,
        input_messages_key: str | None,
        history_messages_key: str | None,
    ) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message="RunnableWithMessageHistory is deprecated",
                category=LangChainDeprecationWarning,
            )
            super().__init__(
                _WithoutListeners(bound=runnable),
                get_session_history,
                input_messages_key=input_messages_key,
                history_messages_key=history_messages_key,
            )
