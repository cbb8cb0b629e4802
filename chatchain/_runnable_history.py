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
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_core.runnables.history import RunnableWithMessageHistory
from pydantic import PrivateAttr

__all__ = ["HistoryRunnable"]


class HistoryRunnable(RunnableWithMessageHistory):
    """`RunnableWithMessageHistory` without the deprecation warning users cannot act on, and
    with the history loaded in the caller's thread, and saved by chatchain only.

    LangChain's base class builds ``RunnablePassthrough.assign(history=load) | pick``, where
    ``pick`` returns the runnable with a save-on-end listener. Both are replaced here by
    ``insert_history | runnable``:

    - ``assign`` runs its one step through a parallel map, which starts a new thread for it on
      every sync call (a thread start and a switch, in each turn); ``insert_history`` loads
      the history where it is called (sync or async) and adds it to the input, as ``assign``
      does.
    - chatchain saves each turn itself (so that failed and interrupted turns follow one path);
      the listener's tracer would only build run records for every step of every turn, which
      costs about a tenth of a loopback turn. ``pick`` itself streamed every chunk through
      one more run, which adds the chunks up as they pass.
    """

    _history_key: str = PrivateAttr(default="")

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
        key = history_messages_key or input_messages_key
        history: Runnable[Any, Any]
        if key is None:  # the input is the messages: the base class's load step, no listener
            history = RunnableLambda(self._enter_history, self._aenter_history)
            history = history.with_config(run_name="load_history")
        else:
            self._history_key = key
            history = RunnableLambda(self._insert_history, self._ainsert_history)
            history = history.with_config(run_name="insert_history")
        self._history_chain = history
        self.bound = (history | runnable).with_config(run_name="RunnableWithMessageHistory")

    # Methods, not closures: a closure over this runnable would be listed among its own
    # dependencies by `RunnableLambda.deps` (and `config_specs` would recurse).
    def _insert_history(self, value: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        return {**value, self._history_key: self._enter_history(value, config)}

    async def _ainsert_history(
        self, value: dict[str, Any], config: RunnableConfig
    ) -> dict[str, Any]:
        return {**value, self._history_key: await self._aenter_history(value, config)}
