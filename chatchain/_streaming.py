"""A streamed reply held as its text, never as its chunks.

A reply of 20,000 chunks kept as chunk objects until its end weighs ~400 bytes per byte of
text (each `AIMessageChunk` with its dicts and lists, and in langchain-core's
`BaseChatModel.stream` a `ChatGenerationChunk` around it, kept for ``on_llm_end``). Here a
reply is folded as it arrives (`StreamedReply`): its text in one growing buffer, and only the
little the final message needs besides (id, usage, metadata, tool-call pieces merged as they
come), so that it weighs about its text.

`stream` and `astream` run a chat model's stream the way `BaseChatModel.stream` does (the
callbacks, the rate limiter, the run id and metadata), over the model's subclass-facing
``_stream``/``_astream``, but hand ``on_llm_end`` one generation folded as the chunks went by
instead of the list of them. A runnable they cannot see through (fallbacks, a model that
overrides ``stream``, a model that does not stream) is streamed as it is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

from langchain_core.callbacks import AsyncCallbackManager, CallbackManager
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    BaseMessageChunk,
    message_chunk_to_message,
)
from langchain_core.messages.base import merge_content
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGenerationChunk, Generation, LLMResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.base import RunnableBindingBase
from langchain_core.runnables.config import ensure_config
from langchain_core.utils._merge import merge_dicts, merge_lists
from langchain_core.utils.utils import LC_AUTO_PREFIX, LC_ID_PREFIX

try:  # what `BaseChatModel.stream` does to its input, metadata and errors, kept identical
    from langchain_core.language_models._utils import (
        _filter_invocation_params_for_tracing,
        _normalize_messages,
    )
    from langchain_core.language_models.chat_models import (
        _format_for_tracing,
        _format_ls_structured_output,
        _gen_info_and_msg_metadata,
        _generate_response_from_error,
    )
except ImportError:  # pragma: no cover - another langchain-core: its own stream is used
    _LEAN = False
else:
    _LEAN = True

__all__ = [
    "TEXT_KEY",
    "Relay",
    "SharedText",
    "StreamedReply",
    "TextBuffer",
    "arelayed",
    "astream",
    "merged",
    "relayed",
    "shared_text",
    "stream",
    "unwrapped",
]


TEXT_KEY = "__chatchain_text"
"""The configurable key of a turn's `SharedText`: every fold of the turn's chunks that finds
it in its config writes its text there (see `SharedText`)."""


class SharedText:
    """The text of a turn's replies, held once for every fold of its chunks.

    A turn's chunks are folded in several places: the model's run (for ``on_llm_end``), the
    tool loop and the response cache (for the message each keeps), the turn (for its
    checkpoints and the message it stores) and the caller's stream (its ``text``). Each
    holding its own copy cost ~1x the reply's bytes; instead each writes through a
    `TextBuffer` over this one: the first to write a piece appends it, the others, writing
    the same piece after it, only move on.

    A short piece as a `str` weighs ~50 bytes more than its text, and `io.StringIO` keeps
    the pieces so (Python 3.11 joins them only every 100,000 writes): here every `BLOCK`
    pieces are joined into one string, and reading the text joins the blocks into one, kept
    as the only block, so that the string read is the one held.
    """

    BLOCK = 256

    def __init__(self) -> None:
        self._blocks: list[str] = []
        self._pieces: list[str] = []
        self.size = 0  # in code points
        self.last = ""  # the latest piece

    def append(self, piece: str) -> None:
        pieces = self._pieces
        pieces.append(piece)
        self.size += len(piece)
        self.last = piece
        if len(pieces) >= self.BLOCK:
            self._blocks.append("".join(pieces))
            pieces.clear()

    def value(self, start: int = 0, end: int | None = None) -> str:
        """The text from ``start`` to ``end`` (a copy only when it is not the whole)."""
        if self._pieces or len(self._blocks) > 1:
            self._blocks = ["".join([*self._blocks, *self._pieces])]
            self._pieces.clear()
        whole = self._blocks[0] if self._blocks else ""
        if start == 0 and (end is None or end == self.size):
            return whole
        return whole[start:end]


class TextBuffer:
    """Text written piece by piece, held in a `SharedText` (its own unless given one).

    A buffer over a shared text holds what was written through it since it was made. A
    piece is appended if the buffer is at the text's end; if the buffer is one piece behind
    and the text's latest piece is this one (another fold wrote it first), it only moves on.
    Any other write (a fold that missed a piece the others saw, or saw one they did not)
    copies the buffer's text into a text of its own first: it never reads another's text.
    """

    def __init__(self, shared: SharedText | None = None) -> None:
        self._shared = SharedText() if shared is None else shared
        self._start = self._end = self._shared.size

    def write(self, text: str) -> None:
        if not text:
            return
        shared = self._shared
        if self._end != shared.size:
            if self._end + len(text) == shared.size and shared.last == text:
                self._end = shared.size
                return
            own = SharedText()
            own.append(self.getvalue())
            self._shared, self._start, self._end = own, 0, own.size
            shared = own
        shared.append(text)
        self._end += len(text)

    def getvalue(self) -> str:
        """The text written so far."""
        if self._start == self._end:
            return ""
        return self._shared.value(self._start, self._end)


def shared_text(config: RunnableConfig | None) -> SharedText | None:
    """The turn's `SharedText` in ``config``, if it runs in one."""
    found = (config or {}).get("configurable", {}).get(TEXT_KEY)
    return found if isinstance(found, SharedText) else None


class StreamedReply:
    """A reply folded chunk by chunk into what `add_ai_message_chunks` would make of them.

    The text goes to a `TextBuffer` (a few long strings, where a list of pieces costs ~60
    bytes per piece), over the turn's `SharedText` when given it; the rest of each chunk (id,
    usage, metadata, tool-call pieces) is merged as it comes, with langchain-core's own merge
    functions, which fold left to right: merging as the chunks arrive gives what merging them
    all at the end gives.
    """

    def __init__(self, text: SharedText | None = None) -> None:
        self._text = TextBuffer(text)
        self._content: str | list[str | dict[Any, Any]] | None = None  # content not all text
        self.chunks = 0
        self._kwargs: dict[str, Any] = {}
        self._metadata: dict[str, Any] = {}
        self._info: dict[str, Any] = {}  # the generation info, for ``on_llm_end``
        self._calls: list[Any] | None = None
        self._usage: Any = None
        self._id: str | None = None
        self._id_rank = -1  # 2: the endpoint's id (kept), 1: the run's, 0: another lc_ one
        self._last = False

    def __bool__(self) -> bool:
        return self.chunks > 0

    def add(self, chunk: BaseMessageChunk) -> None:
        """Fold ``chunk`` in (a chunk of another kind than ``AIMessageChunk``, e.g. the
        ``ChatMessageChunk`` langchain-openai makes of a delta whose role it does not know,
        brings its text and metadata)."""
        self._add_content(chunk.content)
        self.chunks += 1
        if chunk.additional_kwargs:
            self._kwargs = merge_dicts(self._kwargs, chunk.additional_kwargs)
        if chunk.response_metadata:
            self._metadata = merge_dicts(self._metadata, chunk.response_metadata)
        if not isinstance(chunk, AIMessageChunk):
            return
        if chunk.tool_call_chunks:
            self._calls = merge_lists(self._calls, list(chunk.tool_call_chunks))
        if chunk.usage_metadata is not None:
            self._usage = _add_usage(self._usage, chunk.usage_metadata)
        if chunk.id and self._id_rank < 2:
            self._add_id(chunk.id)
        self._last = self._last or chunk.chunk_position == "last"

    def add_generation(self, generation: ChatGenerationChunk) -> None:
        """Fold a model's chunk in, its generation info too (see `generation`)."""
        if generation.generation_info:
            self._info = merge_dicts(self._info, generation.generation_info)
        self.add(generation.message)

    def _add_content(self, content: str | list[str | dict[Any, Any]]) -> None:
        if self._content is None and isinstance(content, str):
            self._text.write(content)
        elif self._content is None:  # content blocks: merged as langchain-core merges them
            self._content = merge_content(self._text.getvalue(), content) if self else [*content]
            self._text = TextBuffer()
        else:
            self._content = merge_content(self._content, content)

    def _add_id(self, id_: str) -> None:
        # As `add_ai_message_chunks` ranks them: the first id from the endpoint, else the
        # first run id, else the first other id.
        if not id_.startswith(LC_ID_PREFIX) and not id_.startswith(LC_AUTO_PREFIX):
            self._id, self._id_rank = id_, 2
            return
        rank = 1 if id_.startswith(LC_ID_PREFIX) else 0
        if rank > self._id_rank:
            self._id, self._id_rank = id_, rank

    @property
    def content(self) -> str | list[str | dict[Any, Any]]:
        """The reply's content so far."""
        if self._content is None:
            return self._text.getvalue()
        return list(self._content)

    def text(self) -> str:
        """The reply's text so far."""
        if self._content is None:
            return self._text.getvalue()
        return AIMessageChunk(content=list(self._content)).text

    def chunk(self) -> AIMessageChunk:
        """The whole reply as one chunk, as `add_ai_message_chunks` would merge its chunks."""
        calls = [
            tool_call_chunk(
                name=call.get("name"),
                args=call.get("args"),
                id=call.get("id"),
                index=call.get("index"),
            )
            for call in self._calls or ()
        ]
        return AIMessageChunk(
            content=self.content,
            additional_kwargs=self._kwargs,
            tool_call_chunks=calls,
            response_metadata=self._metadata,
            usage_metadata=self._usage,
            id=self._id,
            chunk_position="last" if self._last else None,
        )

    def message(self) -> AIMessage:
        """The whole reply as a message (an empty one when no chunk came)."""
        if not self:
            return AIMessage(content="")
        message = message_chunk_to_message(self.chunk())
        assert isinstance(message, AIMessage)
        return message

    def generation(self) -> ChatGenerationChunk:
        """The whole reply as `merge_chat_generation_chunks` would give it to ``on_llm_end``."""
        message = self.chunk()
        info = self._info or None
        if not isinstance(message.content, str):
            return ChatGenerationChunk(message=message, generation_info=info)
        # Its ``text`` is the content itself: validated, it would be a copy (`TextAccessor`).
        return ChatGenerationChunk.model_construct(
            message=message, generation_info=info, text=message.content
        )


def _add_usage(left: Any, right: Any) -> Any:
    from langchain_core.messages.ai import add_usage

    return right if left is None else add_usage(left, right)


def merged(chunks: Iterator[Any]) -> AIMessage:
    """The message of a stream's chunks (its other items skipped), folded as they come."""
    reply = StreamedReply()
    for chunk in chunks:
        if isinstance(chunk, AIMessageChunk):
            reply.add(chunk)
    return reply.message()


# -- through the chain's runnables ---------------------------------------------------------------


class Relay:
    """An item of a turn's stream on its way through the chain's runnables.

    Each streamed `Runnable` of langchain-core (the chain's sequence, the history wrapper)
    adds up what it streams for its ``on_chain_end``, keeping every `AIMessageChunk` until
    the end. Wrapped in a relay, a chunk is added as the relay adds, by taking the place of
    the one before: the runnables hold the latest item only. The chain unwraps it
    (`unwrapped`) before its caller sees it.
    """

    __slots__ = ("item",)

    def __init__(self, item: Any) -> None:
        self.item = item

    def __add__(self, other: Any) -> Any:
        return other

    def __repr__(self) -> str:
        return f"Relay({self.item!r})"


def relayed(items: Iterator[Any]) -> Iterator[Relay]:
    """``items``, each in a `Relay`."""
    for item in items:
        yield Relay(item)


async def arelayed(items: AsyncIterator[Any]) -> AsyncIterator[Relay]:
    """`relayed` for async iterators."""
    async for item in items:
        yield Relay(item)


def unwrapped(item: Any) -> Any:
    """The item a `Relay` carries (any other item as it is)."""
    return item.item if isinstance(item, Relay) else item


# -- running a chat model's stream ---------------------------------------------------------------


def _through(
    runnable: Runnable[Any, Any], config: RunnableConfig | None, kwargs: dict[str, Any]
) -> tuple[Runnable[Any, Any], RunnableConfig | None, dict[str, Any]]:
    """The runnable under the bindings (``.bind``, ``bind_tools``...) that stream as their
    model does, with their config and arguments merged as they merge them."""
    while isinstance(runnable, RunnableBindingBase) and _streams_as_bound(type(runnable)):
        config = runnable._merge_configs(config)
        kwargs = {**runnable.kwargs, **kwargs}
        runnable = runnable.bound
    return runnable, config, kwargs


def _streams_as_bound(kind: type[Any]) -> bool:
    return bool(
        kind.stream is RunnableBindingBase.stream and kind.astream is RunnableBindingBase.astream
    )


def _lean(model: Runnable[Any, Any], kwargs: dict[str, Any], async_api: bool) -> bool:
    """Whether ``model`` is a chat model whose stream this module can run for it."""
    if not _LEAN or not isinstance(model, BaseChatModel):
        return False
    kind = type(model)
    if kind.stream is not BaseChatModel.stream or kind.astream is not BaseChatModel.astream:
        return False
    if getattr(model, "output_version", None) == "v1":  # content rewritten per chunk
        return False
    return model._should_stream(async_api=async_api, **{**kwargs, "stream": True})


class _Run:
    """One streamed call of a chat model, set up as `BaseChatModel.stream` sets it up."""

    def __init__(
        self,
        model: BaseChatModel,
        input: Any,
        config: RunnableConfig | None,
        kwargs: dict[str, Any],
    ) -> None:
        self.model = model
        self.config = ensure_config(config)
        self.messages = model._convert_input(input).to_messages()
        structured = kwargs.pop("ls_structured_output_format", None) or kwargs.pop(
            "structured_output_format", None
        )
        self.stop = kwargs.pop("stop", None)
        self.kwargs = kwargs
        self.params = model._get_invocation_params(stop=self.stop, **kwargs)
        self.options = {
            "stop": self.stop,
            **{key: self.params[key] for key in kwargs if key in self.params},
            **_format_ls_structured_output(structured),
        }
        self.reply = StreamedReply(shared_text(self.config))  # the turn's text, not a copy
        self.run_id = ""
        self._tail: AIMessageChunk | None = None  # the model's latest chunk

    def managers(self) -> tuple[Any, ...]:
        """The arguments of the callback manager's ``configure``."""
        model, config = self.model, self.config
        metadata = {
            **(config.get("metadata") or {}),
            **model._get_ls_params_with_defaults(stop=self.stop, **self.kwargs),
        }
        return (
            config.get("callbacks"),
            model.callbacks,
            model.verbose,
            config.get("tags"),
            model.tags,
            metadata,
            model.metadata,
        )

    def start_arguments(self) -> tuple[list[Any], dict[str, Any]]:
        return (
            [self.model._serialized, [_format_for_tracing(self.messages)]],
            {
                "invocation_params": self.params,
                "options": self.options,
                "name": self.config.get("run_name"),
                "run_id": self.config.pop("run_id", None),
                "batch_size": 1,
            },
        )

    def started(self, run_manager: Any) -> list[BaseMessage]:
        """The run is open: the messages to send."""
        self.run_id = f"{LC_ID_PREFIX}-{run_manager.run_id}"
        return _normalize_messages(self.messages)

    def arrived(self, generation: ChatGenerationChunk) -> AIMessageChunk:
        """A chunk from the model, completed as `BaseChatModel.stream` completes it."""
        message = cast(AIMessageChunk, generation.message)
        if message.id is None:
            message.id = self.run_id
        message.response_metadata = _gen_info_and_msg_metadata(generation)
        self.reply.add_generation(generation)
        self._tail = message
        return message

    def last(self) -> ChatGenerationChunk | None:
        """The closing chunk `BaseChatModel.stream` adds when the model's last one is not
        marked last (``None``: it was, or nothing came)."""
        tail = self._tail
        if tail is None or tail.chunk_position:
            return None
        empty: str | list[Any] = "" if isinstance(tail.content, str) else []
        last = AIMessageChunk(content=empty, chunk_position="last", id=self.run_id)
        return ChatGenerationChunk(message=last)

    def failed(self, exc: BaseException) -> LLMResult:
        errors: list[Generation] = [*_generate_response_from_error(exc)]
        if not self.reply:
            return LLMResult(generations=[errors])
        return LLMResult(generations=[[self.reply.generation()], errors])

    def result(self) -> LLMResult | None:
        if not self.reply:
            return None
        return LLMResult(generations=[[self.reply.generation()]])

    def configure(self, manager: type[Any]) -> Any:
        return manager.configure(
            *self.managers(),
            langsmith_inheritable_metadata=_filter_invocation_params_for_tracing(self.params),
        )


_NO_CHUNKS = "No generation chunks were returned"


def stream(
    runnable: Runnable[Any, Any], input: Any, config: RunnableConfig | None = None, **kwargs: Any
) -> Iterator[Any]:
    """``runnable.stream(input, config, **kwargs)``, holding no chunk (see the module)."""
    model, config, kwargs = _through(runnable, config, kwargs)
    if not _lean(model, kwargs, async_api=False):
        yield from model.stream(input, config, **kwargs)
        return
    chat = cast(BaseChatModel, model)
    run = _Run(chat, input, config, kwargs)
    args, named = run.start_arguments()
    (manager,) = run.configure(CallbackManager).on_chat_model_start(*args, **named)
    if chat.rate_limiter:
        chat.rate_limiter.acquire(blocking=True)
    try:
        messages = run.started(manager)
        for generation in chat._stream(messages, stop=run.stop, **run.kwargs):
            message = run.arrived(generation)
            manager.on_llm_new_token(message.content, chunk=generation)
            yield message
        if (last := run.last()) is not None:
            manager.on_llm_new_token("", chunk=last)
            yield last.message
    except BaseException as exc:
        manager.on_llm_error(exc, response=run.failed(exc))
        raise
    if (result := run.result()) is None:
        error = ValueError(_NO_CHUNKS)
        manager.on_llm_error(error, response=LLMResult(generations=[]))
        raise error
    manager.on_llm_end(result)


async def astream(
    runnable: Runnable[Any, Any], input: Any, config: RunnableConfig | None = None, **kwargs: Any
) -> AsyncIterator[Any]:
    """`stream` for async callers: ``runnable.astream(...)``, holding no chunk."""
    model, config, kwargs = _through(runnable, config, kwargs)
    if not _lean(model, kwargs, async_api=True):
        async for item in model.astream(input, config, **kwargs):
            yield item
        return
    chat = cast(BaseChatModel, model)
    run = _Run(chat, input, config, kwargs)
    args, named = run.start_arguments()
    (manager,) = await run.configure(AsyncCallbackManager).on_chat_model_start(*args, **named)
    if chat.rate_limiter:
        await chat.rate_limiter.aacquire(blocking=True)
    try:
        messages = run.started(manager)
        async for generation in chat._astream(messages, stop=run.stop, **run.kwargs):
            message = run.arrived(generation)
            await manager.on_llm_new_token(message.content, chunk=generation)
            yield message
        if (last := run.last()) is not None:
            await manager.on_llm_new_token("", chunk=last)
            yield last.message
    except BaseException as exc:
        await manager.on_llm_error(exc, response=run.failed(exc))
        raise
    if (result := run.result()) is None:
        error = ValueError(_NO_CHUNKS)
        await manager.on_llm_error(error, response=LLMResult(generations=[]))
        raise error
    await manager.on_llm_end(result)
