"""Turn hooks: what happens in a turn, as it happens, for metrics, tracing and logs.

Subclass `TurnHooks`, override the methods you need (each is a no-op by default) and give
the object to `create_chat_chain` or `Chatbot` (``hooks=``, one object or a list). Each
method receives one frozen event, fired from the one place in the turn where it happens, on
every entry point (``chat``, ``stream``, ``achat``, ``astream``, the service's routes):

==================  ====================  ==================================================
method              event                 when
==================  ====================  ==================================================
`on_turn_start`     `TurnStarted`         the session's lock is held: the turn runs
`on_model_start`    `ModelCallStarted`    a call to the model is about to be sent
`on_first_token`    `FirstToken`          a streamed reply's first text arrived
`on_model_end`      `ModelCallEnded`      the call answered (a tool round, or the reply),
                                          failed, or was stopped
`on_tool_start`     `ToolCallStarted`     a tool call is about to run
`on_tool_end`       `ToolCallEnded`       it ended, well or not
`on_commit`         `StoreCommitted`      the turn was written (or failed to be) to the store
`on_turn_end`       `TurnEnded`           the turn is over, whatever happened: its outcome,
                                          usage, cost, error and duration
==================  ====================  ==================================================

Every turn that starts ends, exactly once. Hooks are plain methods, called on the thread or
event loop that runs that step of the turn (a step's tools run in threads of their own, and a
chat model that chatchain's HTTP transport cannot bound runs in a worker thread): keep them
quick and thread-safe (hand slow work to a queue). A hook that raises is logged
(``logger.exception`` on the ``chatchain`` logger) and the turn goes on as if it had not: it
cannot break the turn, nor what the turn records in the usage ledger.

Example:
    >>> from chatchain import Chatbot
    >>> from chatchain.hooks import TurnEnded, TurnHooks
    >>> from chatchain.testing import FakeChatModel
    >>> class Outcomes(TurnHooks):
    ...     def __init__(self) -> None:
    ...         self.seen: list[str] = []
    ...     def on_turn_end(self, event: TurnEnded) -> None:
    ...         self.seen.append(f"{event.outcome} on {event.turn.session_id}")
    >>> outcomes = Outcomes()
    >>> _ = Chatbot(llm=FakeChatModel(), hooks=outcomes).chat("hi", session_id="s1")
    >>> outcomes.seen
    ['ok on s1']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from chatchain._renamed import warn_renamed
from chatchain._tools import ToolRun
from chatchain.usage import Usage

__all__ = [
    "FirstToken",
    "ModelCallEnded",
    "ModelCallStarted",
    "Outcome",
    "StoreCommitted",
    "ToolCallEnded",
    "ToolCallStarted",
    "TurnEnded",
    "TurnHooks",
    "TurnInfo",
    "TurnStarted",
]

Outcome = Literal["ok", "interrupted", "refused", "deadline", "error"]
"""How a turn ended: ``ok`` (the whole reply was stored), ``interrupted`` (the caller stopped
the stream, or its task was cancelled: the partial reply was stored), ``refused`` (a budget
cap refused a call: `BudgetExceeded`), ``deadline`` (`TurnDeadlineError`) or ``error`` (any
other failure; see `TurnEnded.error`)."""


@dataclass(frozen=True)
class TurnInfo:
    """Which turn an event belongs to.

    Attributes:
        id: The turn's id, unique to it (its usage ledger entry's id): the key that ties a
            turn's events together.
        session_id: The session's id, as the call gave it.
        user_id: The user the turn is filed under, or ``None``.
        model: The configured model's name (the endpoint may answer under another; see
            `ModelCallEnded.model`), or ``None`` when the chat model does not say.
    """

    id: str
    session_id: str
    user_id: str | None
    model: str | None


@dataclass(frozen=True)
class TurnStarted:
    """The turn took its session's lock and runs (waiting for the lock is not part of it)."""

    turn: TurnInfo


@dataclass(frozen=True)
class FirstToken:
    """A streamed reply's first text arrived, ``seconds`` after the turn's clock started."""

    turn: TurnInfo
    seconds: float


@dataclass(frozen=True)
class ModelCallStarted:
    """A call to the model is about to be sent (the budget was checked and held).

    Attributes:
        index: The call's number in the turn, from 0 (a turn with tool rounds makes several;
            a retry with less history after a context overflow is another call).
        max_tokens: The reply tokens the call is sent with (the budget's hold or the reply
            cap), or ``None`` when nothing caps it.
    """

    turn: TurnInfo
    index: int
    max_tokens: int | None


@dataclass(frozen=True)
class ModelCallEnded:
    """A call to the model ended: answered, failed or stopped.

    Attributes:
        index: The call's number in the turn (as its `ModelCallStarted`'s).
        model: The model that answered, as the endpoint named it, else the configured one.
        response_id: The endpoint's id of the response, when it sent one.
        finish_reason: Why the reply ended (``"stop"``, ``"length"``, ``"tool_calls"`` ...),
            when the endpoint said.
        input_tokens: The prompt tokens the endpoint reported for this call, else ``None``.
        output_tokens: The reply tokens it reported, else ``None``.
        seconds: How long the call took.
        error: What the call failed with, or ``None``.
        interrupted: Whether the call was stopped before its reply ended (the stream was
            stopped, or the turn failed while it ran).
    """

    turn: TurnInfo
    index: int
    model: str | None
    response_id: str | None
    finish_reason: str | None
    input_tokens: int | None
    output_tokens: int | None
    seconds: float
    error: BaseException | None = None
    interrupted: bool = False


@dataclass(frozen=True)
class ToolCallStarted:
    """A tool call the model asked for is about to run."""

    turn: TurnInfo
    id: str
    name: str
    args: dict[str, Any]


@dataclass(frozen=True)
class ToolCallEnded:
    """A tool call ended, well or not (see ``call.status`` and ``call.error``)."""

    turn: TurnInfo
    call: ToolRun


@dataclass(frozen=True)
class StoreCommitted:
    """The turn's messages and usage were written to the store, or failed to be.

    Attributes:
        messages: How many messages the turn stored (its user message, tool exchange, reply).
        seconds: How long the write took.
        error: What the store failed with (the turn then fails or is journaled), or ``None``.
    """

    turn: TurnInfo
    messages: int
    seconds: float
    error: BaseException | None = None


@dataclass(frozen=True)
class TurnEnded:
    """The turn is over.

    Attributes:
        outcome: How it ended (see `Outcome`).
        usage: What the turn used and cost as recorded in the ledger, or ``None`` when
            nothing of it was recorded with the turn (it failed before a reply, or a store
            failure journaled it).
        error: The exception the caller sees, or ``None`` (``ok``; ``interrupted`` by the
            caller stopping the stream).
        seconds: How long the turn ran, from `TurnStarted`.
        first_token_s: Seconds to the first streamed text, ``None`` if none arrived.
        interrupted: Whether a partial reply was stored, marked interrupted.
        tool_runs: The tools that ran in the turn.
    """

    turn: TurnInfo
    outcome: Outcome
    usage: Usage | None
    error: BaseException | None
    seconds: float
    first_token_s: float | None = None
    interrupted: bool = False
    tool_runs: tuple[ToolRun, ...] = ()

    @property
    def tool_calls(self) -> tuple[ToolRun, ...]:
        """Deprecated: `tool_runs`."""
        warn_renamed("TurnEnded.tool_calls", "TurnEnded.tool_runs")
        return self.tool_runs

    @property
    def cost_usd(self) -> float | None:
        """The turn's list-price cost in USD; ``None`` when unknown or not recorded."""
        return None if self.usage is None else self.usage.cost_usd


class TurnHooks:
    """Callbacks for what happens in a turn: subclass it and override what you need.

    Every method is a no-op here. See the module's docstring for when each is called.
    """

    def on_turn_start(self, event: TurnStarted) -> None:
        """The turn runs (its session's lock is held)."""

    def on_model_start(self, event: ModelCallStarted) -> None:
        """A call to the model is about to be sent."""

    def on_first_token(self, event: FirstToken) -> None:
        """A streamed reply's first text arrived."""

    def on_model_end(self, event: ModelCallEnded) -> None:
        """A call to the model ended."""

    def on_tool_start(self, event: ToolCallStarted) -> None:
        """A tool call is about to run."""

    def on_tool_end(self, event: ToolCallEnded) -> None:
        """A tool call ended."""

    def on_commit(self, event: StoreCommitted) -> None:
        """The turn was written to the store (or the write failed)."""

    def on_turn_end(self, event: TurnEnded) -> None:
        """The turn is over."""
