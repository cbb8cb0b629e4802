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

import logging
import threading
import time
import unicodedata
from collections.abc import (
    Callable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from uuid import uuid4

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config, merge_configs

from chatchain import (
    _endpoint_errors,
    _hooking,
    _metering,
    _pending,
    _streaming,
    budgets,
)
from chatchain._flow import Flow, arun, call, run
from chatchain._hooking import HookList
from chatchain._journal import Journal
from chatchain._metering import Estimate
from chatchain._tools import INTERRUPTED, Toolbox, ToolEvent, ToolFinished, ToolRun, ToolStarted
from chatchain._turn_commit import TurnCommit, text_of
from chatchain._turn_money import CUT_AT_HOLD, TURN_KEY, BudgetedModel, _Call, holding
from chatchain._turn_summary import TurnSummary
from chatchain.budgets import (
    DEFAULT_REPLY_LIMIT,
    Budget,
    BudgetLimit,
)
from chatchain.errors import (
    BudgetExceeded,
    InvalidInputError,
    MissingPromptVariableError,
    StoreError,
)
from chatchain.pricing import Pricer
from chatchain.stores import Fence, HistoryStore
from chatchain.usage import Usage, UsageEntry, UsageLedger
from chatchain.window import Recall

__all__ = [
    "CUT_AT_HOLD",
    "MAX_SESSION_ID_LENGTH",
    "TURN_KEY",
    "BudgetedModel",
    "Turn",
    "TurnSpec",
    "validate_session_id",
]

logger = logging.getLogger("chatchain")

MAX_SESSION_ID_LENGTH = 256
"""The most characters a session id (or a user id) may have (see `validate_session_id`)."""

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
                _validate_text(text_of(message), "message")
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


@dataclass
class Turn(TurnCommit, TurnSummary):
    """One open turn: its session, config (with its usage handler) and what it produced.

    Here: the turn's state, its reply (text, tool rounds, write-ahead record) and its
    lifecycle (`open_flow`, `sending_flow`, `failed_flow`, `end_flow`). Each other concern
    is a base class in a module of its own: `_turn_deadline.TurnDeadline` (the deadline and
    the calls it bounds); built on it, `_turn_money.TurnMoney` (budget holds, usage the
    endpoint did not report, a reply cut at its hold); built on that,
    `_turn_commit.TurnCommit` (the ledger entry, the commit, the journal) and
    `_turn_summary.TurnSummary` (the running summary). They are parts of one object rather
    than collaborators it holds because they share most of its state (the hold, the usage
    handler, the steps, the reply): each declares what of it it uses, under
    ``TYPE_CHECKING``, and the fields stay here, in one dataclass.
    """

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
    cap, or less when that is all the remaining budget can pay for. Without a budget: the
    call's own ``max_tokens`` (`ModelOptions`, under the deployment's cap), else ``None``."""
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
    tool_runs: list[ToolRun] = field(default_factory=list)
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

    # -- the end of the turn -----------------------------------------------------------------

    def end(self) -> None:
        """The turn is over: record what the endpoint billed if nothing else did, give back
        its budget hold, and shut out a worker it abandoned. Every turn ends in one flow,
        `end_flow` (this drives it for sync callers)."""
        run(self.end_flow())

    def end_flow(self) -> Flow[None]:
        """`end`, as a flow (see `_flow`); the turn's hooks are told it ended."""
        return _hooking.ending(self, self._end_flow())

    def _end_flow(self) -> Flow[None]:
        yield from holding(self._ending)
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
        self.tool_runs[-ran:] = sorted(self.tool_runs[-ran:], key=lambda c: order.get(c.id, ran))
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

    def tool_finished(self, call: ToolRun, message: ToolMessage) -> ToolFinished:
        if self._open is not None:
            self._open[1][call.id] = message
        self.tool_runs.append(call)
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
        elif self.asked_tokens is not None:  # no hold, yet the call's own cap bounds the reply
            self.reply_limit = self.reply_cap
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

    # -- notices and failures ------------------------------------------------------------

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
