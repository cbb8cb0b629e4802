"""`Chatbot`: one chain and one history store, for applications and notebooks."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from langchain_core.messages import BaseMessage, ToolMessage
from langchain_core.runnables import Runnable, RunnableConfig
from pydantic import BaseModel

from chatchain._hooking import as_hooks
from chatchain._options import ModelOptions, ToolCallDelta, deltas_of, with_options
from chatchain._pending import recover, recover_session
from chatchain._renamed import warn_renamed
from chatchain._streaming import TextBuffer
from chatchain._structured import with_schema
from chatchain._tools import ToolEvent, ToolFinished, ToolRun, ToolStarted
from chatchain._turn import Turn, validate_session_id
from chatchain.budgets import Budget, BudgetLimit
from chatchain.chain import ChatChain, create_chat_chain
from chatchain.errors import (
    ConfigurationError,
    InvalidInputError,
    MissingAPIKeyError,
    SessionBusyError,
)
from chatchain.hooks import TurnHooks
from chatchain.prompt import create_prompt
from chatchain.settings import Settings
from chatchain.stores import (
    Fence,
    HistoryBackend,
    HistoryStore,
    SessionInfo,
    TitleBackend,
    as_store,
    open_store,
)
from chatchain.stores._export import read_export
from chatchain.usage import (
    ReportKey,
    Usage,
    UsageEntry,
    UsageLedger,
    UsageReport,
)

__all__ = ["AsyncReplyStream", "Chatbot", "Reply", "ReplyStream"]

logger = logging.getLogger("chatchain")

DEFAULT_SESSION = "default"


@dataclass(frozen=True)
class Reply:
    """The model's answer to one turn.

    Attributes:
        text: The reply's text.
        usage: Tokens, cost and latency of the turn.
        message: The reply as a LangChain message (with its metadata).
        session_id: The session the turn belongs to.
        tool_runs: The tools that ran in the turn (what the model asked for and how it
            went), step by step, each step's in the order the model asked for them.
    """

    text: str
    usage: Usage
    message: BaseMessage
    session_id: str
    notices: tuple[str, ...] = ()
    """What the user should know about the turn, e.g. a retry with a tighter window."""
    parsed: BaseModel | None = None
    """With ``schema=``: the reply as a validated instance of the schema (``text`` is its
    JSON, as stored in the history); ``None`` otherwise."""
    tool_runs: tuple[ToolRun, ...] = ()

    @property
    def tool_calls(self) -> tuple[ToolRun, ...]:
        """Deprecated: `tool_runs` (a LangChain ``tool_calls`` is a model's requests)."""
        warn_renamed("Reply.tool_calls", "Reply.tool_runs")
        return self.tool_runs

    @property
    def interrupted(self) -> bool:
        """Whether the reply was cut short (only streamed replies can be)."""
        return bool(self.message.response_metadata.get("interrupted"))

    def __str__(self) -> str:
        return self.text


def _reply(message: BaseMessage, turn: Turn) -> Reply:
    assert turn.usage is not None  # set by the turn's save
    return Reply(
        message.text,
        turn.usage,
        message,
        turn.session_id,
        tuple(turn.notices),
        turn.parsed,
        tuple(turn.tool_runs),
    )


class _StreamBase:
    def __init__(self, turn: Turn, client_tools: bool = False) -> None:
        self._turn = turn
        self._text = TextBuffer(turn.text)  # the turn's text (see `SharedText`), not a copy
        self._client_tools = client_tools  # whether `events` yields the `ToolCallDelta`s

    @property
    def message(self) -> BaseMessage | None:
        """The reply as a LangChain message (with the ``tool_calls`` the model made for the
        call's own tools), once the stream has ended; ``None`` before."""
        if self.usage is None:
            return None
        return self._turn.streamed_reply()

    @property
    def session_id(self) -> str:
        return self._turn.session_id

    @property
    def text(self) -> str:
        """The text received so far."""
        return self._text.getvalue()

    @property
    def usage(self) -> Usage | None:
        """The turn's usage, set once the stream has ended (``None`` before)."""
        return self._turn.usage

    @property
    def notices(self) -> tuple[str, ...]:
        """What the user should know about the turn (see `Reply.notices`)."""
        return tuple(self._turn.notices)

    @property
    def finish_reason(self) -> str | None:
        """Why the reply ended, as the endpoint said (``"stop"``, ``"length"``, ...), once
        the stream has ended; ``None`` before, or when the endpoint did not say."""
        if self.usage is None:
            return None
        reason = self._turn.streamed_reply().response_metadata.get("finish_reason")
        return reason if isinstance(reason, str) else None

    @property
    def tool_runs(self) -> tuple[ToolRun, ...]:
        """The tools that ran so far (see `Reply.tool_runs`)."""
        return tuple(self._turn.tool_runs)

    @property
    def tool_calls(self) -> tuple[ToolRun, ...]:
        """Deprecated: `tool_runs`."""
        name = type(self).__name__
        warn_renamed(f"{name}.tool_calls", f"{name}.tool_runs")
        return self.tool_runs

    def _piece(self, chunk: Any) -> str | ToolEvent:
        if isinstance(chunk, (ToolStarted, ToolFinished)):
            return chunk
        piece = str(chunk.text) if isinstance(chunk, BaseMessage) else str(chunk)
        self._text.write(piece)
        return piece


class ReplyStream(_StreamBase, Iterator[str]):
    """The pieces of a reply as they arrive; ``usage`` is set when it ends.

    Stopping early (``break``, `close`, or leaving a ``with`` block) keeps the user's message
    and the partial reply, marked interrupted.

    Example:
        >>> from chatchain.testing import FakeChatModel
        >>> bot = Chatbot(llm=FakeChatModel())
        >>> with bot.stream("hello there") as stream:
        ...     text = "".join(stream)
        >>> text, stream.usage.turns
        ('Echo: hello there', 1)
    """

    def __init__(self, chunks: Iterator[Any], turn: Turn, client_tools: bool = False) -> None:
        super().__init__(turn, client_tools)
        self._chunks = chunks

    def __next__(self) -> str:
        while True:
            piece = self._piece(next(self._chunks))
            if piece and isinstance(piece, str):
                return piece

    def events(self) -> Iterator[str | ToolEvent | ToolCallDelta]:
        """The reply's text pieces and the turn's tool events, in the order they happen;
        with the call's own tools (``options=``), also the pieces of the model's calls of
        them (`ToolCallDelta`), as they stream.

        Example:
            >>> from chatchain.testing import FakeChatModel, tool_call_reply
            >>> def add(a: int, b: int) -> int:
            ...     '''Add two numbers.'''
            ...     return a + b
            >>> fake = FakeChatModel(replies=[tool_call_reply(("add", {"a": 1, "b": 2})), "3"])
            >>> bot = Chatbot(llm=fake, tools=[add])
            >>> [e if isinstance(e, str) else type(e).__name__ for e in bot.stream("1+2?").events()]
            ['ToolStarted', 'ToolFinished', '3']
        """
        while True:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                return
            piece = self._piece(chunk)
            if piece:
                yield piece
            if self._client_tools:
                yield from deltas_of(chunk)

    def close(self) -> None:
        """Stop the stream; what arrived so far is kept, marked interrupted."""
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> ReplyStream:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncReplyStream(_StreamBase, AsyncIterator[str]):
    """`ReplyStream` for ``async for``; cancelling the task stops it like `aclose`."""

    def __init__(self, chunks: AsyncIterator[Any], turn: Turn, client_tools: bool = False) -> None:
        super().__init__(turn, client_tools)
        self._chunks = chunks

    async def __anext__(self) -> str:
        while True:
            piece = self._piece(await anext(self._chunks))
            if piece and isinstance(piece, str):
                return piece

    async def events(self) -> AsyncIterator[str | ToolEvent | ToolCallDelta]:
        """`ReplyStream.events` for ``async for``."""
        while True:
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                return
            piece = self._piece(chunk)
            if piece:
                yield piece
            if self._client_tools:
                for delta in deltas_of(chunk):
                    yield delta

    async def aclose(self) -> None:
        """Stop the stream; what arrived so far is kept, marked interrupted."""
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> AsyncReplyStream:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class Chatbot:
    """A chat over one chain and one history store.

    The chat model from the settings is built on the first turn (or the first use of `chain`),
    which raises `MissingAPIKeyError` when no endpoint is set: managing sessions and reading
    usage need no API key.

    Args:
        settings: Settings; read from the environment and ``env_file`` when not given.
        llm: A chat model to use instead of `ChatOpenAI` (e.g. a fake one in tests, or
            your own `ChatOpenAI`), not a chain such as ``prompt | model``.
        store: Where sessions live; by default the store ``settings.store_url`` names (a new
            in-memory one unless ``CHATCHAIN_STORE`` says otherwise). A store that
            implements only `HistoryBackend` is completed by `as_store`.
        system: The system message, with ``{variables}``; ``settings.system_prompt`` otherwise.
        prompt_vars: Default values of the system message's variables (over
            ``settings.prompt_vars`` when the system message is the settings').
        env_file: The ``.env`` file to read when ``settings`` is not given.
        budget: Spending caps; the settings' ``CHATCHAIN_BUDGET_*`` by default.
        tools: Tools the model may call in each turn (LangChain tools, or functions with
            type hints and a docstring, sync or async); see `create_chat_chain`.
        hooks: What is told of each turn's events: a `TurnHooks` object or a list of them
            (see `chatchain.hooks`); more can be added later with `add_hooks`.

    Raises:
        ConfigurationError: A setting or the system template cannot work, ``llm`` is a
            chain rather than a chat model, or a hook is not a `TurnHooks`.

    Example:
        >>> from chatchain.testing import FakeChatModel
        >>> bot = Chatbot(llm=FakeChatModel(), system="Answer in {language}.")
        >>> bot.chat("Hi, I'm Bob", session_id="dp123", language="English").text
        "Echo: Hi, I'm Bob"
        >>> [m.type for m in bot.history("dp123")]
        ['human', 'ai']
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        llm: Runnable[Any, Any] | None = None,
        store: HistoryBackend | None = None,
        system: str | None = None,
        prompt_vars: Mapping[str, str] | None = None,
        env_file: str | Path | None = ".env",
        budget: Budget | None = None,
        tools: Sequence[Any] | None = None,
        hooks: TurnHooks | Sequence[TurnHooks] | None = None,
    ) -> None:
        self._hooks = as_hooks(hooks)  # shared with the chain: `add_hooks` reaches its turns
        self._owns_store = True  # `close` closes it (not so for a bot of `with_model`)
        self.settings = settings or Settings.load(env_file)
        self.store: HistoryStore = (
            open_store(
                self.settings.store_url,
                lock_timeout=self.settings.lock_timeout,
                **self.settings.store_options,
            )
            if store is None
            else as_store(store, lock_timeout=self.settings.lock_timeout)
        )
        try:
            self._setup(llm, system, prompt_vars, budget, tools)
        except BaseException:
            if store is None:  # the store it opened; a given one is the caller's
                self.store.close()
            raise

    def _setup(
        self,
        llm: Runnable[Any, Any] | None,
        system: str | None,
        prompt_vars: Mapping[str, str] | None,
        budget: Budget | None,
        tools: Sequence[Any] | None,
    ) -> None:
        self._ledger = UsageLedger(self.store)
        self._llm = llm
        self._system = system if system is not None else self.settings.system_prompt
        if system is None:  # the settings' prompt, with the settings' defaults of its variables
            prompt_vars = {**self.settings.prompt_vars, **(prompt_vars or {})}
        self._prompt_vars = prompt_vars
        self._budget = budget
        self._tools = list(tools or [])
        create_prompt(self._system, prompt_vars=prompt_vars)  # a bad template fails here, not later
        self._building = threading.Lock()
        # A given model is checked at once; ChatOpenAI from the settings waits for the first
        # turn, so that managing sessions and reading usage need no API key.
        self._chain: ChatChain | None = None if llm is None else self._build_chain()
        self._bare: ChatChain | None = None  # the chain without memory, built on first use
        self._results: ChatChain | None = None  # the chain taking tool results, on first use

    @property
    def chain(self) -> ChatChain:
        """The chain, built on first use when the model comes from the settings.

        Raises:
            MissingAPIKeyError: No ``OPENAI_API_KEY`` and no ``OPENAI_BASE_URL`` (and no ``llm``).
        """
        if self._chain is None:
            with self._building:  # one chain, also when the first turns come from many threads
                if self._chain is None:
                    self._chain = self._build_chain()
        return self._chain

    def _build_chain(self) -> ChatChain:
        return create_chat_chain(
            self._llm,
            settings=self.settings,
            system=self._system,
            prompt_vars=self._prompt_vars,
            get_session_history=self.store,
            ledger=self._ledger,
            budget=self._budget,
            tools=self._tools,
            hooks=self._hooks,
        )

    def with_model(self, model: str) -> Chatbot:
        """A Chatbot like this one that answers with ``model``: one chat service, several models.

        It shares this bot's store (so its sessions, usage ledger, locks and connections), its
        system prompt and variables, budget, tools and hooks (`add_hooks` on either reaches
        both); it has its own chain, so its turns are priced, held and capped as ``model``'s,
        and the ledger names ``model`` for them. It does not own the store: closing it closes
        only its own chain, and the store closes with this bot.

        Args:
            model: The model's name at the endpoint (as ``OPENAI_MODEL`` names one).

        Returns:
            The new bot.

        Raises:
            ConfigurationError: ``model`` is blank, or this bot was given its own ``llm``
                (a model object, which a name cannot change).

        Example:
            >>> bot = Chatbot(Settings(api_key="sk-test", model="gpt-4o-mini"))
            >>> mini = bot.with_model("gpt-4.1-mini")
            >>> mini.settings.model, mini.store is bot.store
            ('gpt-4.1-mini', True)
        """
        if not isinstance(model, str) or not model.strip():
            raise ConfigurationError(f"with_model needs a model name, not {model!r}.")
        if self._llm is not None:
            raise ConfigurationError(
                "This Chatbot was given its own llm, whose model a name cannot change: build "
                "a Chatbot per model with its own llm (and store=bot.store) instead."
            )
        twin = Chatbot(
            self.settings.model_copy(update={"model": model.strip()}),
            store=self.store,
            system=self._system,
            prompt_vars=self._prompt_vars,
            budget=self._budget,
            tools=self._tools,
        )
        twin._hooks = self._hooks  # the same list: its chain, built on first use, shares it
        twin._owns_store = False
        return twin

    def add_hooks(self, hooks: TurnHooks) -> None:
        """Tell ``hooks`` of the events of every turn from now on (once: adding the same
        object again changes nothing).

        Raises:
            ConfigurationError: ``hooks`` is not a `TurnHooks`.
        """
        self._hooks.add(hooks)

    def __repr__(self) -> str:
        return f"Chatbot(model={self.settings.model!r}, store={type(self.store).__name__})"

    def _call(
        self,
        text: str | Sequence[ToolMessage],
        session_id: str,
        user_id: str | None,
        prompt_vars: Mapping[str, Any],
        schema: type[BaseModel] | None = None,
        *,
        limits: Sequence[BudgetLimit] = (),
        options: ModelOptions | None = None,
    ) -> tuple[dict[str, Any], RunnableConfig]:
        configurable: dict[str, Any] = {"session_id": session_id}
        if user_id is not None:
            configurable["user_id"] = user_id
        if limits:
            configurable["limits"] = limits
        config = with_options(with_schema({"configurable": configurable}, schema), options)
        return {**prompt_vars, "input": _turn_input(text)}, config

    def _chain_for(self, text: str | Sequence[ToolMessage]) -> ChatChain:
        """The chain of a turn: tool results go to its twin that takes them as the input."""
        chain = self.chain
        if isinstance(text, str):
            return chain
        with self._building:
            if self._results is None:
                self._results = chain.with_tool_results()
            return self._results

    def chat(
        self,
        text: str | Sequence[ToolMessage],
        *,
        session_id: str = DEFAULT_SESSION,
        user_id: str | None = None,
        schema: type[BaseModel] | None = None,
        on_tool: Callable[[ToolEvent], None] | None = None,
        limits: Sequence[BudgetLimit] = (),
        options: ModelOptions | None = None,
        **prompt_vars: Any,
    ) -> Reply:
        """Send one message (or the results of the client's tools) and return the reply.

        ``user_id`` (optional) files the turn's usage under that user too, for per-user
        totals and budgets. With ``schema`` (a pydantic model class) the model answers in
        that schema (``with_structured_output``: json_schema, or function calling for an
        endpoint that refuses it): ``Reply.parsed`` is the validated instance, and the
        history keeps its JSON text. ``on_tool`` (optional) is called with each
        `ToolStarted` and `ToolFinished` as the turn's tools run. ``limits`` (optional) are
        this call's own caps, checked together with the budget's before anything is sent,
        e.g. ``Users(store).limits(user)`` (a user's caps need ``user_id`` of that user).

        ``options`` (optional) sends the model a client's own tools and response format for
        this call (see `ModelOptions`): chatchain does not run those tools; a reply that calls
        them (``Reply.message.tool_calls``) is stored and returned as it is, and the next
        turn's ``text`` is then the list of ``ToolMessage`` results answering each of its
        calls (stored with the reply to them). A bot with ``tools=`` of its own refuses
        options with tools.

        Raises:
            InvalidInputError: Empty text, a bad session id or a missing prompt variable;
                tool results that do not answer the session's last message; options with
                tools on a bot with tools of its own, or with ``schema``.
            BudgetExceeded: The turn could pass a spending cap; nothing was sent or stored.
            StructuredReplyError: With ``schema``, the reply does not fit it; nothing was
                stored (the call was metered).
            EndpointError: The endpoint failed; the history is unchanged.

        Example:
            >>> from pydantic import BaseModel
            >>> from chatchain.testing import FakeChatModel
            >>> class City(BaseModel):
            ...     name: str
            ...     population: int
            >>> bot = Chatbot(llm=FakeChatModel(replies=['{"name": "Oslo", "population": 709000}']))
            >>> bot.chat("Capital of Norway?", session_id="geo", schema=City).parsed
            City(name='Oslo', population=709000)
            >>> bot.history("geo")[-1].content
            '{"name":"Oslo","population":709000}'
        """
        call = self._call(
            text, session_id, user_id, prompt_vars, schema, limits=limits, options=options
        )
        message, turn = self._chain_for(text).run_turn(*call, on_tool=on_tool)
        return _reply(message, turn)

    async def achat(
        self,
        text: str | Sequence[ToolMessage],
        *,
        session_id: str = DEFAULT_SESSION,
        user_id: str | None = None,
        schema: type[BaseModel] | None = None,
        on_tool: Callable[[ToolEvent], None] | None = None,
        limits: Sequence[BudgetLimit] = (),
        options: ModelOptions | None = None,
        **prompt_vars: Any,
    ) -> Reply:
        """`chat` without blocking the event loop."""
        call = self._call(
            text, session_id, user_id, prompt_vars, schema, limits=limits, options=options
        )
        message, turn = await self._chain_for(text).arun_turn(*call, on_tool=on_tool)
        return _reply(message, turn)

    def stream(
        self,
        text: str | Sequence[ToolMessage],
        *,
        session_id: str = DEFAULT_SESSION,
        user_id: str | None = None,
        on_tool: Callable[[ToolEvent], None] | None = None,
        limits: Sequence[BudgetLimit] = (),
        options: ModelOptions | None = None,
        **prompt_vars: Any,
    ) -> ReplyStream:
        """Send one message (or tool results, see `chat`) and iterate over the reply's text
        as it arrives.

        The input is checked at once; the request goes out (and a budget is checked) on the
        first ``next()``. Iterating yields text only (with tools, also what the model says
        before it calls them); `ReplyStream.events` also yields the tool events, which
        ``on_tool`` receives too, and with ``options`` tools, the pieces of the model's
        calls of them (`ToolCallDelta`); ``ReplyStream.message`` has the whole calls once
        the stream ends. With a ``json_schema`` response format the reply comes whole, once
        checked.
        """
        call = self._call(text, session_id, user_id, prompt_vars, limits=limits, options=options)
        chunks, turn = self._chain_for(text).stream_turn(*call, on_tool=on_tool, events=True)
        return ReplyStream(chunks, turn, bool(options and options.tools))

    def astream(
        self,
        text: str | Sequence[ToolMessage],
        *,
        session_id: str = DEFAULT_SESSION,
        user_id: str | None = None,
        on_tool: Callable[[ToolEvent], None] | None = None,
        limits: Sequence[BudgetLimit] = (),
        options: ModelOptions | None = None,
        **prompt_vars: Any,
    ) -> AsyncReplyStream:
        """`stream` for ``async for``."""
        call = self._call(text, session_id, user_id, prompt_vars, limits=limits, options=options)
        chunks, turn = self._chain_for(text).astream_turn(*call, on_tool=on_tool, events=True)
        return AsyncReplyStream(chunks, turn, bool(options and options.tools))

    def system_messages(self, **prompt_vars: Any) -> list[BaseMessage]:
        """The system message this bot's turns send, its variables filled (the bot's
        defaults, over which ``prompt_vars`` win); ``[]`` when the system prompt is empty.

        For a caller that sends a conversation of its own with `chat_messages` and wants it
        to begin as the bot's turns do.

        Raises:
            InvalidInputError: A variable of the system prompt has no value.

        Example:
            >>> from chatchain.testing import FakeChatModel
            >>> bot = Chatbot(llm=FakeChatModel(), system="Answer in {language}.")
            >>> [m.text for m in bot.system_messages(language="Norwegian")]
            ['Answer in Norwegian.']
        """
        prompt = create_prompt(self._system, prompt_vars=self._prompt_vars)
        try:
            value = prompt.invoke({**prompt_vars, "history": [], "input": ""})
        except KeyError as exc:
            raise InvalidInputError(
                f"The system prompt's variable {exc} has no value: pass it as a keyword."
            ) from None
        return [m for m in value.to_messages() if m.type == "system" and m.text]

    def _without_memory(self) -> ChatChain:
        chain = self.chain  # outside the lock: building it takes the lock too
        with self._building:
            if self._bare is None:
                self._bare = chain.without_memory(lock_timeout=self.settings.lock_timeout)
            return self._bare

    def _messages_call(
        self,
        messages: Sequence[BaseMessage],
        session_id: str,
        user_id: str | None,
        limits: Sequence[BudgetLimit],
        options: ModelOptions | None,
    ) -> tuple[dict[str, Any], RunnableConfig]:
        configurable: dict[str, Any] = {"session_id": session_id}
        if user_id is not None:
            configurable["user_id"] = user_id
        if limits:
            configurable["limits"] = limits
        return {"messages": list(messages)}, with_options({"configurable": configurable}, options)

    def chat_messages(
        self,
        messages: Sequence[BaseMessage],
        *,
        session_id: str,
        user_id: str | None = None,
        limits: Sequence[BudgetLimit] = (),
        options: ModelOptions | None = None,
    ) -> Reply:
        """Send a whole conversation as it is and return the reply; store no history.

        No system prompt is added, no history loaded, nothing written to the session (see
        `ChatChain.without_memory`); the call is still metered in the ledger under
        ``session_id`` (and ``user_id``), and capped by the budget and ``limits``. Give each
        call a ``session_id`` of its own, or calls on one id wait for each other.
        ``options`` sends a client's tools and response format with the call (see `chat`);
        the messages may hold earlier tool calls and their results (``ToolMessage``).

        Raises:
            BudgetExceeded: The call could pass a spending cap; nothing was sent.
            EndpointError: The endpoint failed.

        Example:
            >>> from langchain_core.messages import HumanMessage, SystemMessage
            >>> from chatchain.testing import FakeChatModel
            >>> bot = Chatbot(llm=FakeChatModel())
            >>> asked = [SystemMessage("Talk like a pirate."), HumanMessage("hi")]
            >>> bot.chat_messages(asked, session_id="call-1").text, bot.history("call-1")
            ('Echo: hi', [])
        """
        call = self._messages_call(messages, session_id, user_id, limits, options)
        message, turn = self._without_memory().run_turn(*call)
        return _reply(message, turn)

    async def achat_messages(
        self,
        messages: Sequence[BaseMessage],
        *,
        session_id: str,
        user_id: str | None = None,
        limits: Sequence[BudgetLimit] = (),
        options: ModelOptions | None = None,
    ) -> Reply:
        """`chat_messages` without blocking the event loop."""
        call = self._messages_call(messages, session_id, user_id, limits, options)
        message, turn = await self._without_memory().arun_turn(*call)
        return _reply(message, turn)

    def stream_messages(
        self,
        messages: Sequence[BaseMessage],
        *,
        session_id: str,
        user_id: str | None = None,
        limits: Sequence[BudgetLimit] = (),
        options: ModelOptions | None = None,
    ) -> ReplyStream:
        """`chat_messages`, iterating over the reply's text as it arrives (see `stream`)."""
        call = self._messages_call(messages, session_id, user_id, limits, options)
        chunks, turn = self._without_memory().stream_turn(*call, events=True)
        return ReplyStream(chunks, turn, bool(options and options.tools))

    def astream_messages(
        self,
        messages: Sequence[BaseMessage],
        *,
        session_id: str,
        user_id: str | None = None,
        limits: Sequence[BudgetLimit] = (),
        options: ModelOptions | None = None,
    ) -> AsyncReplyStream:
        """`stream_messages` for ``async for``."""
        call = self._messages_call(messages, session_id, user_id, limits, options)
        chunks, turn = self._without_memory().astream_turn(*call, events=True)
        return AsyncReplyStream(chunks, turn, bool(options and options.tools))

    async def achat_many(
        self, turns: Iterable[tuple[str, str]], *, user_id: str | None = None, **prompt_vars: Any
    ) -> list[Reply]:
        """Run ``(session_id, text)`` turns concurrently; the replies come back in order.

        Turns on different sessions run in parallel; turns on one session run one after the
        other. If any turn fails, its error is raised after all the others have finished.

        Example:
            >>> import asyncio
            >>> from chatchain.testing import FakeChatModel
            >>> bot = Chatbot(llm=FakeChatModel())
            >>> replies = asyncio.run(bot.achat_many([("a", "one"), ("b", "two")]))
            >>> [r.text for r in replies]
            ['Echo: one', 'Echo: two']
        """
        pending = [(session_id, text) for session_id, text in turns]
        results = await asyncio.gather(
            *(
                self.achat(text, session_id=sid, user_id=user_id, **prompt_vars)
                for sid, text in pending
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [result for result in results if isinstance(result, Reply)]

    # -- sessions --------------------------------------------------------------------------

    def history(self, session_id: str = DEFAULT_SESSION) -> list[BaseMessage]:
        """The full transcript of a session, oldest first (windows trim what is sent only)."""
        return self.store.load(validate_session_id(session_id))

    def summary(self, session_id: str = DEFAULT_SESSION) -> str | None:
        """The session's running summary of turns older than the window, if any."""
        summary = self.store.get_summary(validate_session_id(session_id))
        return None if summary is None else summary.text

    def sessions(self) -> list[str]:
        """The ids of the sessions that hold messages, oldest first."""
        return self.store.sessions()

    def session_info(self, session_id: str = DEFAULT_SESSION) -> SessionInfo | None:
        """Message count and times of a session, or ``None`` if it is empty."""
        return self.store.info(validate_session_id(session_id))

    def delete(self, session_id: str = DEFAULT_SESSION) -> None:
        """Forget a session entirely: its messages, summary and title, waiting for a turn on
        it to end; a later turn on the same id starts afresh.

        What the session spent stays in the usage ledger: money spent is not refunded, and
        budgets must not be escaped by deleting a session. A turn a crash cut off is
        recorded there first.

        Example:
            >>> from chatchain.testing import FakeChatModel
            >>> bot = Chatbot(llm=FakeChatModel())
            >>> _ = bot.chat("hello", session_id="s1")
            >>> bot.delete("s1")
            >>> bot.history("s1"), bot.usage("s1").turns
            ([], 1)
        """
        session_id = validate_session_id(session_id)
        with self.store.lock(session_id) as fence:
            if self.store.read_pending(session_id) is not None:
                self._recover_before_delete(session_id, fence)
            self.store.delete(session_id)
            if isinstance(self.store, TitleBackend):
                self.store.set_title(session_id, None)

    def reset(self, session_id: str = DEFAULT_SESSION) -> None:
        """Deprecated: `delete` (which this always was)."""
        warn_renamed("Chatbot.reset", "Chatbot.delete")
        self.delete(session_id)

    def _recover_before_delete(self, session_id: str, fence: Fence | None) -> None:
        """A turn a crash cut off: its bill goes to the ledger before the session goes."""
        try:
            spec = self.chain._spec
        except MissingAPIKeyError:  # pricing it needs the model's settings: left for later
            logger.warning(
                "Session %r holds a turn cut off by a crash; without OPENAI_API_KEY (or "
                "OPENAI_BASE_URL) it is left for the session's next turn to record.",
                session_id,
            )
            return
        recover(spec, session_id, fence)

    def recover_crashed_turns(self) -> list[str]:
        """Store the turns that processes killed mid-turn left behind; return their sessions.

        The next turn on such a session does this first anyway; this sweep (``chatchain
        serve`` runs it when it starts) also closes the turns of sessions no one comes back
        to: the user's message kept, the reply so far marked interrupted (reason
        ``"crashed"``), the call recorded in the ledger as estimated and its budget hold
        ended. A session whose turn is still running elsewhere waits for it (and then has
        nothing to recover); one still busy after the lock timeout is left for later.

        Example:
            >>> from chatchain.testing import FakeChatModel
            >>> Chatbot(llm=FakeChatModel()).recover_crashed_turns()
            []
        """
        pending = self.store.pending_sessions()
        if not pending:  # the common case: no chain (and no API key) needed
            return []
        spec = self.chain._spec
        recovered = []
        for session_id in pending:
            try:
                if recover_session(spec, session_id):
                    recovered.append(session_id)
            except SessionBusyError:
                continue  # a live turn holds it: its own end drops its record
        return recovered

    def prune(self, older_than: timedelta) -> list[str]:
        """Delete the sessions idle for longer than ``older_than``; return their ids.

        Example:
            >>> from datetime import timedelta
            >>> from chatchain.testing import FakeChatModel
            >>> Chatbot(llm=FakeChatModel()).prune(timedelta(days=30))
            []
        """
        return self.store.prune(datetime.now(UTC) - older_than)

    def export_session(
        self, session_id: str = DEFAULT_SESSION, path: str | Path | None = None
    ) -> dict[str, Any]:
        """A session as JSON-ready data (messages, summary, times); also written to ``path``.

        The file is created readable by its owner only: transcripts are private.
        """
        data = self.store.export_session(validate_session_id(session_id))
        if path is not None:
            _write_private(Path(path), json.dumps(data, ensure_ascii=False, indent=2))
        return data

    def import_session(
        self,
        data: Mapping[str, Any] | str | Path,
        *,
        session_id: str | None = None,
        replace: bool = False,
    ) -> str:
        """Store an exported session (the data, or the path of its JSON file); return its id.

        The whole export is checked before anything is stored: a bad file changes nothing,
        and ``replace`` overwrites the session in one step. The export's times are kept.

        Raises:
            InvalidInputError: Not a valid export, or unreadable; the message says what is
                wrong and where.
            SessionExistsError: The session exists and ``replace`` is false.
        """
        exported = read_export(data) if isinstance(data, (str, Path)) else data
        return self.store.import_session(exported, session_id=session_id, replace=replace)

    @property
    def ledger(self) -> UsageLedger:
        """The usage ledger, kept in the store (it survives restarts for persistent stores)."""
        return self._ledger

    def usage(self, session_id: str | None = None, *, user_id: str | None = None) -> Usage:
        """Usage totals of one session, of one user, or of everything (no arguments).

        Example:
            >>> from chatchain.testing import FakeChatModel
            >>> bot = Chatbot(llm=FakeChatModel())
            >>> _ = bot.chat("hi", session_id="s1", user_id="ann")
            >>> bot.usage("s1").turns, bot.usage(user_id="ann").turns, bot.usage().turns
            (1, 1, 1)
        """
        return self._ledger.total(session_id, user_id=user_id)

    def usage_report(
        self,
        by: Sequence[ReportKey] = ("session", "model", "day"),
        *,
        session_id: str | None = None,
        user_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> UsageReport:
        """Usage totals grouped by session, user, model and/or day.

        ``str(report)`` is a text table; ``report.rows`` a list of dicts for notebooks.

        Example:
            >>> from chatchain.testing import FakeChatModel
            >>> bot = Chatbot(llm=FakeChatModel())
            >>> _ = bot.chat("hi", session_id="s1")
            >>> [(row["session"], row["turns"]) for row in bot.usage_report(by=["session"]).rows]
            [('s1', 1)]
        """
        return self._ledger.report(
            by, session_id=session_id, user_id=user_id, since=since, until=until
        )

    def usage_entries(
        self,
        *,
        session_id: str | None = None,
        user_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[UsageEntry]:
        """The ledger's entries (one per turn and per summary call), oldest first."""
        return self._ledger.entries(
            session_id=session_id, user_id=user_id, since=since, until=until
        )

    def close(self) -> None:
        """Release what the bot opened: its chain's response cache (``CHATCHAIN_CACHE``) and
        the store's connections and files (a bot of `with_model` leaves the store to the bot
        it came from). Idempotent; also ``with Chatbot(...) as bot``.

        HTTP connections to the endpoint are pooled for the process (and for each event
        loop) and shared by every bot; they close with the loop, or at exit.
        """
        with self._building:
            chain = self._chain
        try:
            if chain is not None:
                chain.close()
        finally:
            if self._owns_store:
                self.store.close()

    async def aclose(self) -> None:
        """`close`, and first the store's connections of the running event loop (Redis keeps
        async connections per loop, which would otherwise stay open until the loop ends: in a
        notebook or a service, never). Also ``async with Chatbot(...) as bot``.
        """
        aclose = getattr(self.store, "aclose", None) if self._owns_store else None
        try:
            if callable(aclose):
                await aclose()
        finally:
            await asyncio.to_thread(self.close)

    def __enter__(self) -> Chatbot:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Chatbot:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _turn_input(text: str | Sequence[ToolMessage]) -> str | list[ToolMessage]:
    """A turn's input: text, or the results of a client's tools (a list of `ToolMessage`)."""
    if isinstance(text, str):
        return text
    items: list[object] = list(text) if isinstance(text, Sequence) else []
    results = [item for item in items if isinstance(item, ToolMessage)]
    if not results or len(results) != len(items):
        raise InvalidInputError(
            "A turn's input is text, or a non-empty list of ToolMessage (the results of the "
            f"tools the last reply called), not {type(text).__name__}."
        )
    return results


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, 0o600)  # also when the file existed with wider permissions
