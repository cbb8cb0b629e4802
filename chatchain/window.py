"""Bounded prompts: a sliding window by turns and tokens, and a running summary of older turns.

The full transcript always stays in the store; this module only decides what is *sent*:

    system message + [summary of older turns] + the newest turns that fit + the new input

The window keeps the last ``max_turns`` exchanges, then drops the oldest of those until the
history and the input fit ``max_tokens`` (LangChain's `trim_messages`), never starting on an
orphan AI or tool message. With ``summarize`` on, once the turns beyond the window pile up,
the oldest of them are folded into the session's running summary by the model (a metered
call), incrementally: the old summary plus the new turns, never the whole transcript again.

A tool exchange (the AI message that calls tools, and the tool results) is part of its turn:
the window opens on a user message, and never sends an AI message whose calls lost their
results or a result without its call (`whole_exchanges`: the endpoint refuses both); the
summary covers whole turns. The messages of a tool exchange count towards the window's
``2 * max_turns`` messages, so tool-heavy turns leave fewer of them in the window. A client's
tool exchange spans two turns (see `chatchain._options`): a turn whose input is the results
of the last message's calls is sent that message and its results together, always.

The summary has a budget of its own (``summary_tokens``): the summary call asks for a summary
that fits and is capped with ``max_tokens``, and a summary that is longer all the same (a
verbose model, an echo, one stored before the budget existed) is cut at the last sentence
that fits, both when it is stored and when it is sent. So a turn's prompt is at most

    system message + summary_tokens + max_tokens (the history and the input)

tokens (`HistoryWindow.prompt_limit`); an input that alone is over ``max_tokens`` is refused.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    get_buffer_string,
    trim_messages,
)
from langchain_core.runnables import Runnable, RunnableConfig

from chatchain import _metering
from chatchain._flow import Effect, Flow, arun, call, run
from chatchain._options import pending_calls
from chatchain._tokens import TokenCounter
from chatchain.errors import ConfigurationError, InvalidInputError
from chatchain.stores import HistoryStore, Summary

__all__ = ["HistoryWindow", "halved", "unwindowed", "whole_exchanges"]

logger = logging.getLogger("chatchain")

SUMMARY_INSTRUCTIONS = (
    "You maintain a running summary of a conversation between a user and an assistant. "
    "Extend the existing summary with the new lines so that it keeps every fact, name, "
    "preference, decision and open question the user may rely on later. Write plain prose, "
    "at most {words} words, and reply with the summary only."
)
SUMMARY_WORDS = 200
"""The summary's length in words when it has no token budget."""
SUMMARY_REQUEST_MARK = "[chatchain summary request]"
SUMMARY_HEADER = "Summary of the earlier conversation:\n"


@dataclass(frozen=True)
class HistoryWindow:
    """What of a session's history goes into the prompt.

    A turn's prompt is at most ``system message + summary_tokens + max_tokens`` tokens (see
    `prompt_limit`): the history and the input share ``max_tokens``, an input that alone is
    over it is refused (`InvalidInputError`, naming ``CHATCHAIN_WINDOW_TOKENS``), and the
    summary message is cut to ``summary_tokens``. The endpoint's context must also hold the
    reply (``CHATCHAIN_MAX_TOKENS``).

    Attributes:
        max_turns: Keep at most this many of the newest exchanges (user + reply).
        max_tokens: Token budget for the history plus the new input (the system message
            and the summary come on top); the oldest turns in the window go first.
        summarize: Fold turns that leave the window into a running summary.
        summary_tokens: Token budget of the summary message (header included); a longer
            summary is cut at the last sentence that fits. ``None``: no budget, the summary
            may grow with the conversation.

    Example:
        >>> HistoryWindow(max_turns=6, max_tokens=3000).max_messages
        12
        >>> HistoryWindow(max_turns=6, max_tokens=3000, summary_tokens=500).prompt_limit(40)
        3540
    """

    max_turns: int | None = 6
    max_tokens: int | None = 3000
    summarize: bool = True
    summary_tokens: int | None = 500

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_tokens", "summary_tokens"):
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

    @property
    def summary_words(self) -> int:
        """The summary's length in words that the summary call asks for."""
        if self.summary_tokens is None:
            return SUMMARY_WORDS
        # About 0.75 words a token; 0.4 leaves room for the header and a model that overshoots.
        return max(1, self.summary_tokens * 2 // 5)

    def prompt_limit(self, system_tokens: int) -> int | None:
        """The most tokens a turn's prompt can take, given its system message's tokens.

        ``system_tokens + summary_tokens + max_tokens`` (the summary only when ``summarize``
        is on); ``None`` when ``max_tokens`` or a needed ``summary_tokens`` is ``None``.
        """
        if self.max_tokens is None:
            return None
        if not self.summarize:
            return system_tokens + self.max_tokens
        if self.summary_tokens is None:
            return None
        return system_tokens + self.summary_tokens + self.max_tokens


def _summary_request(
    previous: str | None, messages: Sequence[BaseMessage], words: int = SUMMARY_WORDS
) -> list[BaseMessage]:
    lines = get_buffer_string(list(messages))
    return [
        SystemMessage(SUMMARY_INSTRUCTIONS.format(words=words)),
        HumanMessage(
            f"{SUMMARY_REQUEST_MARK}\nExisting summary:\n{previous or '(none yet)'}\n\n"
            f"New lines of conversation:\n{lines}\n\nThe extended summary:"
        ),
    ]


def summary_message(text: str) -> SystemMessage:
    """The message that carries the running summary in a turn's prompt."""
    return SystemMessage(SUMMARY_HEADER + text)


# A sentence ends at ., ! or ? before white space, or at a line break; separators stay with
# the piece before them, so that the pieces join back into the text (as trim_messages needs).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD_END = re.compile(r"\s+")


def _pieces(pattern: re.Pattern[str], text: str) -> list[str]:
    pieces, start = [], 0
    for match in pattern.finditer(text):
        if match.end() > start:
            pieces.append(text[start : match.end()])
            start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _sentences(text: str) -> list[str]:
    return _pieces(_SENTENCE_END, text)


def _words(text: str) -> list[str]:
    return _pieces(_WORD_END, text)


def _after_header(split: Callable[[str], list[str]]) -> Callable[[str], list[str]]:
    # The header is a piece of its own: it goes whole or (when not even it fits) not at all.
    def pieces(content: str) -> list[str]:
        return [SUMMARY_HEADER, *split(content[len(SUMMARY_HEADER) :])]

    return pieces


def fit_summary(text: str, max_tokens: int | None, counter: TokenCounter) -> str:
    """``text`` cut to the last sentence whose summary message fits ``max_tokens`` tokens.

    When not even the first sentence fits, the cut is at the last word (then character) that
    does. ``None`` keeps the whole text.

    Example:
        >>> from chatchain._tokens import APPROXIMATE
        >>> fit_summary("Bob likes tea. He lives in Oslo. " * 30, 30, APPROXIMATE)
        'Bob likes tea. He lives in Oslo. Bob likes tea.'
    """
    text = text.strip()
    if max_tokens is None or counter([summary_message(text)]) <= max_tokens:
        return text
    for splitter in (_sentences, _words, list):
        kept = trim_messages(
            [summary_message(text)],
            max_tokens=max_tokens,
            token_counter=counter.count,
            strategy="first",
            allow_partial=True,
            text_splitter=_after_header(splitter),
        )
        cut = kept[0].text[len(SUMMARY_HEADER) :].strip() if kept else ""
        if cut:
            return cut
    return ""


def _reply_summary(reply: Any) -> str:
    """The summary a reply carries, without a sentence that ``max_tokens`` cut short."""
    text = _text(reply)
    metadata = getattr(reply, "response_metadata", None) or {}
    if metadata.get("finish_reason") == "length":
        pieces = _sentences(text)
        text = "".join(pieces[:-1]) if len(pieces) > 1 else text
    return text.strip()


def _calls(message: BaseMessage) -> list[str]:
    """The ids of the tool calls an AI message makes (none for other messages)."""
    if not isinstance(message, AIMessage):
        return []
    return [str(call.get("id")) for call in message.tool_calls]


def whole_exchanges(messages: Sequence[BaseMessage]) -> list[BaseMessage]:
    """``messages`` as a prompt can hold them: whole turns, every tool call with its result.

    The history opens on a user message (a leading reply or tool result has lost its
    question). An AI message that calls tools is kept with the results that follow it only
    when every one of its calls has one; else (a turn cut short, a window or an import that
    split it) its calls and their results go, and its text, if any, stays. A tool result
    that answers no call of the AI message before it goes too.

    Example:
        >>> from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
        >>> call = {"name": "weather", "args": {}, "id": "c1"}
        >>> history = [ToolMessage("orphan", tool_call_id="c0"), HumanMessage("Oslo?"),
        ...            AIMessage("", tool_calls=[call, {**call, "id": "c2"}]),
        ...            ToolMessage("sunny", tool_call_id="c1"), HumanMessage("And now?")]
        >>> [m.type for m in whole_exchanges(history)]
        ['human', 'human']
    """
    start = next((i for i, m in enumerate(messages) if m.type == "human"), len(messages))
    kept: list[BaseMessage] = []
    index = start
    while index < len(messages):
        message = messages[index]
        index += 1
        calls = _calls(message)
        if not calls:
            if not isinstance(message, ToolMessage):  # a result here follows no call
                kept.append(message)
            continue
        results: dict[str, BaseMessage] = {}
        while index < len(messages) and isinstance(messages[index], ToolMessage):
            result = messages[index]
            assert isinstance(result, ToolMessage)
            if result.tool_call_id in calls:
                results.setdefault(result.tool_call_id, result)
            index += 1
        if len(results) == len(set(calls)):
            kept += [message, *results.values()]
        elif message.text.strip():
            kept.append(AIMessage(content=message.content, id=message.id))
    return kept


def unwindowed(history: Sequence[BaseMessage], inputs: Sequence[BaseMessage]) -> list[BaseMessage]:
    """The whole ``history`` sent as it is, but for tool calls no result answers (a reply
    whose calls a client never answered, see `chatchain._options`): `whole_exchanges` then.
    Tool results as the input must answer the last message's calls (`pending_calls`).

    Raises:
        InvalidInputError: ``inputs`` are tool results that do not answer the history's
            last message.
    """
    pending = pending_calls(history, inputs)
    rest = history if pending is None else history[:-1]
    if any(_calls(message) for message in rest):
        rest = whole_exchanges(rest)
    return [*rest] if pending is None else [*rest, pending]


def halved(history: Sequence[BaseMessage]) -> list[BaseMessage] | None:
    """Less of the ``history`` a prompt sent, for a retry after the context overflowed.

    The newest half of its messages, as whole exchanges (`whole_exchanges`), after the
    running summary if it led the history; once no message is left, the summary goes too.
    ``None``: nothing is left to drop. Each call strictly shortens the history, so retries
    end, whatever the window (none, by turns or by tokens) that chose it.

    Example:
        >>> from langchain_core.messages import AIMessage, HumanMessage
        >>> sent = [HumanMessage("q1"), AIMessage("a1"), HumanMessage("q2"), AIMessage("a2")]
        >>> [m.text for m in halved(sent)], halved([HumanMessage("q1")]), halved([])
        (['q2', 'a2'], [], None)
    """
    head = list(history[:1]) if history and _is_summary(history[0]) else []
    # A last message with calls is answered by the turn's input (tool results): it stays.
    tail = list(history[-1:]) if history and _calls(history[-1]) else []
    rest = history[len(head) : len(history) - len(tail)]
    if rest:
        return head + whole_exchanges(rest[len(rest) - len(rest) // 2 :]) + tail
    return tail if head else None


def _is_summary(message: BaseMessage) -> bool:
    return isinstance(message, SystemMessage) and message.text.startswith(SUMMARY_HEADER)


def _turn_starts(messages: Sequence[BaseMessage], offset: int) -> list[int]:
    """Where turns start (the indexes of user messages), counted from ``offset``."""
    return [offset + i for i, m in enumerate(messages) if m.type == "human"]


@dataclass
class Recall:
    """What of a session's history a turn is sent: the window and running summary at work.

    Summaries go to ``summary_model`` (the chat model when it is ``None``), whose replies are
    capped at ``summary_reply_tokens``; the stored and the sent summary are cut to the
    window's ``summary_tokens``, so a turn's prompt stays within
    ``HistoryWindow.prompt_limit`` however verbose the summarizer is. A summary request holds
    the instructions, the summary (cut to ``summary_tokens``) and the lines it folds in: a
    batch of turns, or for a backlog at most four windows' worth of messages.

    Attributes:
        window: What of the history is sent (``None``: all of it).
        counter: Counts tokens for the window and the summary budget.
        model: The chat model.
        summary_model: The model for summary calls, or ``None`` for ``model``.
        summary_reply_tokens: The ``max_tokens`` of a summary call, for budget holds.
    """

    window: HistoryWindow | None
    counter: TokenCounter
    model: Runnable[Any, Any]
    summary_model: Runnable[Any, Any] | None = None
    summary_reply_tokens: int | None = None

    @property
    def summarizer(self) -> Runnable[Any, Any]:
        """The model that writes the summaries."""
        return self.model if self.summary_model is None else self.summary_model

    @property
    def summary_model_name(self) -> str | None:
        """The summary model's name, when it has one."""
        return _model_name(self.summarizer)

    def _summary_budget(self) -> int | None:
        return None if self.window is None else self.window.summary_tokens

    def _request(self, summary: Summary | None, older: Sequence[BaseMessage]) -> list[BaseMessage]:
        # A summary stored before the budget existed may be huge: it goes in cut, too.
        budget = self._summary_budget()
        previous = fit_summary(summary.text, budget, self.counter) if summary else None
        words = self.window.summary_words if self.window else SUMMARY_WORDS
        return _summary_request(previous, older, words)

    def _fitted(self, reply: Any) -> str:
        return fit_summary(_reply_summary(reply), self._summary_budget(), self.counter)

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

    @staticmethod
    def _whole_turns(
        summary: Summary | None, loaded: list[BaseMessage], start: int, upto: int
    ) -> tuple[int, list[BaseMessage]] | None:
        """The plan moved to turn boundaries: what the summary covers, and the lines it folds.

        ``loaded`` holds the messages from ``start`` on. A summary ends where a turn starts,
        so that a tool exchange is never split between the summary and the window: at the
        last turn that starts by ``upto`` (the summary covers less), or when one turn spans
        the whole plan, at the next one (it covers more). ``None``: no turn starts after
        ``start`` (the newest turn is all there is to fold). A backlog slice (older turns
        beyond a summary's reach) starts on its first turn too, when one starts before the end.
        """
        base = start
        starts = _turn_starts(loaded, base)
        before = [i for i in starts if start < i <= upto]
        after = [i for i in starts if i > upto]
        end = before[-1] if before else (after[0] if after else None)
        if end is None:
            return None
        if start > (summary.covers if summary else 0):  # a backlog cut: on a turn if one fits
            start = next((i for i in starts if start <= i < end), start)
        return end, loaded[start - base : end - base]

    def summarize(self, store: HistoryStore, session_id: str) -> SummaryCall | None:
        """Fold the turns beyond the window into the summary if enough have piled up (no
        budget, no deadline: see `summary_flow`)."""
        return run(self.summary_flow(store, session_id))

    async def asummarize(self, store: HistoryStore, session_id: str) -> SummaryCall | None:
        """`summarize` for async callers."""
        return await arun(self.summary_flow(store, session_id))

    def summary_flow(
        self,
        store: HistoryStore,
        session_id: str,
        before_send: Callable[[list[BaseMessage]], Flow[int]] | None = None,
        bounded: Callable[[Effect], Effect] | None = None,
    ) -> Flow[SummaryCall | None]:
        """Fold the turns beyond the window into the summary if enough have piled up.

        ``before_send`` sees the request first (a budget check may refuse it by raising) and
        returns the ``max_tokens`` to send it with (the reply its budget hold covers);
        ``bounded`` wraps the model call (the turn's deadline bounds it). Returns the call's
        handler and latency, or ``None`` when no summary was due.
        """
        summary = yield call(store, "get_summary", session_id)
        plan = self._summary_plan((yield call(store, "count", session_id)), summary)
        if plan is None:
            return None
        start, upto = plan
        loaded = yield call(store, "load", session_id, start)
        turns = self._whole_turns(summary, loaded, start, upto)
        if turns is None:
            return None
        upto, older = turns
        request = self._request(summary, older)
        limit = (yield from before_send(request)) if before_send is not None else None
        model = self.summarizer if limit is None else self.summarizer.bind(max_tokens=limit)
        handler, started = _metering.new_handler(), time.perf_counter()
        config = RunnableConfig(callbacks=[handler], run_name="summary")
        invoke = call(model, "invoke", request, config)
        reply = yield (invoke if bounded is None else bounded(invoke))
        latency = time.perf_counter() - started
        yield call(store, "set_summary", session_id, Summary(self._fitted(reply), covers=upto))
        return SummaryCall(handler, latency, self.summary_model_name)

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
        """The history to send: summary message, then the newest messages that fit.

        The summary message is at most ``window.summary_tokens`` and the rest at most
        ``window.max_tokens`` tokens, the input included.

        Raises:
            InvalidInputError: The input alone is over ``window.max_tokens``.
        """
        # Tool results answering the last message's calls: the two go whole, after the rest.
        pending = pending_calls(messages, inputs)
        if pending is not None:
            messages, inputs = messages[:-1], [pending, *inputs]
        if window.limit is not None:
            messages = messages[-window.limit :]
        messages = whole_exchanges(messages)
        head: list[BaseMessage] = []
        if summary is not None and window.summarize:
            text = fit_summary(summary.text, window.summary_tokens, self.counter)
            head = [summary_message(text)] if text else []
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
        return head + messages + ([] if pending is None else [pending])

    def load(
        self, store: HistoryStore, session_id: str, inputs: Sequence[BaseMessage]
    ) -> list[BaseMessage]:
        """Read the window from the store (only what it needs) and select the history."""
        return run(self.load_flow(store, session_id, inputs))

    async def aload(
        self, store: HistoryStore, session_id: str, inputs: Sequence[BaseMessage]
    ) -> list[BaseMessage]:
        """`load` for async callers."""
        return await arun(self.load_flow(store, session_id, inputs))

    def load_flow(
        self, store: HistoryStore, session_id: str, inputs: Sequence[BaseMessage]
    ) -> Flow[list[BaseMessage]]:
        """`load`, as a flow (see `_flow`)."""
        window = self.window
        if window is None:
            whole: list[BaseMessage] = yield call(store, "load", session_id)
            return unwindowed(whole, inputs)
        summary = (yield call(store, "get_summary", session_id)) if window.summarize else None
        start = self._start((yield call(store, "count", session_id)), summary, window)
        loaded = yield call(store, "load", session_id, start)
        return self.select(loaded, summary, inputs, window)


@dataclass(frozen=True)
class SummaryCall:
    """A summary call that was made: its usage handler, latency and model."""

    handler: Any
    latency_s: float
    model: str | None


def _text(reply: Any) -> str:
    return str(reply.content if hasattr(reply, "content") else reply).strip()


def _model_name(model: Runnable[Any, Any]) -> str | None:
    model = getattr(model, "bound", model)  # a model with bound max_tokens
    model = getattr(model, "runnable", model)  # the main model of a RunnableWithFallbacks
    name = getattr(model, "model_name", None)
    return name if isinstance(name, str) else None
