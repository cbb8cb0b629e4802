"""Bounded prompts: a sliding window by turns and tokens, and a running summary of older turns.

The full transcript always stays in the store; this module only decides what is *sent*:

    system message + [summary of older turns] + the newest turns that fit + the new input

The window keeps the last ``max_turns`` exchanges, then drops the oldest of those until the
history and the input fit ``max_tokens`` (LangChain's `trim_messages`), never starting on an
orphan AI or tool message. With ``summarize`` on, once the turns beyond the window pile up,
the oldest of them are folded into the session's running summary by the model (a metered
call), incrementally: the old summary plus the new turns, never the whole transcript again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import (
    BaseMessage,
    HumanMessage,
    SystemMessage,
    get_buffer_string,
    trim_messages,
)
from langchain_core.runnables import Runnable, RunnableConfig

from chatchain import _metering
from chatchain._tokens import TokenCounter
from chatchain.errors import ConfigurationError, InvalidInputError
from chatchain.stores import HistoryStore, Summary

__all__ = ["HistoryWindow"]

logger = logging.getLogger("chatchain")

SUMMARY_INSTRUCTIONS = (
    "You maintain a running summary of a conversation between a user and an assistant. "
    "Extend the existing summary with the new lines so that it keeps every fact, name, "
    "preference, decision and open question the user may rely on later. Write plain prose, "
    "at most 200 words, and reply with the summary only."
)
SUMMARY_REQUEST_MARK = "[chatchain summary request]"
SUMMARY_HEADER = "Summary of the earlier conversation:\n"


@dataclass(frozen=True)
class HistoryWindow:
    """What of a session's history goes into the prompt.

    Attributes:
        max_turns: Keep at most this many of the newest exchanges (user + reply).
        max_tokens: Token budget for the history plus the new input (the system message
            and the summary come on top); the oldest turns in the window go first.
        summarize: Fold turns that leave the window into a running summary.

    Example:
        >>> HistoryWindow(max_turns=6, max_tokens=3000).max_messages
        12
    """

    max_turns: int | None = 6
    max_tokens: int | None = 3000
    summarize: bool = True

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigurationError(f"HistoryWindow.{name} must be at least 1 or None.")
        if self.summarize and self.max_turns is None:
            raise ConfigurationError(
                "A running summary needs max_turns (CHATCHAIN_WINDOW_TURNS): the summary "
                "covers the turns that leave that window."
            )

    @property
    def max_messages(self) -> int | None:
        return None if self.max_turns is None else 2 * self.max_turns

    @property
    def summary_batch(self) -> int:
        """Messages that may pile up beyond the window before they are summarised."""
        return max(2, (self.max_messages or 0) // 2 // 2 * 2)

    @property
    def limit(self) -> int | None:
        """The most messages the prompt holds: the window, plus those awaiting a summary."""
        if self.max_messages is None:
            return None
        return self.max_messages + (self.summary_batch if self.summarize else 0)

    def tightened(self) -> HistoryWindow:
        """Half the window, for a retry after 'context length exceeded'."""
        return HistoryWindow(
            max_turns=None if self.max_turns is None else max(1, self.max_turns // 2),
            max_tokens=None if self.max_tokens is None else max(1, self.max_tokens // 2),
            summarize=self.summarize,
        )


def _summary_request(previous: str | None, messages: Sequence[BaseMessage]) -> list[BaseMessage]:
    lines = get_buffer_string(list(messages))
    return [
        SystemMessage(SUMMARY_INSTRUCTIONS),
        HumanMessage(
            f"{SUMMARY_REQUEST_MARK}\nExisting summary:\n{previous or '(none yet)'}\n\n"
            f"New lines of conversation:\n{lines}\n\nThe extended summary:"
        ),
    ]


def _drop_orphans(messages: list[BaseMessage]) -> list[BaseMessage]:
    # A window must open on the user's turn: a leading reply or tool result has lost its question.
    start = next((i for i, m in enumerate(messages) if m.type == "human"), len(messages))
    return messages[start:]


@dataclass
class Memory:
    """One chain's memory policy at work: window selection and summaries for its store."""

    window: HistoryWindow | None
    counter: TokenCounter
    model: Runnable[Any, Any]

    def _summary_due(self, count: int, summary: Summary | None) -> int | None:
        """How many leading messages the summary should cover now, or None."""
        window = self.window
        if window is None or not window.summarize or window.max_messages is None:
            return None
        covered = summary.covers if summary else 0
        if count - covered <= window.max_messages + window.summary_batch:
            return None
        return count - window.max_messages

    def _summary_start(self, summary: Summary | None, upto: int) -> int:
        # A summary folds in at most a few windows' worth at a time: a session imported or
        # written without summaries may have a huge backlog, which must not be loaded or sent
        # in one request. Older turns stay in storage; the summary starts from what it can see.
        covered = summary.covers if summary else 0
        most = 4 * (self.window.max_messages or 0) if self.window else 0
        return max(covered, upto - most) if most else covered

    def _summary_plan(self, count: int, summary: Summary | None) -> tuple[int, int] | None:
        upto = self._summary_due(count, summary)
        if upto is None:
            return None
        return self._summary_start(summary, upto), upto

    def summarize(
        self,
        store: HistoryStore,
        session_id: str,
        before_send: Callable[[list[BaseMessage]], None] | None = None,
    ) -> SummaryCall | None:
        """Fold the turns beyond the window into the summary if enough have piled up.

        ``before_send`` sees the request first (a budget check may refuse it by raising).
        Returns the call's handler and latency, or ``None`` when no summary was due.
        """
        summary = store.get_summary(session_id)
        plan = self._summary_plan(store.count(session_id), summary)
        if plan is None:
            return None
        start, upto = plan
        request = _summary_request(
            summary.text if summary else None, store.load(session_id, start, upto)
        )
        if before_send is not None:
            before_send(request)
        handler, started = _metering.new_handler(), time.perf_counter()
        reply = self.model.invoke(request, RunnableConfig(callbacks=[handler], run_name="summary"))
        latency = time.perf_counter() - started
        store.set_summary(session_id, Summary(_text(reply), covers=upto))
        return SummaryCall(handler, latency, _model_name(self.model))

    async def asummarize(
        self,
        store: HistoryStore,
        session_id: str,
        before_send: Callable[[list[BaseMessage]], Awaitable[None]] | None = None,
    ) -> SummaryCall | None:
        """`summarize` for async callers."""
        summary = await store.aget_summary(session_id)
        plan = self._summary_plan(await store.acount(session_id), summary)
        if plan is None:
            return None
        start, upto = plan
        older = await store.aload(session_id, start, upto)
        request = _summary_request(summary.text if summary else None, older)
        if before_send is not None:
            await before_send(request)
        handler, started = _metering.new_handler(), time.perf_counter()
        reply = await self.model.ainvoke(
            request, RunnableConfig(callbacks=[handler], run_name="summary")
        )
        latency = time.perf_counter() - started
        await store.aset_summary(session_id, Summary(_text(reply), covers=upto))
        return SummaryCall(handler, latency, _model_name(self.model))

    def _start(self, count: int, summary: Summary | None, window: HistoryWindow) -> int:
        """Index of the first message to load for the prompt."""
        covered = summary.covers if summary and window.summarize else 0
        if window.limit is None:
            return covered
        return max(covered, count - window.limit)

    def select(
        self,
        messages: list[BaseMessage],
        summary: Summary | None,
        inputs: Sequence[BaseMessage],
        window: HistoryWindow,
    ) -> list[BaseMessage]:
        """The history to send: summary message, then the newest messages that fit."""
        if window.limit is not None:
            messages = messages[-window.limit :]
        messages = _drop_orphans(messages)
        head: list[BaseMessage] = []
        if summary is not None and window.summarize:
            head = [SystemMessage(SUMMARY_HEADER + summary.text)]
        if window.max_tokens is not None:
            needed = self.counter(list(inputs))
            if needed > window.max_tokens:
                raise InvalidInputError(
                    f"The message is about {needed} tokens ({self.counter.name} count); the "
                    f"limit for one turn is {window.max_tokens} (CHATCHAIN_WINDOW_TOKENS). "
                    "Shorten it, or raise the limit."
                )
            budget = window.max_tokens - needed
            messages = trim_messages(
                messages,
                max_tokens=budget,
                token_counter=self.counter.count,
                strategy="last",
                start_on="human",
                allow_partial=False,
            )
        return head + messages

    def load(
        self, store: HistoryStore, session_id: str, inputs: Sequence[BaseMessage], tight: bool
    ) -> list[BaseMessage]:
        """Read the window from the store (only what it needs) and select the history."""
        window = self._effective(tight)
        if window is None:
            return store.load(session_id)
        summary = store.get_summary(session_id) if window.summarize else None
        start = self._start(store.count(session_id), summary, window)
        return self.select(store.load(session_id, start), summary, inputs, window)

    async def aload(
        self, store: HistoryStore, session_id: str, inputs: Sequence[BaseMessage], tight: bool
    ) -> list[BaseMessage]:
        """`load` for async callers."""
        window = self._effective(tight)
        if window is None:
            return await store.aload(session_id)
        summary = await store.aget_summary(session_id) if window.summarize else None
        start = self._start(await store.acount(session_id), summary, window)
        return self.select(await store.aload(session_id, start), summary, inputs, window)

    def _effective(self, tight: bool) -> HistoryWindow | None:
        if self.window is None:
            return None
        return self.window.tightened() if tight else self.window


@dataclass(frozen=True)
class SummaryCall:
    """A summary call that was made: its usage handler, latency and model."""

    handler: Any
    latency_s: float
    model: str | None


def _text(reply: Any) -> str:
    return str(reply.content if hasattr(reply, "content") else reply).strip()


def _model_name(model: Runnable[Any, Any]) -> str | None:
    model = getattr(model, "runnable", model)
    name = getattr(model, "model_name", None)
    return name if isinstance(name, str) else None
