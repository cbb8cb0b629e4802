"""Firing a turn's hook events (see `chatchain.hooks`), shared by the sync and async turn.

`Turn` calls these from the one place each event happens; each builds its event only when
the chain has hooks, and `HookList.emit` keeps anything a hook raises out of the turn.
`ending` and `committing` wrap the flows of `Turn.end` and `Turn.save` (one for the sync and
the async drivers), so that the event fires whatever those do or raise.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from langchain_core.messages import BaseMessage

from chatchain._tools import ToolEvent, ToolStarted
from chatchain.errors import BudgetExceeded, ConfigurationError, TurnDeadlineError
from chatchain.hooks import (
    FirstToken,
    ModelCallEnded,
    ModelCallStarted,
    Outcome,
    StoreCommitted,
    ToolCallEnded,
    ToolCallStarted,
    TurnEnded,
    TurnHooks,
    TurnInfo,
    TurnStarted,
)

if TYPE_CHECKING:
    from chatchain._flow import Flow
    from chatchain._turn import Turn

__all__ = [
    "Events",
    "HookList",
    "as_hooks",
    "committing",
    "ending",
    "first_token",
    "model_ended",
    "model_failed",
    "model_started",
    "tool_event",
    "turn_started",
]

logger = logging.getLogger("chatchain")

T = TypeVar("T", bound="Turn")

# Ids LangChain gives a message when the endpoint sent none: not the endpoint's response id.
_LANGCHAIN_IDS = ("run-", "lc_run-", "lc_")


E = TypeVar("E")


class HookList:
    """The hooks of a chain, called in order; a hook that raises is logged and skipped.

    A `Chatbot`'s list is shared with its chain, so hooks added later (`Chatbot.add_hooks`)
    see the next turns.
    """

    def __init__(self, hooks: Iterable[TurnHooks] = ()) -> None:
        self._hooks: tuple[TurnHooks, ...] = ()
        for hook in hooks:
            self.add(hook)

    def __bool__(self) -> bool:
        return bool(self._hooks)

    def __iter__(self) -> Iterator[TurnHooks]:
        return iter(self._hooks)

    def add(self, hook: TurnHooks) -> None:
        """Call ``hook`` too (once: adding the same object again changes nothing)."""
        if not isinstance(hook, TurnHooks):
            raise ConfigurationError(
                f"hooks must be TurnHooks objects (subclass chatchain.hooks.TurnHooks), not "
                f"{type(hook).__name__}."
            )
        if not any(hook is known for known in self._hooks):
            self._hooks = (*self._hooks, hook)  # a new tuple: a turn iterating keeps its own

    def emit(self, method: str, build: Callable[[], E]) -> None:
        """Call each hook's ``method`` with the event ``build()`` makes (only if there are
        hooks: a chain without any builds no events). Nothing raised escapes."""
        hooks = self._hooks
        if not hooks:
            return
        try:
            event = build()
        except Exception:
            logger.exception("The %s event of a turn could not be built; hooks skipped", method)
            return
        for hook in hooks:
            try:
                getattr(hook, method)(event)
            except Exception:
                logger.exception("Hook %s.%s raised; the turn goes on", type(hook).__name__, method)


def as_hooks(hooks: TurnHooks | Sequence[TurnHooks] | HookList | None) -> HookList:
    """The `HookList` of a ``hooks=`` argument (a list passed as is stays shared).

    Raises:
        ConfigurationError: Something other than `TurnHooks` objects.
    """
    if isinstance(hooks, HookList):
        return hooks
    if hooks is None:
        return HookList()
    if isinstance(hooks, TurnHooks):
        return HookList([hooks])
    return HookList(hooks)


@dataclass
class _OpenCall:
    index: int
    started: float


@dataclass
class Events:
    """What a turn's events need to know between them."""

    started: float | None = None  # `time.perf_counter` at `TurnStarted`; None: not started
    calls: int = 0
    call: _OpenCall | None = None
    committed: bool = False
    interrupted: bool = False


def _info(turn: Turn) -> TurnInfo:
    return TurnInfo(turn.entry_id, turn.session_id, turn.user_id, turn.spec.default_model)


def turn_started(turn: Turn) -> None:
    """The turn took its session's lock (the first step of every entry point under it)."""
    if not turn.spec.hooks or turn._events.started is not None:
        return
    turn._events.started = time.perf_counter()
    turn.spec.hooks.emit("on_turn_start", lambda: TurnStarted(_info(turn)))


def first_token(turn: Turn) -> None:
    if turn.first_token_s is not None and turn._events.started is not None:
        seconds = turn.first_token_s
        turn.spec.hooks.emit("on_first_token", lambda: FirstToken(_info(turn), seconds))


def model_started(turn: Turn) -> None:
    """A call is about to go out (its budget checked and held, its record written)."""
    events = turn._events
    if events.started is None:
        return
    _close_call(turn, None, None, interrupted=True)  # an attempt nothing closed (defensive)
    index, events.calls = events.calls, events.calls + 1
    events.call = _OpenCall(index, time.perf_counter())
    limit = turn.reply_limit if turn.reply_limit is not None else turn.spec.max_tokens
    turn.spec.hooks.emit("on_model_start", lambda: ModelCallStarted(_info(turn), index, limit))


def model_ended(turn: Turn, reply: BaseMessage) -> None:
    """The open call answered with ``reply`` (a tool round's, or the turn's reply)."""
    interrupted = bool(reply.response_metadata.get("interrupted"))
    _close_call(turn, reply, None, interrupted=interrupted)


def model_failed(turn: Turn, exc: BaseException) -> None:
    """The open call failed with ``exc`` (or the turn did while it ran)."""
    _close_call(turn, None, exc, interrupted=False)


def _close_call(
    turn: Turn, reply: BaseMessage | None, error: BaseException | None, *, interrupted: bool
) -> None:
    call, turn._events.call = turn._events.call, None
    if call is None:
        return
    seconds = time.perf_counter() - call.started
    turn.spec.hooks.emit(
        "on_model_end", lambda: _call_ended(turn, call.index, reply, error, interrupted, seconds)
    )


def _call_ended(
    turn: Turn,
    index: int,
    reply: BaseMessage | None,
    error: BaseException | None,
    interrupted: bool,
    seconds: float,
) -> ModelCallEnded:
    metadata = reply.response_metadata if reply is not None else {}
    tokens = getattr(reply, "usage_metadata", None) or {}
    response_id = reply.id if reply is not None else None
    if response_id is not None and response_id.startswith(_LANGCHAIN_IDS):
        response_id = None
    reason = metadata.get("finish_reason")
    return ModelCallEnded(
        _info(turn),
        index,
        model=metadata.get("model_name") or turn.spec.default_model,
        response_id=response_id,
        finish_reason=reason if isinstance(reason, str) else None,
        input_tokens=tokens.get("input_tokens"),
        output_tokens=tokens.get("output_tokens"),
        seconds=seconds,
        error=error,
        interrupted=interrupted,
    )


def tool_event(turn: Turn, event: ToolEvent) -> None:
    if turn._events.started is None:
        return
    if isinstance(event, ToolStarted):
        started = event
        turn.spec.hooks.emit(
            "on_tool_start",
            lambda: ToolCallStarted(_info(turn), started.id, started.name, dict(started.args)),
        )
        return
    call = event.call
    turn.spec.hooks.emit("on_tool_end", lambda: ToolCallEnded(_info(turn), call))


# -- the store commit -----------------------------------------------------------------------


def _committed(turn: Turn, reply: BaseMessage, seconds: float, error: BaseException | None) -> None:
    events = turn._events
    if error is None:
        events.committed = True
        events.interrupted = bool(reply.response_metadata.get("interrupted"))
    if events.started is None:
        return
    count = len(turn.input_messages) + len(turn.steps) + 1
    turn.spec.hooks.emit("on_commit", lambda: StoreCommitted(_info(turn), count, seconds, error))


def committing(turn: Turn, reply: BaseMessage, save: Flow[None]) -> Flow[None]:
    """``save`` (the flow of `Turn.save`), firing `StoreCommitted` when it ends or raises."""
    began = time.perf_counter()
    try:
        yield from save
    except BaseException as exc:
        _committed(turn, reply, time.perf_counter() - began, exc)
        raise
    _committed(turn, reply, time.perf_counter() - began, None)


# -- the end of the turn ----------------------------------------------------------------------

# The drivers call `Turn.end` in a ``finally`` block, so the exception the turn ends with (if
# any) is the one being handled there: `sys.exc_info` reads it without every driver passing
# it. A turn that stored its whole reply ended well, whatever an outer handler holds.

_STOPPED = (GeneratorExit, asyncio.CancelledError)  # the caller stopped the stream


def _outcome(turn: Turn, error: BaseException | None) -> tuple[Outcome, BaseException | None]:
    events = turn._events
    if events.committed and not events.interrupted:
        return "ok", None
    if error is None or isinstance(error, _STOPPED):
        return "interrupted", None
    if isinstance(error, BudgetExceeded):
        return "refused", error
    if isinstance(error, TurnDeadlineError):
        return "deadline", error
    return "error", error


def _ended(turn: Turn, error: BaseException | None) -> None:
    events = turn._events
    if events.started is None:
        return
    outcome, error = _outcome(turn, error)
    _close_call(turn, None, error, interrupted=True)
    seconds = time.perf_counter() - events.started
    turn.spec.hooks.emit(
        "on_turn_end",
        lambda: TurnEnded(
            _info(turn),
            outcome,
            turn.usage,
            error,
            seconds,
            first_token_s=turn.first_token_s,
            interrupted=events.interrupted,
            tool_runs=tuple(turn.tool_runs),
        ),
    )


def ending(turn: Turn, end: Flow[None]) -> Flow[None]:
    """``end`` (the flow of `Turn.end`), firing `TurnEnded` after it, whatever it does."""
    error = sys.exc_info()[1]
    try:
        yield from end
    finally:
        _ended(turn, error)
