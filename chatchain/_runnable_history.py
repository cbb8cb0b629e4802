"""`RunnableWithMessageHistory`, kept behind this one module.

langchain-core 1.x deprecates it (removal announced for 2.0) and warns on every construction.
chatchain keeps the shape the user asked for, so the warning is filtered here, narrowly, while
the base class is built; a later engine can replace this module without touching the API.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from langchain_core._api import LangChainDeprecationWarning
from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.runnables import Runnable
from langchain_core.runnables.history import RunnableWithMessageHistory

__all__ = ["HistoryRunnable"]


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
                runnable,
                get_session_history,
                input_messages_key=input_messages_key,
                history_messages_key=history_messages_key,
            )
