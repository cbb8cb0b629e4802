"""The chain factory: prompt → chat model, wrapped in `RunnableWithMessageHistory`.

`ChatChain` is a `RunnableWithMessageHistory` whose entry points each run one *turn*: the input
is validated, the session is locked, every token is metered, and the history is written once,
by chatchain, when the turn ends. LangChain's own save (a listener that fires only when a run
ends well) is turned off, so that streamed, failed and interrupted turns follow the same path
as plain ones. Each turn is bounded by its deadline (``CHATCHAIN_TURN_DEADLINE``, see `_turn`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, NoReturn

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import BaseMessage
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import Runnable, RunnableConfig, RunnableSequence
from langchain_core.tracers.schemas import Run
from pydantic import BaseModel, PrivateAttr

from chatchain import _cache, _endpoint_errors, _flow, _streaming
from chatchain._flow import END, Do, Flow, Pull, arun, call, run
from chatchain._hooking import HookList, as_hooks
from chatchain._journal import journal_for
from chatchain._locks import SessionLocks
from chatchain._options import ModelOptions, options_of
from chatchain._runnable_history import HistoryRunnable
from chatchain._structured import StructuredChain, StructuredModel, schema_of
from chatchain._tokens import TokenCounter, choose_counter
from chatchain._tools import Toolbox, ToolEvent, ToolFinished, ToolLoop, ToolStarted, bind_tools
from chatchain._turn import TURN_KEY, BudgetedModel, Turn, TurnSpec
from chatchain.budgets import Budget
from chatchain.errors import ContextTooLongError, InvalidInputError
from chatchain.hooks import TurnHooks
from chatchain.model import (
    bounds_its_deadline,
    create_chat_model,
    create_summary_model,
    prepare_chat_model,
)
from chatchain.prompt import create_prompt, prompt_variables
from chatchain.settings import Settings
from chatchain.stores import Fence, HistoryBackend, HistoryStore, MemoryStore, as_store
from chatchain.usage import UsageLedger
from chatchain.window import HistoryWindow, Recall, halved, unwindowed

__all__ = ["ChatChain", "create_chat_chain", "get_message_history"]

logger = logging.getLogger("chatchain")

# A turn's `_Sent`, in the run's configurable.
_SENT = "chatchain_sent_history"


@dataclass
class _Sent:
    """The history a turn's last attempt sent, and what its retry after an overflow sends.

    A retry must send less than the request that overflowed, whatever the window chose (the
    window's own limits can select the same messages again): `halved` of what was sent.
    """

    history: list[BaseMessage] = field(default_factory=list)
    retry: list[BaseMessage] | None = None


# The default store of `get_message_history`: one history per session id, for the whole process.
_default_store = MemoryStore()


def get_message_history(session_id: str) -> BaseChatMessageHistory:
    """The `ChatMessageHistory` of ``session_id`` in the process-wide default store.

    Example:
        >>> get_message_history("a-new-session").messages
        []
    """
    return _default_store(session_id)


class ChatChain(HistoryRunnable):
    """The conversational chain: a `RunnableWithMessageHistory` that meters, locks and saves.

    Build it with `create_chat_chain`. It is called like any LangChain runnable, with the
    session id in the config; ``invoke``, ``stream``, ``batch`` and their async twins all run
    through the same turn bookkeeping.
    """

    _spec: TurnSpec = PrivateAttr()
    _inner: Runnable[Any, Any] = PrivateAttr()
    _lock: Callable[[str], AbstractContextManager[Fence | None]] = PrivateAttr()
    _alock: Callable[[str], AbstractAsyncContextManager[Fence | None]] = PrivateAttr()
    _closers: list[Callable[[], None]] = PrivateAttr(default_factory=list)

    def __init__(
        self,
        runnable: Runnable[Any, Any],
        get_session_history: Callable[[str], BaseChatMessageHistory],
        *,
        spec: TurnSpec,
        input_key: str,
        history_key: str | None,
        locks: SessionLocks | HistoryStore,
    ) -> None:
        super().__init__(
            runnable,
            get_session_history,
            input_messages_key=input_key,
            history_messages_key=history_key,
        )
        self._spec = spec
        self._inner = runnable
        if isinstance(locks, HistoryStore):
            self._lock, self._alock = locks.lock, locks.alock
        else:
            self._lock, self._alock = locks.locked, locks.alocked

    @property
    def prompt(self) -> ChatPromptTemplate:
        """The chat prompt: system message, history placeholder, human slot."""
        prompt = getattr(self._inner, "first", None)
        assert isinstance(prompt, ChatPromptTemplate)
        return prompt

    @property
    def model(self) -> Runnable[Any, Any]:
        """The chat model (with its fallback, if any)."""
        model = getattr(self._inner, "last", self._inner)
        model = model.step if isinstance(model, StructuredModel) else model
        model = model.model if isinstance(model, ToolLoop) else model
        model = model.model if isinstance(model, BudgetedModel) else model
        return model.bound if isinstance(model, _cache.Uncached) else model

    @property
    def tools(self) -> list[Any]:
        """The tools the model may call in a turn (LangChain tools), or ``[]``."""
        toolbox = self._spec.tools
        return [] if toolbox is None else list(toolbox.tools.values())

    @property
    def token_counter(self) -> str:
        """Which token counter the holds and the window use: ``"o200k_base"`` or
        ``"cl100k_base"`` (exact), ``"utf8-bytes"`` (a bound) or ``"approximate"``."""
        return self._spec.recall.counter.name

    @property
    def window(self) -> HistoryWindow | None:
        """What of the history each turn sends (``None``: all of it)."""
        return self._spec.recall.window

    @property
    def ledger(self) -> UsageLedger:
        """Usage totals per session of every turn this chain ran."""
        return self._spec.ledger

    def with_structured_output(self, schema: type[BaseModel]) -> Runnable[Any, Any]:
        """This chain, answering each turn with a validated instance of ``schema``.

        The turn runs as usual (history, window, lock, metering); the model is asked for the
        schema with ``with_structured_output`` (json_schema, or function calling for an
        endpoint that refuses it), the reply is stored as its JSON text, and ``invoke`` /
        ``ainvoke`` return the instance.

        Raises:
            InvalidInputError: ``schema`` is not a pydantic model class.
            StructuredReplyError: (when invoked) The reply does not fit the schema; nothing
                was stored.

        Example:
            >>> from pydantic import BaseModel
            >>> from chatchain.testing import FakeChatModel
            >>> class City(BaseModel):
            ...     name: str
            >>> chain = create_chat_chain(FakeChatModel(replies=['{"name": "Oslo"}']))
            >>> chain.with_structured_output(City).invoke(
            ...     {"input": "Capital of Norway?"}, config={"configurable": {"session_id": "c"}})
            City(name='Oslo')
        """
        return StructuredChain(self, schema)

    def close(self) -> None:
        """Close what `create_chat_chain` opened for this chain: the response cache's file or
        connections (``CHATCHAIN_CACHE``). Idempotent; also ``with create_chat_chain(...)``.

        The history store is not the chain's: whoever opened it closes it (`Chatbot.close`
        closes its own). HTTP connections to the endpoint are pooled for the process (and
        for each event loop) and shared by every chain; they close with the loop, or at exit.
        """
        for close in self._closers:
            close()

    def __enter__(self) -> ChatChain:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # LangChain's save-on-success listeners are not attached (see `_runnable_history`); should
    # a future version call them anyway, they must not save a second time.
    def _exit_history(self, run: Run, config: RunnableConfig) -> None:
        return None

    async def _aexit_history(self, run: Run, config: RunnableConfig) -> None:
        return None

    def _begin(self, value: Any, config: RunnableConfig | None) -> Turn:
        options = options_of(config)
        if options:  # tools or a format (a call's max_tokens alone works with any chain)
            self._check_options(options, config)
        turn = self._spec.begin(value, config, self._get_input_messages)
        configurable = {**turn.config.get("configurable", {}), _SENT: _Sent()}
        turn.config = {**turn.config, "configurable": configurable}
        return turn

    def _check_options(self, options: ModelOptions, config: RunnableConfig | None) -> None:
        """Refuse a call's options that cannot work with this chain (see `chatchain._options`)."""
        if options.tools and self._spec.tools is not None:
            raise InvalidInputError(
                "This chain runs tools of its own (tools=..., serve --tools), and the call "
                "sends tools of its own too: the model's calls could not be told apart. Send "
                "the call without tools, or use a chain without tools."
            )
        if schema_of(config) is not None:
            raise InvalidInputError(
                "schema= and model options (tools, response_format) cannot be used together: "
                "give the schema as response_format json_schema, or leave the options out."
            )

    # -- the history sent with a turn -----------------------------------------------------

    def _enter_history(self, value: Any, config: RunnableConfig) -> list[BaseMessage]:
        return run(self._enter_history_flow(value, config))

    async def _aenter_history(self, value: Any, config: RunnableConfig) -> list[BaseMessage]:
        return await arun(self._enter_history_flow(value, config))

    def _enter_history_flow(self, value: Any, config: RunnableConfig) -> Flow[list[BaseMessage]]:
        """The history a call is sent with (LangChain's hook, sync and async), then the
        turn's budget check with what is about to be sent."""
        configurable = config["configurable"]
        inputs = self._get_input_messages(value)
        store = self._spec.store
        sent: _Sent | None = configurable.get(_SENT)
        if sent is not None and sent.retry is not None:
            history = sent.retry
        elif store is not None:
            loaded = call(self._spec.recall, "load", store, configurable["session_id"], inputs)
            history = yield loaded
        else:
            stored = configurable["message_history"]
            messages = yield Do(lambda: stored.messages, stored.aget_messages)
            history = self._window(messages, inputs)
        if sent is not None:
            sent.history = history
        history = history if self.history_messages_key else history + inputs
        turn = configurable.get(TURN_KEY)
        if turn is not None:  # the budget check, with what is about to be sent
            count = partial(self._count_prompt, value, history, schema_of(config))
            yield from turn.sending_flow(partial(count, options_of(config)))
        return history

    def _count_prompt(
        self,
        value: Any,
        history: list[BaseMessage],
        schema: type[BaseModel] | None = None,
        options: ModelOptions | None = None,
    ) -> int:
        key = str(self.history_messages_key or self.input_messages_key)
        variables = {**value, key: history} if isinstance(value, Mapping) else {key: history}
        # As the chain's prompt step will format them (`begin` refused missing variables),
        # without a run of their own in LangChain's callbacks.
        messages = self.prompt.format_messages(**variables)
        counter = self._spec.recall.counter
        if schema is not None:  # a structured turn calls no tools
            return counter(messages) + counter.count_tools([schema])
        if options is not None:  # sent the call's options instead of the chain's tools
            return counter(messages) + options.prompt_tokens(counter)
        tools = self._spec.tools
        return counter(messages) + (tools.schema_tokens(counter) if tools else 0)

    def _window(self, messages: list[BaseMessage], inputs: list[BaseMessage]) -> list[BaseMessage]:
        # A plain get_session_history callable: no windowed reads and no summary to keep.
        recall = self._spec.recall
        if recall.window is None:
            # Without a history key the input is the whole conversation (`without_memory`).
            return unwindowed(messages, inputs) if self.history_messages_key else list(messages)
        return recall.select(list(messages), None, inputs, replace(recall.window, summarize=False))

    def _retry_smaller(self, error: Exception | None, turn: Turn) -> bool:
        """Whether to retry a failed call with less history (after a context overflow).

        The retry sends `halved` of the history that overflowed, until one fits or there is
        no history left to drop (see `_final_error`).
        """
        if not isinstance(error, ContextTooLongError):
            return False
        if turn.steps or turn.tool_runs:  # tools ran: running them again could act twice
            return False
        sent: _Sent = turn.config["configurable"][_SENT]
        smaller = halved(sent.history)
        if smaller is None:
            return False
        turn.notice(
            "The conversation did not fit the model's context window; retried with the newest "
            f"{len(smaller)} of the {len(sent.history)} earlier messages sent (lower "
            "CHATCHAIN_WINDOW_TURNS or CHATCHAIN_WINDOW_TOKENS to avoid the retry)."
        )
        sent.retry = smaller
        return True

    @staticmethod
    def _final_error(error: Exception | None, turn: Turn, exc: BaseException) -> Exception | None:
        """``error``, or for an overflow that was sent with no history, an error that says so."""
        sent = turn.config["configurable"][_SENT]
        if isinstance(error, ContextTooLongError) and not sent.history and not turn.steps:
            return _endpoint_errors.overflow_without_history(exc, error)
        return error

    # -- turns -----------------------------------------------------------------------------

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Run one turn and return the reply message."""
        return self.run_turn(input, config, **kwargs)[0]

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Run one turn and return the reply message, without blocking the event loop."""
        return (await self.arun_turn(input, config, **kwargs))[0]

    def run_turn(
        self,
        value: Any,
        config: RunnableConfig | None = None,
        *,
        on_tool: Callable[[ToolEvent], None] | None = None,
        **kwargs: Any,
    ) -> tuple[BaseMessage, Turn]:
        """`invoke`, returning the reply and the finished turn (usage, notices, tool calls).

        ``on_tool`` is called with each `ToolStarted` and `ToolFinished` as it happens.
        """
        turn = self._begin(value, config)
        turn.on_tool = on_tool
        with self._lock(turn.session_id) as turn.fence:
            reply = run(self._turn_flow(turn, value, kwargs))
        turn.replay_others()
        return reply, turn

    async def arun_turn(
        self,
        value: Any,
        config: RunnableConfig | None = None,
        *,
        on_tool: Callable[[ToolEvent], None] | None = None,
        **kwargs: Any,
    ) -> tuple[BaseMessage, Turn]:
        """`ainvoke`, returning the reply and the finished turn (see `run_turn`)."""
        turn = self._begin(value, config)
        turn.on_tool = on_tool
        async with self._alock(turn.session_id) as turn.fence:
            reply = await arun(self._turn_flow(turn, value, kwargs))
        turn.replay_others()
        return reply, turn

    def _turn_flow(self, turn: Turn, value: Any, kwargs: dict[str, Any]) -> Flow[BaseMessage]:
        """One turn, under its session's lock: its call, retried with less history after a
        context overflow, then saved; its end whatever happens."""
        invoke, ainvoke = super().invoke, super().ainvoke
        try:
            yield from turn.open_flow()
            while True:  # a retry after a context overflow sends less history each time
                try:
                    reply = yield turn.bounded_effect(
                        Do(
                            lambda: invoke(value, turn.config, **kwargs),
                            lambda: ainvoke(value, turn.config, **kwargs),
                        )
                    )
                    break
                except asyncio.CancelledError:  # the task was stopped (a server's shutdown)
                    turn.log_interrupted("cancelled")  # as a stopped stream: the message kept
                    yield from turn.save_flow(turn.partial_reply("cancelled"))
                    raise
                except Exception as exc:
                    error = turn.failure(exc)
                    if not self._retry_smaller(error, turn):
                        yield from turn.failed_flow(exc, error)
                        _raise(self._final_error(error, turn, exc), exc)
            reply = turn.storable(reply)
            yield from turn.save_flow(reply)
        finally:
            yield from turn.end_flow()
        return reply

    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        """Run one turn, yielding the reply's chunks as they arrive.

        The input is checked at once; the request goes out on the first ``next()``. If the
        caller stops early, or the endpoint cuts the stream, the user's message and the partial
        reply are saved, the reply marked ``interrupted`` in its ``response_metadata``.
        """
        return self.stream_turn(input, config, **kwargs)[0]

    def stream_turn(
        self,
        value: Any,
        config: RunnableConfig | None = None,
        *,
        on_tool: Callable[[ToolEvent], None] | None = None,
        events: bool = False,
        **kwargs: Any,
    ) -> tuple[Iterator[Any], Turn]:
        """`stream`, also returning the open turn (its ``usage`` is set when the stream ends).

        With ``events`` the stream also yields each `ToolStarted` and `ToolFinished` in
        order with the chunks; ``on_tool`` is called with them as they happen.
        """
        turn = self._begin(value, config)
        turn.on_tool, turn.stream_events = on_tool, events
        return self._stream(turn, value, kwargs), turn

    def _attempts_flow(
        self, turn: Turn, value: Any, kwargs: dict[str, Any]
    ) -> Generator[Any, Any, None]:
        """The model's chunks (and tool events): "context length exceeded" before the first
        of them retries with less history. Once anything came, the caller may have shown it:
        no retry then (it would repeat it)."""
        stream, astream = super().stream, super().astream
        started = False
        while True:
            source = Pull(
                lambda: stream(value, turn.config, **kwargs),
                lambda: astream(value, turn.config, **kwargs),
            )
            try:
                while (chunk := (yield source)) is not END:
                    started = True
                    yield _streaming.unwrapped(chunk)
                return
            except Exception as exc:
                # Closed only here: a flow closed early (GeneratorExit) may be closed by the
                # garbage collector with no driver to run an effect; its stream goes with it.
                yield source.close()
                if started:
                    raise
                error = turn.failure(exc)
                if not self._retry_smaller(error, turn):
                    _raise(self._final_error(error, turn, exc), exc)

    def _stream(self, turn: Turn, value: Any, kwargs: dict[str, Any]) -> Iterator[Any]:
        with self._lock(turn.session_id) as turn.fence:
            yield from _flow.stream(self._stream_flow(turn, value, kwargs))
        turn.replay_others()

    async def _astream(self, turn: Turn, value: Any, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        async with self._alock(turn.session_id) as turn.fence:
            chunks = _flow.astream(self._stream_flow(turn, value, kwargs))
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()
        turn.replay_others()

    def _stream_flow(
        self, turn: Turn, value: Any, kwargs: dict[str, Any]
    ) -> Generator[Any, Any, None]:
        """One streamed turn, under its session's lock: the chunks for the caller, the partial
        reply saved if the caller stops early or the stream fails, its end whatever happens."""
        try:
            yield from turn.open_flow()
            source = Pull(
                lambda: turn.bounded_stream(_flow.stream(self._attempts_flow(turn, value, kwargs))),
                lambda: _abounded(turn, _flow.astream(self._attempts_flow(turn, value, kwargs))),
            )
            try:
                while (chunk := (yield source)) is not END:
                    if isinstance(chunk, (ToolStarted, ToolFinished)):
                        if not turn.stream_events:
                            continue
                    else:
                        turn.add_chunk(chunk)
                        if turn.checkpoint_due:  # no flow made for a chunk with none due
                            yield from turn.checkpoint_flow()
                    yield chunk
            except (GeneratorExit, asyncio.CancelledError):
                yield source.close()
                turn.log_interrupted("stopped by the caller")
                yield from turn.save_flow(turn.partial_reply("cancelled"))
                raise
            except BaseException as exc:
                yield source.close()
                error = turn.failure(exc) if isinstance(exc, Exception) else None
                yield from turn.failed_flow(exc, error)
                _raise(error, exc)
            yield from turn.save_flow(turn.streamed_reply())
        finally:
            yield from turn.end_flow()

    def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        """`stream` for async callers; cancelling the task counts as stopping early."""
        return self.astream_turn(input, config, **kwargs)[0]

    def astream_turn(
        self,
        value: Any,
        config: RunnableConfig | None = None,
        *,
        on_tool: Callable[[ToolEvent], None] | None = None,
        events: bool = False,
        **kwargs: Any,
    ) -> tuple[AsyncIterator[Any], Turn]:
        """`astream`, also returning the open turn (see `stream_turn`)."""
        turn = self._begin(value, config)
        turn.on_tool, turn.stream_events = on_tool, events
        return self._astream(turn, value, kwargs), turn

    def without_memory(self, *, lock_timeout: float = 120.0) -> ChatChain:
        """A twin of this chain that sends each call's messages as they are, and stores none.

        The input is the whole conversation, ``{"messages": [...]}``: no system prompt is
        added, no history is loaded, no window or summary applies and nothing is written to
        the history store. Each call is still a turn of this chain's: metered into the same
        ledger (under the call's session and user ids), held against the same budget (and the
        call's own limits), bounded by the same deadline, with the same errors. The
        OpenAI-compatible endpoint answers requests without ``X-Session-Id`` with it.

        Args:
            lock_timeout: How long a call waits for another on the same session id (give each
                call an id of its own, and none waits).

        Example:
            >>> from langchain_core.messages import HumanMessage, SystemMessage
            >>> from chatchain.testing import FakeChatModel
            >>> chain = create_chat_chain(FakeChatModel(), system="Be brief.")
            >>> bare = chain.without_memory()
            >>> config = {"configurable": {"session_id": "call-1"}}
            >>> messages = [SystemMessage("Talk like a pirate."), HumanMessage("hi")]
            >>> bare.invoke({"messages": messages}, config).content
            'Echo: hi'
            >>> bare.ledger.total("call-1").turns, chain.get_session_history("call-1").messages
            (1, [])
        """
        key = "messages"
        inner = self._inner
        model = inner.last if isinstance(inner, RunnableSequence) else inner
        spec = replace(
            self._spec,
            input_key=key,
            required_vars=frozenset(),
            get_history=_forget,
            recall=Recall(None, self._spec.recall.counter, self._spec.recall.model),
            store=None,
        )
        return ChatChain(
            ChatPromptTemplate.from_messages([MessagesPlaceholder(key)]) | model,
            _forget,
            spec=spec,
            input_key=key,
            history_key=None,
            locks=SessionLocks(lock_timeout),
        )

    def with_tool_results(self) -> ChatChain:
        """A twin of this chain whose turns take tool results as their input.

        The input (``{"input": [ToolMessage, ...]}``) answers every tool call of the
        session's last message, an AI message with ``tool_calls`` that a client's tools are to
        run (see `chatchain.ModelOptions`); it takes the place of the user's message in the
        prompt. Everything else is this chain's: the system prompt, the history and its
        window (which sends the calls and their results together), the store, the locks,
        the ledger and the budget. The turn stores the results and the reply.

        Raises:
            InvalidInputError: (when called) The results do not answer the last message's
                calls, each once.
        """
        if self.history_messages_key is None:  # the input is a list of messages already
            return self
        key = str(self.input_messages_key)
        prompt = self.prompt
        twin_prompt = ChatPromptTemplate.from_messages(
            [*prompt.messages[:-1], MessagesPlaceholder(key)]
        )
        if prompt.partial_variables:
            twin_prompt = twin_prompt.partial(**prompt.partial_variables)
        inner = self._inner
        model = inner.last if isinstance(inner, RunnableSequence) else inner
        twin = ChatChain(
            twin_prompt | model,
            self.get_session_history,
            spec=self._spec,
            input_key=key,
            history_key=self.history_messages_key,
            locks=SessionLocks(0),
        )
        twin._lock, twin._alock = self._lock, self._alock  # one writer per session, as here
        return twin

    # `RunnableBindingBase` hands these straight to the inner runnable, which would skip the
    # turn bookkeeping; `Runnable`'s own versions go through invoke/ainvoke/stream/astream.
    batch = Runnable.batch
    abatch = Runnable.abatch
    batch_as_completed = Runnable.batch_as_completed
    abatch_as_completed = Runnable.abatch_as_completed
    transform = Runnable.transform
    atransform = Runnable.atransform
    astream_events = Runnable.astream_events


class _Forgotten(BaseChatMessageHistory):
    """A history that is always empty: what `ChatChain.without_memory` turns save goes nowhere."""

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        return []

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        return None

    def clear(self) -> None:
        return None


def _forget(session_id: str) -> BaseChatMessageHistory:
    return _Forgotten()


async def _abounded(turn: Turn, chunks: AsyncGenerator[Any, None]) -> AsyncIterator[Any]:
    """`Turn.bounded_stream` for async callers: only the wait for a chunk is bounded by the
    deadline (and watched for a cancellation, see `_cancel_watch`), never the caller's code."""
    stopped = _cancel_watch()
    try:
        while True:
            async with turn.abounded():
                chunk = await anext(chunks, END)
            stopped()
            if chunk is END:
                return
            yield chunk
    finally:
        await chunks.aclose()


def _cancel_watch() -> Callable[[], None]:
    """A check that raises `asyncio.CancelledError` if the running task was cancelled since.

    On Python 3.11 ``asyncio.wait_for`` (a model's client may wrap its reads in it) can
    return its result and drop a cancellation that comes at the same moment; the task still
    counts the request (`asyncio.Task.cancelling`), so the stream can stop on it itself.
    """
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0

    def check() -> None:
        if task is not None and task is asyncio.current_task() and task.cancelling() > before:
            raise asyncio.CancelledError

    return check


def _raise(error: Exception | None, exc: BaseException) -> NoReturn:
    """Raise ``error`` (chatchain's) from ``exc`` (the original), or ``exc`` if it is one."""
    if error is None or error is exc:
        raise exc
    raise error from exc


def _model_name(model: Runnable[Any, Any]) -> str | None:
    model = getattr(model, "runnable", model)  # the main model of a RunnableWithFallbacks
    name = getattr(model, "model_name", None)
    return name if isinstance(name, str) else None


def _recall(
    window: HistoryWindow | None,
    counter: TokenCounter,
    model: Runnable[Any, Any],
    settings: Settings,
    own_model: bool,
) -> Recall:
    """The window and summary at work, with the model that writes summaries when there are any."""
    if window is None or not window.summarize:
        return Recall(window, counter, model)
    cap = settings.summary_max_tokens or window.summary_tokens
    if own_model:
        capped = settings.model_copy(update={"summary_max_tokens": cap})
        summarizer = _cache.without_global_cache(create_summary_model(capped))
    else:  # the caller's model, capped per call rather than by its own max_tokens
        summarizer = model if cap is None else model.bind(max_tokens=cap)
    return Recall(window, counter, model, summarizer, cap)


def _reply_cap(model: Runnable[Any, Any], settings: Settings) -> int | None:
    """The user's cap on one reply: ``CHATCHAIN_MAX_TOKENS`` or the model's own, the lower."""
    own = getattr(getattr(model, "runnable", model), "max_tokens", None)
    caps = [cap for cap in (settings.max_tokens, own) if isinstance(cap, int) and cap > 0]
    return min(caps) if caps else None


def create_chat_chain(
    llm: Runnable[Any, Any] | None = None,
    *,
    settings: Settings | None = None,
    system: str | None = None,
    prompt_vars: Mapping[str, str] | None = None,
    get_session_history: Callable[[str], BaseChatMessageHistory] | None = None,
    input_key: str = "input",
    history_key: str | None = "history",
    ledger: UsageLedger | None = None,
    window: HistoryWindow | bool | None = True,
    budget: Budget | None = None,
    tools: Sequence[Any] | None = None,
    hooks: TurnHooks | Sequence[TurnHooks] | HookList | None = None,
) -> ChatChain:
    """Build the conversational chain.

    Args:
        llm: The chat model; by default `ChatOpenAI` from the settings (with the fallback
            model, if one is set). Any LangChain chat model works, e.g. a fake one in tests,
            also with fallbacks or ``.bind(...)``; not a chain such as ``prompt | model``.
            A `ChatOpenAI` is used through a copy that asks for usage while streaming.
            Running summaries go to `create_summary_model` (``CHATCHAIN_SUMMARY_MODEL``), or
            with ``llm`` to it, with ``max_tokens=CHATCHAIN_SUMMARY_MAX_TOKENS`` per call.
        settings: Settings; read from the environment and ``.env`` when not given.
        system: The system message, with ``{variables}``; ``settings.system_prompt`` otherwise.
        prompt_vars: Default values of the system message's variables (over the settings'
            ``prompt_vars`` when the system message is theirs); a call may override.
        get_session_history: Returns the history of a session id. A `HistoryStore` also
            serialises turns per session across every chain that shares it; the default is
            `get_message_history`, a process-wide dict of `ChatMessageHistory`. A store
            that implements only `HistoryBackend` is completed by `as_store` (lock,
            summary and ledger in this process).
        input_key: The input dict's key for the user's text.
        history_key: The prompt variable the history fills. ``None`` makes ``input_key`` a
            list of messages to which the history is prepended (a plain chain's ``my_msg`` form).
        ledger: Where the chain records each turn's usage: by default the ledger of the
            history store when it is a `HistoryStore` (so it persists and is shared with
            every chain on the store), else a private in-memory one.
        window: What of the history is sent: ``True`` for the settings' window (turns,
            tokens, running summary), a `HistoryWindow`, or ``False``/``None`` to send all of
            it as the plain chain does. Summaries and windowed reads need a `HistoryStore`.
        budget: Spending caps checked before each call is sent; the settings'
            ``CHATCHAIN_BUDGET_*`` by default. Under a budget each call is sent with
            ``max_tokens`` cut to what the remaining budget can pay for.
        tools: Tools the model may call in each turn: LangChain tools (``@tool``,
            ``BaseTool``, ``StructuredTool``) and plain functions (sync or async) with type
            hints and a docstring. A turn then runs them while the model asks for them
            (``CHATCHAIN_TOOL_ROUNDS``, ``CHATCHAIN_TOOL_TIMEOUT``,
            ``CHATCHAIN_TOOL_RESULT_TOKENS``) and saves the whole exchange at once. Tools
            get the session and user ids in their config, never the settings or the key.
        hooks: What is told of each turn's events (turn, model calls, tools, commit, end):
            a `TurnHooks` object or a list of them (see `chatchain.hooks`).

    Returns:
        The chain.

    Raises:
        ConfigurationError: The settings or the system template cannot work, ``llm`` is
            a chain rather than a chat model, a tool cannot be used, or a hook is not a
            `TurnHooks`.

    Example:
        >>> from chatchain.testing import FakeChatModel
        >>> chain = create_chat_chain(FakeChatModel(), system="Answer in {language}.")
        >>> reply = chain.invoke(
        ...     {"input": "hi", "language": "English"},
        ...     config={"configurable": {"session_id": "dp123"}},
        ... )
        >>> reply.content
        'Echo: hi'
    """
    settings = settings or Settings.load()
    if system is None:  # the settings' prompt, with the settings' defaults of its variables
        system = settings.system_prompt
        prompt_vars = {**settings.prompt_vars, **(prompt_vars or {})}
    prompt = create_prompt(
        system, input_key=input_key, history_key=history_key, prompt_vars=prompt_vars
    )
    model = prepare_chat_model(llm) if llm is not None else create_chat_model(settings)
    if get_session_history is None or get_session_history is get_message_history:
        history: Callable[[str], BaseChatMessageHistory] = _default_store
    elif isinstance(get_session_history, HistoryBackend):
        # A store with only part of the contract: the rest is kept in this process.
        history = as_store(get_session_history, lock_timeout=settings.lock_timeout)
    else:
        history = get_session_history
    if window is True:
        window = settings.history_window()
    plain = _cache.without_global_cache(model)  # never set_llm_cache's: it knows no users
    counter = choose_counter(model, settings.token_counter)
    logger.info("Counting tokens with the %s counter.", counter.name)
    store = history if isinstance(history, HistoryStore) else None
    secret = settings.api_key.get_secret_value() if settings.api_key else None
    toolbox = None
    if tools:
        toolbox = Toolbox.of(
            tools, settings.tool_rounds, settings.tool_timeout, settings.tool_result_tokens
        )
    spec = TurnSpec(
        input_key=input_key,
        required_vars=prompt_variables(system) - set(prompt_vars or {}),
        get_history=history,
        ledger=ledger or UsageLedger(store),
        recall=_recall(window or None, counter, plain, settings, own_model=llm is None),
        pricer=settings.pricer(),
        budget=budget if budget is not None else settings.budget(),
        max_tokens=_reply_cap(model, settings),
        store=store,
        default_model=_model_name(model),
        describe_failure=partial(
            _endpoint_errors.translate,
            secret=secret,
            timeout=settings.timeout if llm is None else None,
            retries=settings.max_retries if llm is None else None,
        ),
        deadline=settings.turn_deadline,
        deadline_in_transport=bounds_its_deadline(model),
        tools=toolbox,
        journal=None if store is None else journal_for(store, settings.journal),
        hooks=as_hooks(hooks),
    )
    locks = history if isinstance(history, HistoryStore) else SessionLocks(settings.lock_timeout)
    closers: list[Callable[[], None]] = []
    if settings.cache is not None:  # the turns' model only: summaries are never cached
        shared = settings.cache_scope == "shared"
        cache = _cache.open_cache(settings.cache, shared=shared)
        closers.append(cache.close)
        model = _cache.with_cache(model, cache)
    turns = model if settings.cache is not None else plain
    # Under a budget (the chain's, or a call's own limits) each call is sent with the
    # max_tokens its hold could pay for; without one the model is called as it is.
    step: Runnable[Any, Any] = BudgetedModel(turns)
    if toolbox is not None:
        with_tools = bind_tools(turns, list(toolbox.tools.values()))
        step = ToolLoop(BudgetedModel(with_tools), step, toolbox)
    chain = ChatChain(
        prompt | StructuredModel(step, model),
        history,
        spec=spec,
        input_key=input_key,
        history_key=history_key,
        locks=locks,
    )
    chain._closers = closers
    return chain
