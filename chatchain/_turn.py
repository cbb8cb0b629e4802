"""One turn's bookkeeping, shared by every entry point so that they cannot drift.

A turn is: validate the input, take the session's lock, run the model with a fresh usage
handler, then save the user's message, the reply and the usage in one atomic write that the
store refuses (but for the usage) if the turn lost the lock meanwhile.
A failed turn saves nothing; an interrupted stream saves the user's message and the partial
reply, marked ``interrupted`` in the reply's ``response_metadata``.
Before its call goes out, the store keeps a write-ahead record of the turn (see `_pending`),
so that a process killed mid-turn loses neither the user's message nor the call's bill: the
session's next turn stores the cut-off turn first, its reply marked interrupted (``crashed``).

The turn's deadline (``CHATCHAIN_TURN_DEADLINE``) counts from when the session's lock is
taken: waiting for another turn is bounded by ``CHATCHAIN_LOCK_TIMEOUT`` instead. It bounds
the summary call, the model call with the client's retries, and a stream until its last chunk
(time the caller spends between chunks included); the final writes are not cut short.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
import unicodedata
from collections.abc import (
    AsyncIterator,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from functools import partial
from typing import Any, NoReturn
from uuid import uuid4

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import ensure_config, merge_configs

from chatchain import (
    _deadline,
    _endpoint_errors,
    _hooking,
    _metering,
    _pending,
    _streaming,
    budgets,
)
from chatchain._flow import Do, Effect, Flow, arun, blocking, call, run
from chatchain._hooking import HookList
from chatchain._journal import Journal, JournaledTurn, replay_in_background
from chatchain._metering import Estimate
from chatchain._money import format_usd
from chatchain._tokens import TokenCounter
from chatchain._tools import INTERRUPTED, Toolbox, ToolCall, ToolEvent, ToolFinished, ToolStarted
from chatchain.budgets import (
    DEFAULT_REPLY_LIMIT,
    MIN_REPLY_TOKENS,
    Budget,
    BudgetHold,
    BudgetLimit,
    BudgetRefusal,
    HoldSizing,
)
from chatchain.errors import (
    BudgetExceeded,
    ConfigurationError,
    InvalidInputError,
    MissingPromptVariableError,
    SessionLockLostError,
    StoreError,
    TurnDeadlineError,
    TurnJournaledError,
)
from chatchain.pricing import Pricer
from chatchain.stores import Fence, HistoryStore
from chatchain.usage import Usage, UsageEntry, UsageLedger
from chatchain.window import Recall, SummaryCall

__all__ = [
    "CUT_AT_HOLD",
    "MAX_SESSION_ID_LENGTH",
    "BudgetedModel",
    "Turn",
    "TurnSpec",
    "validate_session_id",
]

logger = logging.getLogger("chatchain")

MAX_SESSION_ID_LENGTH = 256
"""The most characters a session id (or a user id) may have (see `validate_session_id`)."""

_NO_HITS = _metering.CacheHits()

CUT_AT_HOLD = "cut_at_hold"
"""The ``response_metadata`` key (``True``) of a reply chatchain stopped reading at its budget
hold because the endpoint went on past the ``max_tokens`` it was sent with."""

TURN_KEY = "__chatchain_turn"
"""Where a run's configurable carries its `Turn` (``__``: LangChain never copies it to tracing)."""

LIMITS_KEY = "limits"
"""Where a call's configurable carries its own caps (a list of `BudgetLimit`), checked with
the chain's budget before anything is sent."""

HOLD_TTL = timedelta(minutes=15)
"""How long a turn's budget hold outlives a process that died holding it, with no deadline."""

HOLD_MARGIN = timedelta(seconds=60)
"""How long a hold outlives its turn's deadline (clock skew, the final writes)."""
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})  # controls, surrogates, line breaks


def validate_session_id(session_id: object, what: str = "session") -> str:
    """Return ``session_id`` if it can key a session, else raise a clear error.

    ``what`` names the id in messages (``"user"`` for user ids, which follow the same rules).

    Raises:
        InvalidInputError: Not a string, empty, longer than 256 characters, or holding
            control characters or line breaks.
    """
    if not isinstance(session_id, str):
        raise InvalidInputError(
            f"The {what} id must be a string, not {type(session_id).__name__}: "
            f"pass {what}_id='...'."
        )
    if not session_id.strip():
        raise InvalidInputError(f"The {what} id is empty: pass a non-blank {what}_id.")
    if len(session_id) > MAX_SESSION_ID_LENGTH:
        raise InvalidInputError(
            f"The {what} id is {len(session_id)} characters long; the limit is "
            f"{MAX_SESSION_ID_LENGTH}. Use a shorter id (a UUID or a hash of yours)."
        )
    bad = next((ch for ch in session_id if unicodedata.category(ch) in _FORBIDDEN_CATEGORIES), None)
    if bad is not None:
        raise InvalidInputError(
            f"The {what} id holds the control character U+{ord(bad):04X}: remove it."
        )
    return session_id


def _validate_text(text: str, where: str) -> None:
    if not text.strip():
        raise InvalidInputError(f"The {where} is empty: send some text.")
    if "\x00" in text:
        raise InvalidInputError(
            f"The {where} holds a NUL character (\\x00), which stores cannot keep: remove it."
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: Python holds it, no store can
        raise InvalidInputError(
            f"The {where} holds a lone surrogate (U+{ord(text[exc.start]):04X}), which is not "
            "valid Unicode and cannot be stored: remove it (or decode the text with "
            "errors='replace')."
        ) from None


# Where a reply holds text from the endpoint (model output may hold invalid code points).
_REPLY_FIELDS = ("content", "additional_kwargs", "response_metadata", "tool_calls")


def _valid_unicode(value: Any) -> tuple[Any, int]:
    """``value`` with lone surrogates replaced by U+FFFD, and how many were.

    Surrogate pairs split across chunks (two code points in a Python string) are joined into
    the character they encode first: only halves without their other half are lost. The value
    is returned as is (the same object) when nothing needed fixing.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            fixed = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
            return fixed, fixed.count("\ufffd") - value.count("\ufffd")
        return value, 0
    if isinstance(value, (list, tuple)):
        items = [_valid_unicode(item) for item in value]
        if all(new is old for (new, _), old in zip(items, value, strict=True)):
            return value, 0
        return type(value)(new for new, _ in items), sum(count for _, count in items)
    if isinstance(value, dict):
        pairs = {key: _valid_unicode(item) for key, item in value.items()}
        if all(pairs[key][0] is item for key, item in value.items()):
            return value, 0
        return {key: new for key, (new, _) in pairs.items()}, sum(n for _, n in pairs.values())
    return value, 0


def _text_of(message: BaseMessage) -> str:
    return message.text if isinstance(message.text, str) else str(message.content)


@dataclass(frozen=True)
class TurnSpec:
    """What a chain knows about its turns: keys, required variables and where to save.

    Attributes:
        input_key: The input dict's key for the user's text or messages.
        required_vars: Prompt variables the call must supply (those without a default).
        get_history: The chain's ``get_session_history``.
        ledger: Where each turn's usage is recorded (and budgets held).
        recall: What of the history each turn is sent: the window and the running summary.
        pricer: Prices the turns' tokens.
        budget: Spending caps checked before each call is sent.
        max_tokens: The user's cap on one reply (``CHATCHAIN_MAX_TOKENS``, or the model's
            own ``max_tokens``), or ``None``. Under a budget each call is sent with the
            smaller of this (else `DEFAULT_REPLY_LIMIT`) and what the remaining budget can pay.
        store: The chain's store, when ``get_history`` is one (windowed loads, summaries).
        default_model: The model to price a turn with when the reply does not name one
            (an interrupted stream never receives the chunk that does).
        describe_failure: Turns an endpoint exception into a chatchain error, or ``None``.
        deadline: Seconds one whole turn may take (``CHATCHAIN_TURN_DEADLINE``), or ``None``.
        deadline_in_transport: Whether the chain's models end their own calls at the
            deadline (`model.bounds_its_deadline`): blocking calls then run in the caller's
            thread, not in a worker thread.
        tools: The chain's tools and their limits, or ``None``.
        journal: Where a finished turn waits when the store cannot save it, or ``None``.
        hooks: What is told of each turn's events (see `chatchain.hooks`).
    """

    input_key: str | None
    required_vars: frozenset[str]
    get_history: Callable[[str], BaseChatMessageHistory]
    ledger: UsageLedger
    recall: Recall
    pricer: Pricer = field(default_factory=Pricer)
    budget: Budget = field(default_factory=Budget)
    max_tokens: int | None = None
    store: HistoryStore | None = None
    default_model: str | None = None
    describe_failure: Callable[[BaseException], Exception | None] = _endpoint_errors.translate
    deadline: float | None = None
    deadline_in_transport: bool = False
    tools: Toolbox | None = None
    journal: Journal | None = None
    hooks: HookList = field(default_factory=HookList)

    @property
    def reply_ceiling(self) -> int:
        """The most reply tokens a budgeted call is sent with, whatever the budget has left."""
        return self.max_tokens or DEFAULT_REPLY_LIMIT

    @property
    def hold_ttl(self) -> timedelta:
        """How long a budget hold lives: the turn's deadline plus a margin."""
        if self.deadline is None:
            return HOLD_TTL
        return timedelta(seconds=self.deadline) + HOLD_MARGIN

    def begin(
        self,
        value: Any,
        config: RunnableConfig | None,
        input_messages: Callable[[Any], list[BaseMessage]],
    ) -> Turn:
        """Validate a call and open its turn; nothing is sent or stored yet.

        Raises:
            InvalidInputError: The input, the session id or a prompt variable is unusable.
        """
        config = ensure_config(config)
        configurable = config.get("configurable", {})
        if "session_id" not in configurable:
            raise InvalidInputError(
                "No session id: call the chain with "
                "config={'configurable': {'session_id': 'your-session'}}."
            )
        session_id = validate_session_id(configurable["session_id"])
        user_id = configurable.get("user_id")
        if user_id is not None:
            user_id = validate_session_id(user_id, "user")
        limits = budgets.call_limits(configurable.get(LIMITS_KEY, ()), user_id)
        self._check_input(value)
        messages = input_messages(value)
        for message in messages:
            if message.type == "human":
                _validate_text(_text_of(message), "message")
        handler = _metering.new_handler()
        turn = Turn(
            spec=self,
            session_id=session_id,
            user_id=user_id,
            config=config,
            input_messages=messages,
            handler=handler,
            limits=limits,
        )
        shared = {TURN_KEY: turn, _streaming.TEXT_KEY: turn.text}
        config = {**config, "configurable": {**configurable, **shared}}
        if config.get("callbacks"):
            config = merge_configs(config, {"callbacks": [handler]})
        else:  # the common case, without merge_configs' general (and slower) path
            config = {**config, "callbacks": [handler]}
        turn.config = config
        return turn

    def _check_input(self, value: Any) -> None:
        if self.input_key is None:
            if not isinstance(value, (str, BaseMessage, Sequence)) or not value:
                raise InvalidInputError("The input is empty: send some text or messages.")
            return
        if not isinstance(value, Mapping):
            raise InvalidInputError(
                f"The chain takes a dict, e.g. {{{self.input_key!r}: 'hi'}} plus any prompt "
                f"variables, not {type(value).__name__}."
            )
        if self.input_key not in value:
            raise InvalidInputError(
                f"The input has no {self.input_key!r} key: pass {{{self.input_key!r}: 'hi'}}."
            )
        text = value[self.input_key]
        if isinstance(text, str):
            _validate_text(text, "message")
        elif not isinstance(text, (BaseMessage, Sequence)) or not text:
            raise InvalidInputError(
                f"{self.input_key!r} must be text, a message or a non-empty list of messages."
            )
        missing = sorted(self.required_vars - set(value))
        if missing:
            names = ", ".join(f"{{{name}}}" for name in missing)
            example = ", ".join(f"{name}=..." for name in missing)
            raise MissingPromptVariableError(
                f"The prompt needs {names} but the call does not supply it. Pass {example} "
                "with the call, or give the chain a default with prompt_vars={...}."
            )


@dataclass(frozen=True)
class _Call:
    """One call of a turn: how to count its prompt, and its handler's counts before it."""

    count_prompt: Callable[[], int]
    prompt_tokens: int
    completion_tokens: int
    requests: int
    steps: int
    hits: int

    def unreported(self, handler: Any) -> bool:
        """Whether the endpoint reported no usage for this call (and no cache answered it)."""
        tokens = (handler.prompt_tokens, handler.completion_tokens)
        hits = getattr(getattr(handler, "hits", None), "calls", 0)
        return tokens == (self.prompt_tokens, self.completion_tokens) and hits == self.hits


@dataclass
class Turn:
    """One open turn: its session, config (with its usage handler) and what it produced."""

    spec: TurnSpec
    session_id: str
    user_id: str | None
    config: RunnableConfig
    input_messages: list[BaseMessage]
    handler: Any
    limits: tuple[BudgetLimit, ...] = ()
    """This call's own caps (``configurable["limits"]``), checked with the budget's."""
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    text: _streaming.SharedText = field(default_factory=_streaming.SharedText)
    """The text of the turn's streamed replies, held once for every fold of its chunks (the
    model's run, the tool loop, the cache, the turn, the caller's stream)."""
    _reply: _streaming.StreamedReply = field(init=False)
    """The reply streamed so far (of the latest call), as its text: no chunk is kept."""
    usage: Usage | None = None
    notices: list[str] = field(default_factory=list)
    """Things the user should know about the turn (e.g. a retry with a tighter window)."""
    entry: UsageEntry | None = None
    """The turn's ledger entry, once recorded."""
    summary_usage: Usage | None = None
    """What the running-summary call made before this turn cost, if there was one."""
    reply_limit: int | None = None
    """The ``max_tokens`` this turn's call is sent with, set by its budget hold: the reply
    cap, or less when that is all the remaining budget can pay for; ``None`` without a budget."""
    fence: Fence | None = None
    """The session lock's fence (what `HistoryStore.lock` yielded), checked when saving."""
    parsed: Any = None
    """A structured turn's reply as a validated instance of its schema (see `_structured`)."""
    _count_prompt: Callable[[], int] | None = None
    _hold: str | None = None
    deadline_at: float | None = None
    """When the turn must end (`time.monotonic`), once it runs; ``None``: no deadline."""
    _ended: bool = False
    _ending: threading.Lock = field(default_factory=threading.Lock, repr=False)
    """Held while the turn ends, or while a call holds budget: an abandoned worker cannot
    take a hold (and send) once the turn is over."""
    _cut_by: tuple[BudgetLimit, bool] | None = None  # the cap (and whether in USD) sizing the hold
    _spent: tuple[int, int] = (0, 0)
    """Prompt and reply tokens of the turn's calls so far, which its next hold covers too."""
    _call: _Call | None = None  # the turn's latest call, until its usage is settled
    _estimated: Estimate | None = None
    """What the turn's calls whose usage the endpoint never reported were counted here."""
    _estimate_reported: bool = False
    steps: list[BaseMessage] = field(default_factory=list)
    """The tool exchange so far: AI messages with tool calls, each followed by its results."""
    tool_calls: list[ToolCall] = field(default_factory=list)
    """Every tool call of the turn (a step's in the order they ended until it is closed)."""
    on_tool: Callable[[ToolEvent], None] | None = None
    """Called with each tool event as it happens."""
    stream_events: bool = False
    """Whether the turn's stream yields tool events besides the model's chunks."""
    _open: tuple[AIMessage, dict[str, ToolMessage]] | None = None  # a step whose tools run
    entry_id: str = field(default_factory=lambda: uuid4().hex)
    """The id of the turn's ledger entry, chosen before its call is sent (see `_pending`)."""
    _ahead: _pending.WriteAhead | None = None  # the store's record of this turn in flight
    _metered: bool = False
    """Whether what the endpoint billed for the turn's calls is in the ledger (see `end`)."""
    _hold_size: tuple[int, float] = (0, 0.0)  # tokens and USD of the last hold taken
    _cut_at_hold: int | None = None  # the reply tokens a call was stopped at (see `ReplyMeter`)
    _estimated_calls: int = 0  # calls whose usage chatchain counted (the endpoint sent none)
    _events: _hooking.Events = field(default_factory=_hooking.Events, repr=False)

    def __post_init__(self) -> None:
        self._reply = _streaming.StreamedReply(self.text)

    def start_clock(self) -> None:
        """Restart the clock once the lock is held, so that waiting is not latency."""
        self.started = time.perf_counter()

    def open_flow(self) -> Flow[None]:
        """The turn's first steps once its lock is held: the session's journaled turns, the
        turn a crash cut off, then the deadline starts and the summary is brought up to date."""
        yield from self._replay_flow()
        yield from self._recover_flow()
        self.start_deadline()
        yield from self._summarize_flow()
        self.start_clock()

    # -- the deadline -------------------------------------------------------------------------

    def start_deadline(self) -> None:
        """The turn runs (its lock is held): its deadline starts counting."""
        if self.spec.deadline is not None:
            self.deadline_at = time.monotonic() + self.spec.deadline

    @property
    def expired(self) -> bool:
        return self.deadline_at is not None and time.monotonic() >= self.deadline_at

    def deadline_error(self) -> TurnDeadlineError:
        """The error of a turn stopped by its deadline (logged once, by `failure`)."""
        kept = (
            "The reply so far was kept, marked interrupted."
            if self.has_reply
            else "Nothing was stored."
        )
        return TurnDeadlineError(
            f"The turn ran past its deadline of {self.spec.deadline:g} s "
            "(CHATCHAIN_TURN_DEADLINE) and was stopped: the endpoint answered too slowly, or "
            f"kept the connection open without finishing. {kept} Try again, or raise "
            "CHATCHAIN_TURN_DEADLINE."
        )

    def bounded(self, call: Callable[[], Any]) -> Any:
        """``call()`` (a blocking model call), given up on at the deadline.

        It runs in the caller's thread when the chain's models end their own calls at the
        deadline (chatchain's HTTP transport, see `_deadline`), else in a worker thread
        that is abandoned at the deadline (a model that may block without a byte).

        Raises:
            TurnDeadlineError: The deadline passed first.
        """
        if self.expired:  # not even started: nothing may be sent after the deadline
            raise self.deadline_error()
        in_thread = not self.spec.deadline_in_transport
        return _deadline.call(call, self.deadline_at, self.deadline_error, in_thread=in_thread)

    def bounded_stream(self, chunks: Generator[Any, None, None]) -> Generator[Any, None, None]:
        """``chunks`` (a blocking stream), given up on at the deadline.

        The caller's thread reads them when the chain's models end their own calls at the
        deadline (see `bounded`); the deadline is also checked before each chunk.
        """
        in_thread = not self.spec.deadline_in_transport
        return _deadline.iterate(chunks, self.deadline_at, self.deadline_error, in_thread=in_thread)

    def abounded(self) -> AbstractAsyncContextManager[None]:
        """A block cancelled at the deadline, which then raises `TurnDeadlineError`."""
        return _deadline.abounded(self.deadline_at, self.deadline_error)

    def bounded_effect(self, effect: Effect) -> Effect:
        """``effect`` (a model call), given up on at the deadline (`bounded`, `abounded`)."""
        return Do(lambda: self.bounded(effect.run), lambda: self._abounded_run(effect))

    async def _abounded_run(self, effect: Effect) -> Any:
        async with self.abounded():
            return await effect.arun()

    def end(self) -> None:
        """The turn is over: record what the endpoint billed if nothing else did, give back
        its budget hold, and shut out a worker it abandoned. Every turn ends here (or in
        `aend`): one flow, `end_flow`."""
        run(self.end_flow())

    async def aend(self) -> None:
        """`end` for async callers."""
        await arun(self.end_flow())

    def end_flow(self) -> Flow[None]:
        """`end`, as a flow (see `_flow`); the turn's hooks are told it ended."""
        return _hooking.ending(self, self._end_flow())

    def _end_flow(self) -> Flow[None]:
        yield from _holding(self._ending)
        try:
            self._ended = True
        finally:
            self._ending.release()
        try:
            entry = self._unmetered()
            if entry is not None:
                yield call(self.spec.ledger, "record", entry, release=self._hold)
                self._unmetered_recorded()
        except Exception:
            logger.exception("Session %r: the usage of a turn was not recorded", self.session_id)
        finally:
            yield from self._release_flow()
        ahead, self._ahead = self._ahead, None
        # A record whose bill is not in the ledger stays: whoever takes the session next
        # stores it as a crashed turn, with its estimated usage.
        if ahead is not None and ahead.kept and self._metered_or_unbilled():
            drop = call(ahead.store, "drop_pending", self.session_id, ahead.token)
            yield from _pending.logged(ahead, "drop", drop)

    def _metered_or_unbilled(self) -> bool:
        """Whether the ledger has all the endpoint billed for the turn (or it billed nothing)."""
        return self._metered or not (self.handler.successful_requests or self.has_reply)

    # Whatever fails between a call's reply and the turn's commit (a notice, a reply that
    # cannot be merged or stored, a bug), the turn's end runs: it records the calls the
    # endpoint billed that nothing recorded yet, so the ledger never loses a call.

    def _unmetered(self) -> UsageEntry | None:
        """The entry of the turn's billed calls when nothing recorded them, else ``None``."""
        if self._metered:
            return None
        if not (self.handler.successful_requests or self.has_reply):
            return None  # nothing was sent, or the endpoint refused it: nothing billed
        try:
            reply = self.streamed_reply()
        except Exception:
            reply = AIMessage(content="")
        return self._entry(reply)

    def _unmetered_recorded(self) -> None:
        self._hold, self._metered = None, True
        logger.error(
            "Session %r: the turn failed after the endpoint billed it; its usage was recorded, "
            "its messages were not stored.",
            self.session_id,
        )

    def storable(self, reply: BaseMessage) -> BaseMessage:
        """``reply`` as a store can keep it: invalid code points replaced by U+FFFD.

        Model output is data the user paid for: a lone surrogate (half an emoji, from a proxy
        that cut a reply mid-pair) must not lose the turn. The notice says it was replaced.
        """
        update: dict[str, Any] = {}
        replaced = 0
        for name in _REPLY_FIELDS:
            value = getattr(reply, name, None)
            fixed, count = _valid_unicode(value)
            if fixed is not value:
                update[name] = fixed
                replaced += count
        if not update:
            return reply
        if not replaced:  # only split pairs, now joined: nothing was lost
            return reply.model_copy(update=update)
        self.notice(
            f"The reply held {replaced} invalid code point(s) (a lone surrogate, e.g. half an "
            "emoji), which no store can keep as text; it was stored with each replaced by "
            "U+FFFD (\ufffd)."
        )
        return reply.model_copy(update=update)

    def add_chunk(self, chunk: Any) -> None:
        """Fold one streamed chunk into the reply."""
        if not isinstance(chunk, AIMessageChunk):
            return
        if self.first_token_s is None and chunk.content:
            self.first_token_s = time.perf_counter() - self.started
            _hooking.first_token(self)
        self._reply.add(chunk)

    @property
    def has_reply(self) -> bool:
        """Whether the turn has something to keep if it is interrupted now."""
        return bool(self._reply or self.steps or self._open)

    # -- the tool exchange ------------------------------------------------------------------

    def open_step(self, reply: AIMessage) -> AIMessage:
        """The model asked for tools in ``reply``: its results are collected until `close_step`."""
        message = self.storable(reply)
        assert isinstance(message, AIMessage)
        _hooking.model_ended(self, message)
        self._open = (message, {})
        self._reply = _streaming.StreamedReply(self.text)  # the next call's chunks, next reply
        return message

    def close_step(self) -> list[BaseMessage]:
        """The step's AI message and its results (in the order of its calls), now kept."""
        assert self._open is not None
        step = self._exchange()
        self.steps += step
        self._open = None
        # The step's calls in the order the model made them, not the order they ended in.
        order = {m.tool_call_id: i for i, m in enumerate(step) if isinstance(m, ToolMessage)}
        ran = len(step) - 1
        self.tool_calls[-ran:] = sorted(self.tool_calls[-ran:], key=lambda c: order.get(c.id, ran))
        return step

    def _exchange(self) -> list[BaseMessage]:
        """The open step, every call answered: those still running by an interrupted result."""
        if self._open is None:
            return []
        message, results = self._open
        answered: list[BaseMessage] = [message]
        for request in [*message.tool_calls, *message.invalid_tool_calls]:
            call_id = str(request.get("id") or "")
            result = results.get(call_id) or ToolMessage(
                INTERRUPTED, tool_call_id=call_id, name=request.get("name"), status="error"
            )
            answered.append(result)
        return answered

    def tool_started(self, request: Mapping[str, Any]) -> ToolStarted:
        args = request.get("args")
        event = ToolStarted(
            str(request.get("id") or ""),
            str(request.get("name") or ""),
            dict(args) if isinstance(args, dict) else {},
        )
        self._tell(event)
        return event

    def tool_finished(self, call: ToolCall, message: ToolMessage) -> ToolFinished:
        if self._open is not None:
            self._open[1][call.id] = message
        self.tool_calls.append(call)
        event = ToolFinished(call)
        self._tell(event)
        return event

    def _tell(self, event: ToolEvent) -> None:
        _hooking.tool_event(self, event)
        if self.on_tool is not None:
            self.on_tool(event)

    def final(self, reply: BaseMessage) -> BaseMessage:
        """The final reply, without tool calls (a model called without tools may still make
        some up, which nothing would answer)."""
        if self.spec.tools is None or not isinstance(reply, AIMessage):
            return reply
        if not (reply.tool_calls or reply.invalid_tool_calls):
            return reply
        kwargs = {k: v for k, v in reply.additional_kwargs.items() if k != "tool_calls"}
        return reply.model_copy(
            update={"tool_calls": [], "invalid_tool_calls": [], "additional_kwargs": kwargs}
        )

    def streamed_reply(self) -> BaseMessage:
        """The reply assembled from the streamed chunks, as a store can keep it."""
        if not self._reply:
            return AIMessage(content="")
        return self.storable(self.final(self._reply.message()))

    def partial_reply(self, reason: str) -> AIMessage:
        """What arrived before the stream stopped, marked as interrupted."""
        reply = self.streamed_reply()
        metadata = {**reply.response_metadata, "interrupted": True, "interrupted_reason": reason}
        return AIMessage(
            content=reply.content,
            id=reply.id,
            response_metadata=metadata,
            usage_metadata=getattr(reply, "usage_metadata", None),
        )

    # -- budget ---------------------------------------------------------------------------

    def sending(self, count_prompt: Callable[[], int]) -> None:
        """The prompt is about to go out: check the budget and hold what it may cost.

        The hold covers the prompt and the ``max_tokens`` the call is then sent with
        (`reply_limit`): the reply cap, or what the remaining budget can pay for if less.
        ``count_prompt`` counts the prompt's tokens; it is kept to estimate the usage of a
        stream that stops before the endpoint reports it.

        Raises:
            BudgetExceeded: Not even `MIN_REPLY_TOKENS` of reply fit a cap; nothing is sent.
            TurnDeadlineError: The turn is over (this is a worker it abandoned); nothing is sent.
        """
        run(self.sending_flow(count_prompt))

    async def asending(self, count_prompt: Callable[[], int]) -> None:
        """`sending` for async callers."""
        await arun(self.sending_flow(count_prompt))

    def sending_flow(self, count_prompt: Callable[[], int]) -> Flow[None]:
        """`sending`, as a flow (see `_flow`)."""
        if self._ended or self.expired:
            raise self.deadline_error()
        count_prompt = _pending.once(count_prompt)
        self._next_call(count_prompt)
        if self.budgeted:
            yield from self._take_hold_flow(count_prompt())
        store = _pending.store_of(self.spec)
        if store is not None:
            ahead = self._ahead = self._ahead or _pending.WriteAhead.open(self, store)
            text = self._sent(ahead)
            ahead.written((yield call(store, "write_pending", self.session_id, ahead.token, text)))
        _hooking.model_started(self)

    # -- the write-ahead record of the turn (see `_pending`) -----------------------------------

    def _sent(self, ahead: _pending.WriteAhead) -> str:
        """The record of a call about to go out: before it does, the store keeps it."""
        assert self._count_prompt is not None
        prompt, reply = self._spent
        return ahead.sending(self._count_prompt() + prompt, reply, self._hold)

    def recover(self) -> None:
        """Store first the turn a crash cut off on this session, if any (the lock is held)."""
        run(self._recover_flow())

    async def arecover(self) -> None:
        """`recover` for async callers."""
        await arun(self._recover_flow())

    def _recover_flow(self) -> Flow[None]:
        if (yield from _pending.recover_flow(self.spec, self.session_id, self.fence)):
            self.notice(_pending.RECOVERED)

    @property
    def checkpoint_due(self) -> bool:
        """Whether the reply so far should be kept in the turn's record now (cheap)."""
        ahead = self._ahead
        return ahead is not None and time.monotonic() >= ahead.due

    def checkpoint(self) -> None:
        """Keep the reply so far in the turn's record, if a checkpoint is due (cheap if not)."""
        if self.checkpoint_due:
            run(self.checkpoint_flow())

    async def acheckpoint(self) -> None:
        """`checkpoint` for async callers."""
        if self.checkpoint_due:
            await arun(self.checkpoint_flow())

    def checkpoint_flow(self) -> Flow[None]:
        """The checkpoint, once `checkpoint_due` said it is (a stream checks that per chunk
        without making a flow)."""
        ahead = self._ahead
        assert ahead is not None
        text = ahead.checkpoint(self._text_so_far())
        if text is not None:
            write = call(ahead.store, "write_pending", self.session_id, ahead.token, text)
            yield from _pending.logged(ahead, "checkpoint", write)

    def _text_so_far(self) -> str:
        return self._reply.text()

    def reply_meter(self) -> ReplyMeter:
        """A meter of this call's reply, stopping it at the reply tokens held for it."""
        assert self.reply_limit is not None
        # With tools its text has the calls' arguments too: not the turn's text then.
        text = self.text if self.spec.tools is None else None
        return ReplyMeter(self.spec.recall.counter, self.reply_limit, text)

    def cut_at_hold(self, meter: ReplyMeter) -> None:
        """The endpoint went on past what was held and the call was stopped (see
        `ReplyMeter`): it never sends its usage then, so what it billed is counted here, the
        prompt and every reply token that arrived, and metered as the call's usage."""
        prompt = self._count_prompt() if self._count_prompt is not None else 0
        usage = {
            "input_tokens": prompt,
            "output_tokens": meter.counted,
            "total_tokens": prompt + meter.counted,
        }
        model = self.spec.default_model or ""
        message = AIMessage(
            content="", usage_metadata=usage, response_metadata={"model_name": model}
        )
        self.handler.on_llm_end(LLMResult(generations=[[ChatGeneration(message=message)]]))
        self._cut_at_hold = meter.limit
        self._estimated_calls += 1

    # -- usage the endpoint did not report ------------------------------------------------

    def _next_call(self, count_prompt: Callable[[], int]) -> None:
        """A call is about to be sent: settle the one before it (a tool round's), start this."""
        if self._call is not None and len(self.steps) > self._call.steps:
            self._settle_call(self.steps[self._call.steps])
        handler = self.handler
        self._call = _Call(
            count_prompt,
            handler.prompt_tokens,
            handler.completion_tokens,
            handler.successful_requests,
            len(self.steps),
            getattr(getattr(handler, "hits", None), "calls", 0),
        )
        self._count_prompt = count_prompt
        extra = self._estimated or Estimate(0, 0, 0)
        self._spent = (
            handler.prompt_tokens + extra.prompt_tokens,
            handler.completion_tokens + extra.completion_tokens,
        )

    def _report_estimate(self, model: str | None) -> None:
        """Let the user's `get_openai_callback` see what the ledger will: once a turn."""
        if self._estimated is None or self._estimate_reported:
            return
        self._estimate_reported = True
        _metering.report_estimate(self.config, self.handler, self._estimated, model)

    def _call_output(self, reply: BaseMessage | None) -> BaseMessage | None:
        """What the latest call produced: a tool step's message, or ``reply`` if any."""
        if self._open is not None:
            return self._open[0]
        call = self._call
        if call is not None and len(self.steps) > call.steps:
            return self.steps[call.steps]
        if reply is not None and (self._reply or reply.content):
            return reply
        return None

    def _settle_call(self, output: BaseMessage | None) -> None:
        """The latest call is over, with ``output`` (``None``: it produced nothing). If the
        endpoint reported no usage for it (a stream cut before its usage chunk, or an
        endpoint that never sends one), count its prompt and output here: it was billed."""
        call, self._call = self._call, None
        if call is None or output is None or not call.unreported(self.handler):
            return
        counter = self.spec.recall.counter
        ended = self.handler.successful_requests > call.requests  # else counted as a request here
        this = Estimate(call.count_prompt(), counter([output]), 0 if ended else 1)
        was = self._estimated or Estimate(0, 0, 0)
        self._estimated = Estimate(
            was.prompt_tokens + this.prompt_tokens,
            was.completion_tokens + this.completion_tokens,
            was.requests + this.requests,
        )

    @property
    def budgeted(self) -> bool:
        """Whether any cap applies to this turn: the budget's, or the call's own."""
        return bool(self.spec.budget) or bool(self.limits)

    def _sizing(self, summary: bool = False) -> HoldSizing:
        """How this call's hold is sized (see `chatchain.budgets`). A call after tool calls
        holds what the turn's earlier calls used too; a summary call, made before them, is
        priced as the summary model."""
        spec = self.spec
        model = spec.default_model
        if summary:  # the summary model
            model = spec.recall.summary_model_name or model
        needs_price = spec.budget.needs_price or any(x.max_usd is not None for x in self.limits)
        return HoldSizing(
            self.session_id,
            self.user_id,
            (*spec.budget.limits(self.session_id, self.user_id), *self.limits),
            spec.pricer,
            model,
            needs_price,
            spec.hold_ttl,
            (0, 0) if summary else self._spent,
        )

    def _new_hold(self, prompt_tokens: int, reply_tokens: int, summary: bool = False) -> BudgetHold:
        return self._sizing(summary).hold(prompt_tokens, reply_tokens)

    def _first_hold(
        self, prompt_tokens: int, summary: bool
    ) -> tuple[BudgetHold, list[BudgetLimit]]:
        self._cut_by = None
        reply = self.spec.reply_ceiling
        if summary:  # capped at the summary call's own max_tokens
            reply = self.spec.recall.summary_reply_tokens or reply
        sizing = self._sizing(summary)
        return sizing.hold(prompt_tokens, reply), list(sizing.limits)

    def _smaller_hold(
        self, prompt_tokens: int, hold: BudgetHold, refusal: BudgetRefusal, summary: bool
    ) -> BudgetHold:
        if summary:  # never cut: a summary cut short would be kept as the memory
            raise self._exceeded(refusal, hold)
        sizing = self._sizing()
        cut = sizing.smaller(prompt_tokens, hold, refusal)
        if cut is None:
            raise self._exceeded(refusal, sizing.hold(prompt_tokens, MIN_REPLY_TOKENS))
        self._cut_by = (cut.limit, cut.in_usd)
        return cut.hold

    def _held(self, hold: BudgetHold, prompt_tokens: int) -> int:
        self._hold = hold.id
        self._hold_size = (hold.tokens, hold.cost_usd)
        self.reply_limit = self._sizing().reply_tokens(hold, prompt_tokens)
        return self.reply_limit

    def _take_hold_flow(self, prompt_tokens: int, summary: bool = False) -> Flow[int]:
        """Hold what this call may cost; returns the ``max_tokens`` to send it with."""
        # A worker abandoned at the deadline must not hold, nor send, afterwards: the turn's
        # end waits for a hold being taken, then gives it back.
        yield from _holding(self._ending)
        try:
            if self._ended or self.expired:
                raise self.deadline_error()
            yield from self._release_flow()
            hold, limits = self._first_hold(prompt_tokens, summary)
            while (refusal := (yield call(self.spec.ledger, "hold", hold, limits))) is not None:
                hold = self._smaller_hold(prompt_tokens, hold, refusal, summary)
            return self._held(hold, prompt_tokens)
        finally:
            self._ending.release()

    def _exceeded(self, refusal: BudgetRefusal, hold: BudgetHold) -> BudgetExceeded:
        error = budgets.exceeded(refusal, hold, self._sent_so_far())
        logger.warning("Session %r: %s", self.session_id, error)
        return error

    def _sent_so_far(self) -> str:
        """What a refused turn had already sent (tool rounds, a summary)."""
        handler = self.handler
        calls = handler.successful_requests - getattr(handler, "hits", _NO_HITS).calls
        tokens = handler.prompt_tokens + handler.completion_tokens
        return budgets.sent_so_far(calls, tokens, self.summary_usage is not None)

    def _explain(self, reply: BaseMessage) -> None:
        """The notices of a turn's reply: cut by the budget, or billed past its hold."""
        limit = self.reply_limit
        if limit is None:
            return
        if self._cut_at_hold is not None:
            self.notice(budgets.past_hold_notice(self._cut_at_hold))
            return
        billed = self.handler.completion_tokens - self._spent[1]
        if billed > limit:
            self.notice(budgets.billed_past_notice(billed, limit))
        self._note_cut(reply)

    def _note_cut(self, reply: BaseMessage) -> None:
        """Tell the user when the budget, not their own cap, cut the reply short."""
        limit = self.reply_limit
        if limit is None or reply.response_metadata.get("finish_reason") != "length":
            return
        text = budgets.cut_notice(limit, self._cut_by, self.spec.max_tokens)
        if text is not None:
            self.notice(text)

    def release(self) -> None:
        """Give back the turn's budget hold, if it still has one (the turn failed)."""
        run(self._release_flow())

    async def arelease(self) -> None:
        """`release` for async callers."""
        await arun(self._release_flow())

    def _release_flow(self) -> Flow[None]:
        if self._hold is not None:
            hold, self._hold = self._hold, None
            yield call(self.spec.ledger, "release", hold)

    # -- the end of the turn -----------------------------------------------------------------

    def _entry(self, reply: BaseMessage) -> UsageEntry:
        """The turn's ledger entry. It never raises once the endpoint billed a call: the
        notices are written apart (a bug there costs a notice, not the entry), and should the
        entry itself fail to build, what the turn held is recorded instead."""
        _hooking.model_ended(self, reply)
        try:
            self._explain(reply)
        except Exception:
            logger.exception("Session %r: a notice of the turn failed", self.session_id)
        model = reply.response_metadata.get("model_name") or self.spec.default_model
        try:
            entry = self._metered_entry(reply, model)
        except Exception:
            logger.exception(
                "Session %r: the turn's usage could not be counted; its hold is recorded",
                self.session_id,
            )
            return replace(self._held_entry(model), id=self.entry_id)
        if self._estimated_calls and not entry.estimated:
            entry = replace(entry, estimated=True)
        return entry

    def _metered_entry(self, reply: BaseMessage, model: str | None) -> UsageEntry:
        self._settle_call(self._call_output(reply))
        self._report_estimate(model)
        entry = _metering.entry_from(
            self.handler,
            session_id=self.session_id,
            user_id=self.user_id,
            model=model,
            pricer=self.spec.pricer,
            latency_s=time.perf_counter() - self.started,
            first_token_s=self.first_token_s,
            estimate=self._estimated,
            configured_model=self.spec.default_model,
        )
        return replace(entry, id=self.entry_id)  # the id its write-ahead record names

    def _held_entry(self, model: str | None) -> UsageEntry:
        """What the turn's hold covered, as an estimated entry (the last resort of `_entry`)."""
        tokens, usd = self._hold_size
        counted = self.handler.prompt_tokens + self.handler.completion_tokens
        return UsageEntry(
            self.session_id,
            model=model,
            prompt_tokens=self.handler.prompt_tokens,
            completion_tokens=max(0, tokens - self.handler.prompt_tokens),
            total_tokens=max(tokens, counted),
            requests=max(1, self.handler.successful_requests),
            cost_usd=usd if self.budgeted else None,
            estimated=True,
            user_id=self.user_id,
        )

    def _recorded(self, entry: UsageEntry, reply: BaseMessage) -> list[BaseMessage]:
        self.entry = entry
        self.usage = entry.usage()
        return [*self.input_messages, *self.steps, *self._exchange(), reply]

    def save(self, reply: BaseMessage) -> None:
        """Store the turn, record its usage and end its budget hold, in one atomic write.

        The write is fenced by the session's lock (`fence`): if the turn lost it, the store
        keeps the usage (the endpoint billed it) but not the messages, and this raises.

        Raises:
            SessionLockLostError: Another turn took the session; the reply was not saved.
        """
        run(self.save_flow(reply))

    async def asave(self, reply: BaseMessage) -> None:
        """`save` for async callers."""
        await arun(self.save_flow(reply))

    def save_flow(self, reply: BaseMessage) -> Flow[None]:
        """`save`, as a flow (see `_flow`); the turn's hooks are told of the commit."""
        return _hooking.committing(self, reply, self._save_flow(reply))

    def _save_flow(self, reply: BaseMessage) -> Flow[None]:
        """`save`, as a flow (see `_flow`)."""
        entry = self._entry(reply)
        messages = self._recorded(entry, reply)
        store = self.spec.store
        # The hold stays the turn's until the write that ends it succeeds: should it fail,
        # the turn's end still gives it back (see `release`) instead of stranding it.
        if store is not None and self.spec.ledger.store is store:
            try:
                yield call(
                    store,
                    "commit_turn",
                    self.session_id,
                    messages,
                    entry,
                    release=self._hold,
                    fence=self.fence,
                )
            except SessionLockLostError as exc:
                self._hold, self._metered = None, True  # the store kept the usage
                self._lock_lost(exc)
                raise
            except StoreError as exc:  # the endpoint billed it: keep it for later
                _raise_kept((yield blocking(self._journal, messages, entry, exc)), exc)
            self._hold, self._metered = None, True
            return
        # The ledger lives elsewhere: usage first, as the endpoint has billed the call.
        try:
            yield call(self.spec.ledger, "record", entry, release=self._hold)
        except StoreError as exc:
            if store is not None:  # the messages go elsewhere: they cannot wait in the journal
                raise
            _raise_kept((yield blocking(self._journal, [], entry, exc)), exc)
        self._hold, self._metered = None, True
        if store is not None:
            yield call(store, "commit_turn", self.session_id, messages, fence=self.fence)
        else:
            yield call(self.spec.get_history(self.session_id), "add_messages", messages)

    def meter_only(self, reply: BaseMessage) -> None:
        """Record what a call cost when its reply is not kept (a structured reply that does
        not validate): the endpoint billed it. Nothing is stored in the history."""
        run(self.meter_only_flow(reply))

    async def ameter_only(self, reply: BaseMessage) -> None:
        """`meter_only` for async callers."""
        await arun(self.meter_only_flow(reply))

    def meter_only_flow(self, reply: BaseMessage) -> Flow[None]:
        """`meter_only`, as a flow (see `_flow`)."""
        entry = self._entry(reply)
        self._recorded(entry, reply)
        try:
            yield call(self.spec.ledger, "record", entry, release=self._hold)
        except StoreError as exc:
            yield blocking(self._journal_usage, entry, exc)
        self._hold, self._metered = None, True

    def record_billed(self) -> None:
        """A turn failed after tool rounds: record what its finished calls cost, store nothing.

        The endpoint billed those calls; a failed turn without tool rounds made none.
        """
        run(self.record_billed_flow())

    async def arecord_billed(self) -> None:
        """`record_billed` for async callers."""
        await arun(self.record_billed_flow())

    def record_billed_flow(self) -> Flow[None]:
        """`record_billed`, as a flow (see `_flow`)."""
        if not self.steps or self.handler.successful_requests == 0:
            return
        entry = self._billed_entry()
        try:
            yield call(self.spec.ledger, "record", entry, release=self._hold)
            self._hold, self._metered = None, True
        except StoreError as exc:  # the turn's own error is what the caller must see
            yield blocking(partial(self._journal_usage, quiet=True), entry, exc)
        except Exception:
            logger.exception(
                "Session %r: the usage of a failed turn was not recorded", self.session_id
            )

    # -- the journal: a store that fails as a billed turn is saved --------------------------

    def _keep(
        self, messages: list[BaseMessage], entry: UsageEntry, exc: StoreError
    ) -> StoreError | None:
        """Put the turn's commit in the journal: ``None`` once it is there, else the error.

        The hold goes with it (the replay ends it, else it expires): until the turn is in
        the ledger, the hold is what counts its cost against the caps.
        """
        journal = self.spec.journal
        if journal is None or self.spec.ledger.store is not journal.store:
            return exc
        try:
            journal.add(JournaledTurn(self.session_id, messages, entry, self._hold))
        except (OSError, sqlite3.Error) as failure:
            return self._not_journaled(journal, entry, exc, failure)
        self._hold, self._metered = None, True  # the journal keeps its bill
        return None

    def _journal(
        self, messages: list[BaseMessage], entry: UsageEntry, exc: StoreError
    ) -> StoreError:
        """Keep the finished turn in the journal; the error that tells the user so."""
        error = self._keep(messages, entry, exc)
        if error is not None:
            return error
        assert self.spec.journal is not None
        path = self.spec.journal.path
        reply = next((m for m in reversed(messages) if m.type == "ai"), None)
        cost = "" if entry.cost_usd is None else f", {format_usd(entry.cost_usd)}"
        message = (
            f"The reply on session {self.session_id!r} was delivered and billed "
            f"({entry.total_tokens:,} tokens{cost}), but the store could not save the turn: "
            f"{exc} The turn ({'its messages and ' if messages else ''}its usage) is kept "
            f"in the journal {path} and will be saved to the store once it is reachable "
            "again (at the session's next turn, or after any other turn): do not send the "
            "message again. The reply is in this error's `reply` attribute."
        )
        logger.error("Session %r: %s", self.session_id, message)
        return TurnJournaledError(
            message,
            session_id=self.session_id,
            reply=_text_of(reply) if reply is not None else "",
            journal=str(path),
            entry_id=entry.id,
        )

    def _journal_usage(self, entry: UsageEntry, exc: StoreError, *, quiet: bool = False) -> None:
        """Keep the usage of a call whose reply is not stored; raise if it cannot be kept
        (unless ``quiet``: the turn's own error is what the caller must see)."""
        error = self._keep([], entry, exc)
        if error is None:
            logger.warning(
                "Session %r: the usage of a billed call could not be recorded (%s); it is kept "
                "in the journal %s until the store can take it.",
                self.session_id,
                exc,
                self.spec.journal.path if self.spec.journal else None,
            )
            return
        if not quiet:
            _raise_kept(error, exc)
        logger.error("Session %r: the usage of a failed turn was not recorded", self.session_id)

    def _not_journaled(
        self, journal: Journal, entry: UsageEntry, exc: StoreError, failure: Exception
    ) -> StoreError:
        # The last place the bill can go: the log (the entry holds no message text).
        logger.error(
            "Session %r: a billed turn could be neither saved (%s) nor journaled in %s (%s). "
            "Its usage entry: %s",
            self.session_id,
            exc,
            journal.path,
            failure,
            entry.to_json(),
        )
        return StoreError(
            f"{exc} The turn could not be kept in the journal {journal.path} either "
            f"({failure}): its usage entry was written to the log. Make "
            f"{journal.path.parent} writable, or set CHATCHAIN_JOURNAL to a folder that is."
        )

    def replay(self) -> None:
        """Save the session's journaled turns first, under its lock (before its history is
        read, so that they come before this turn).

        Raises:
            StoreError: The store still fails them (nothing was sent).
        """
        run(self._replay_flow())

    async def areplay(self) -> None:
        """`replay` for async callers."""
        await arun(self._replay_flow())

    def _replay_flow(self) -> Flow[None]:
        _hooking.turn_started(self)  # the first step under the lock, on every entry point
        if self.spec.journal is not None and self.spec.store is not None:
            yield call(self.spec.journal, "replay", self.session_id, self.fence)

    def replay_others(self) -> None:
        """The turn went well, so the store is up: save other sessions' journaled turns, in
        a thread (each takes its session's lock, which a long turn may hold)."""
        if self.spec.journal is not None:
            replay_in_background(self.spec.journal)

    def _billed_entry(self) -> UsageEntry:
        model = next(
            (m.response_metadata.get("model_name") for m in self.steps if m.type == "ai"), None
        )
        self._settle_call(self._call_output(None))
        self._report_estimate(model or self.spec.default_model)
        entry = _metering.entry_from(
            self.handler,
            session_id=self.session_id,
            user_id=self.user_id,
            model=model or self.spec.default_model,
            pricer=self.spec.pricer,
            latency_s=time.perf_counter() - self.started,
            estimate=self._estimated,
            configured_model=self.spec.default_model,
        )
        entry = replace(entry, id=self.entry_id)
        self.entry, self.usage = entry, entry.usage()
        return entry

    def _lock_lost(self, exc: SessionLockLostError) -> None:
        logger.error("Session %r: %s", self.session_id, exc)

    def summarize(self) -> None:
        """Fold old turns into the running summary first, if due (a separate metered call).

        Raises:
            BudgetExceeded: The summary call could pass a cap (the turn would too).
        """
        run(self._summarize_flow())

    async def asummarize(self) -> None:
        """`summarize` for async callers."""
        await arun(self._summarize_flow())

    def _summarize_flow(self) -> Flow[None]:
        store = self.spec.store
        if store is None:
            return
        check = self._summary_check if self.budgeted else None
        try:
            summary = yield from self.spec.recall.summary_flow(
                store, self.session_id, check, self.bounded_effect
            )
        except (BudgetExceeded, ConfigurationError, TurnDeadlineError):
            raise
        except Exception as exc:  # the turn can go on without a fresher summary
            yield from self._release_flow()
            self._summary_failed(exc)
            return
        if summary is not None:
            yield call(self.spec.ledger, "record", self._summary_entry(summary), release=self._hold)
            self._hold = None

    def _summary_check(self, request: list[BaseMessage]) -> Flow[int]:
        return self._take_hold_flow(self.spec.recall.counter(request), summary=True)

    def _summary_entry(self, call: SummaryCall) -> UsageEntry:
        entry = _metering.entry_from(
            call.handler,
            session_id=self.session_id,
            user_id=self.user_id,
            model=call.model or self.spec.default_model,
            pricer=self.spec.pricer,
            latency_s=call.latency_s,
            summary=True,
            configured_model=self.spec.recall.summary_model_name or self.spec.default_model,
        )
        self.summary_usage = entry.usage()
        return entry

    def _summary_failed(self, exc: Exception) -> None:
        error = self.spec.describe_failure(exc) or exc
        self.notices.append(
            f"The running summary could not be updated ({error}); "
            "the turn went on with the window alone."
        )
        logger.warning("Summary on session %r failed: %s", self.session_id, error)

    def notice(self, text: str) -> None:
        """Tell the user something about this turn (kept on the reply, and logged)."""
        self.notices.append(text)
        logger.warning("Session %r: %s", self.session_id, text)

    def failure(self, exc: BaseException) -> Exception | None:
        """The chatchain error for a failure of the endpoint, or ``None`` to re-raise as is."""
        _hooking.model_failed(self, exc)
        error = self.spec.describe_failure(exc)
        if error is not None and not isinstance(error, BudgetExceeded):  # logged when refused
            logger.warning("Turn on session %r failed: %s", self.session_id, error)
        return error

    def failed_flow(self, exc: BaseException, error: Exception | None) -> Flow[None]:
        """A turn that failed, streamed or not: what it has (text, tool rounds) is kept with
        the user's message, the reply marked interrupted (tools that ran are not run again by
        a retry); so is the message when the failure is not an error (the process is being
        stopped). Else nothing is stored and what the endpoint billed is recorded."""
        if not (self.has_reply or not isinstance(exc, Exception)):
            yield from self.record_billed_flow()
            return
        self.log_interrupted(type(exc).__name__)
        try:
            yield from self.save_flow(self.partial_reply(str(error or type(exc).__name__)))
        except StoreError:  # the turn's own error is what the caller must see
            logger.exception(
                "Session %r: the interrupted turn was not stored (see the journal)",
                self.session_id,
            )

    def log_interrupted(self, reason: str) -> None:
        logger.info(
            "Turn on session %r interrupted (%s); partial reply kept.", self.session_id, reason
        )


def _holding(lock: threading.Lock) -> Flow[None]:
    """Take ``lock``: at once when it is free (the common case), else waiting in a thread
    (an async caller must not block its event loop; see `_acquire`)."""
    if not lock.acquire(blocking=False):
        yield Do(lock.acquire, partial(_acquire, lock))


async def _acquire(lock: threading.Lock) -> bool:
    """Wait for ``lock`` in a thread; a cancelled wait gives it back once the thread has it."""
    waiting = asyncio.ensure_future(asyncio.to_thread(lock.acquire))
    try:
        return await asyncio.shield(waiting)
    except asyncio.CancelledError:
        waiting.add_done_callback(lambda _: lock.release())
        raise


def _raise_kept(error: StoreError, exc: StoreError) -> NoReturn:
    """Raise what `Turn._journal` made of the store's failure ``exc``."""
    if error is exc:  # there is no journal: the store's own error, as it was
        raise exc
    raise error from exc


class ReplyMeter:
    """Counts a streamed reply's tokens as they arrive, to stop reading at the budget hold.

    An endpoint that ignores ``max_tokens`` (some proxies and local servers do) would bill a
    reply of any length: the call's hold must bound it all the same. A chunk that brings more
    text once the count has passed the held reply tokens is the proof: the reply is read no
    further (at most one chunk past the hold was generated, and it is counted). Text is not
    refused before that point, so an endpoint that honours ``max_tokens`` is not cut where
    the counter agrees with it; its last chunks (finish reason, usage) carry no text and
    always pass.

    The count is the sum of each chunk's count plus one (cheap, and not below the count of
    the whole: a counter rounds each piece, and a token may span two chunks); once it passes
    the limit the whole text so far is counted again, so that this margin does not stop a
    reply early. The count of the whole is what the call is metered with when it is cut.
    """

    def __init__(
        self, counter: TokenCounter, limit: int, text: _streaming.SharedText | None = None
    ) -> None:
        self.counter = counter
        self.limit = limit
        self.counted = 0
        # The reply's text (in the turn's ``text`` while it is the same), counted again whole
        # once past the hold.
        self._text = _streaming.TextBuffer(text)
        self._empty = counter([AIMessage(content="")])

    def _count(self, text: str) -> int:
        return max(0, self.counter([AIMessage(content=text)]) - self._empty)

    def _bound(self, text: str) -> int:
        """Not below what ``text`` adds to the count of the text before it."""
        return self._count(text) + 1

    def past_hold(self, chunk: Any) -> bool:
        """Whether ``chunk`` brings text beyond the hold (then it is not read)."""
        text = _chunk_text(chunk)
        if not text:
            return False
        self._text.write(text)
        if self.counted > self.limit:  # it was generated, so billed: count it too
            self.counted = self._count(self._text.getvalue())
            return True
        self.counted += self._bound(text)
        if self.counted > self.limit:
            self.counted = self._count(self._text.getvalue())
        return False


def _chunk_text(chunk: Any) -> str:
    """The text a chunk adds to the reply: its content and its tool calls' arguments."""
    if not isinstance(chunk, AIMessageChunk):
        return ""
    calls = "".join(str(call.get("args") or "") for call in chunk.tool_call_chunks)
    return chunk.text + calls


def _cut_chunk() -> AIMessageChunk:
    """The last chunk of a reply stopped at its hold: marks it cut (``finish_reason``)."""
    return AIMessageChunk(
        content="", response_metadata={"finish_reason": "length", CUT_AT_HOLD: True}
    )


class BudgetedModel(Runnable[Any, Any]):
    """The chat model, sent with the ``max_tokens`` its turn's budget hold allows.

    The turn is found in the run's configurable (`TURN_KEY`); without one, or without a
    budget, the model is called as it is. Under a budget the reply is read only up to what
    was held (`ReplyMeter`), for endpoints that ignore ``max_tokens``: a budgeted call is
    therefore always streamed, ``invoke`` included (its chunks are merged into the reply it
    returns), since a reply sent whole cannot be stopped and would be billed whole.
    """

    def __init__(self, model: Runnable[Any, Any]) -> None:
        self.model = model

    @staticmethod
    def _turn(config: RunnableConfig | None) -> Turn | None:
        turn = (config or {}).get("configurable", {}).get(TURN_KEY)
        return turn if isinstance(turn, Turn) and turn.reply_limit is not None else None

    @staticmethod
    def _limited(turn: Turn | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments, with the ``max_tokens`` of its hold (an argument of the call
        rather than a binding: the response cache's key then has it however it is called)."""
        if turn is None or turn.reply_limit is None:
            return kwargs
        return {**kwargs, "max_tokens": turn.reply_limit}

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        if self._turn(config) is None:
            return self.model.invoke(input, config, **kwargs)
        return _streaming.merged(self.stream(input, config, **kwargs))

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        if self._turn(config) is None:
            return await self.model.ainvoke(input, config, **kwargs)
        reply = _streaming.StreamedReply()
        async for chunk in self.astream(input, config, **kwargs):
            if isinstance(chunk, AIMessageChunk):
                reply.add(chunk)
        return reply.message()

    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        turn = self._turn(config)
        # Through `_streaming`: the model's chunks are not kept (by langchain-core) either.
        inner = _streaming.stream(self.model, input, config, **self._limited(turn, kwargs))
        if turn is None:
            yield from inner
            return
        meter = turn.reply_meter()
        try:
            for chunk in inner:
                if meter.past_hold(chunk):
                    break
                yield chunk
            else:
                return
        finally:
            inner.close()  # type: ignore[attr-defined]
        turn.cut_at_hold(meter)
        yield _cut_chunk()

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        turn = self._turn(config)
        inner = _streaming.astream(self.model, input, config, **self._limited(turn, kwargs))
        if turn is None:
            async for chunk in inner:
                yield chunk
            return
        meter = turn.reply_meter()
        try:
            async for chunk in inner:
                if meter.past_hold(chunk):
                    break
                yield chunk
            else:
                return
        finally:
            await inner.aclose()  # type: ignore[attr-defined]
        turn.cut_at_hold(meter)
        yield _cut_chunk()
