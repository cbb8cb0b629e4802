"""A fake chat model for tests: scripted or echo replies, tool calls, real streaming and usage."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolCall
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import tool_call, tool_call_chunk
from langchain_core.messages.utils import count_tokens_approximately
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field, PrivateAttr

__all__ = ["FakeChatModel", "tool_call_reply"]

Scripted = str | AIMessage
"""A scripted reply: its text, or an `AIMessage` (with ``tool_calls`` to ask for tools)."""


def tool_call_reply(*calls: tuple[str, dict[str, Any]], text: str = "") -> AIMessage:
    """A scripted reply that asks for tools: one ``(name, args)`` per call, made in parallel.

    Each call gets a fresh id (``call_...``), as OpenAI's do. Give the message to
    `FakeChatModel` (``replies=[...]``, `FakeChatModel.queue` or ``respond``).

    Example:
        >>> reply = tool_call_reply(("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4}))
        >>> [(call["name"], call["args"]) for call in reply.tool_calls]
        [('add', {'a': 1, 'b': 2}), ('add', {'a': 3, 'b': 4})]
    """
    return AIMessage(
        content=text,
        tool_calls=[tool_call(name=name, args=args, id=_call_id()) for name, args in calls],
    )


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class _Answer:
    """One call's answer: text (cut to the cap), tool calls and the finish reason."""

    text: str
    tool_calls: list[ToolCall]
    finish: str


def _cut_off() -> Exception:
    # What the OpenAI client raises when the server drops a stream midway.
    import httpx

    return httpx.RemoteProtocolError("peer closed connection without sending complete message")


def _last_human_text(messages: list[BaseMessage]) -> str:
    for message in reversed(messages):
        if message.type == "human":
            return message.text
    return ""


class FakeChatModel(BaseChatModel):
    """A chat model that answers from a script, or echoes, and reports usage like OpenAI.

    Replies come from ``replies`` in order, then ``"Echo: <last user text>"``. Streams are
    split at whitespace, fire ``on_llm_new_token`` and end with a usage chunk, so metering,
    streaming and history behave as with `ChatOpenAI`.

    Tools: `bind_tools` takes LangChain tools, functions or schemas (converted by LangChain's
    ``convert_to_openai_tool``, as `ChatOpenAI` does) and sends them with each call
    (`tools_of_calls` lists them). A scripted `AIMessage` with ``tool_calls`` (see
    `tool_call_reply`) asks for those tools, several at once if it lists several; streamed,
    each call arrives as ``tool_call_chunks`` (its name and id, then its arguments in two
    pieces), with ``finish_reason="tool_calls"``. Like a real model, a call sent without
    tools never gets tool calls: it gets the scripted message's text, or the echo if it has
    none. Names and arguments are not checked against the tools, so a test can script a
    model that makes a tool up. Errors can be scripted: ``errors`` are
    raised by the next calls, one each, and ``fail_after_chunks`` cuts a stream short.
    ``max_tokens`` (the field, or per call as with ``model.bind(max_tokens=...)``) cuts a reply
    to ``4 * max_tokens`` characters with ``finish_reason="length"``, as `OpenAITestServer`
    does, and never reports more than ``max_tokens`` completion tokens (so budget tests see
    exactly what a capped call may cost); the echo then makes a verbose summarizer whose
    replies only the cap bounds.

    Example:
        >>> model = FakeChatModel(replies=["Hello Bob!"])
        >>> model.invoke("Hi, I'm Bob").content
        'Hello Bob!'
        >>> model.invoke("Still there?").content
        'Echo: Still there?'
        >>> model.bind(max_tokens=2).invoke("Cut me short").content
        'Echo: Cu'

        Asking for a tool, then answering:

        >>> def add(a: int, b: int) -> int:
        ...     '''Add two numbers.'''
        ...     return a + b
        >>> model = FakeChatModel(replies=[tool_call_reply(("add", {"a": 1, "b": 2})), "3"])
        >>> with_tools = model.bind_tools([add])
        >>> with_tools.invoke("1 + 2?").tool_calls[0]["name"]
        'add'
        >>> with_tools.invoke("(the tool said 3)").content
        '3'
    """

    replies: list[Scripted] = Field(default_factory=list)
    """Replies to give, in order, before echoing: text, or an `AIMessage` with tool calls."""
    errors: list[BaseException] = Field(default_factory=list)
    """Exceptions the next calls raise, one per call, before answering again."""
    fail_after_chunks: int | None = None
    """Drop every stream after this many chunks, as a server that cuts the connection."""
    delay: float = 0.0
    """Seconds to wait before each streamed chunk (and before a whole reply)."""
    model_name: str = "fake-chat-model"
    """The name reported in ``response_metadata`` (e.g. a real one to get a price)."""
    respond: Callable[[list[BaseMessage]], Scripted] | None = None
    """Computes the reply from the messages when no scripted reply is left (else: echo)."""
    max_tokens: int | None = None
    """Cut replies to ``4 * max_tokens`` characters (a call's own ``max_tokens`` wins)."""

    chatchain_token_counter: ClassVar[str] = "approximate"
    """How this model bills tokens (LangChain's `count_tokens_approximately`), so that
    chatchain counts prompts the same way (see `chatchain._tokens.choose_counter`)."""

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _replies: deque[Scripted] = PrivateAttr()
    _errors: deque[BaseException] = PrivateAttr()
    _calls: list[list[BaseMessage]] = PrivateAttr(default_factory=list)
    _tools: list[list[dict[str, Any]]] = PrivateAttr(default_factory=list)

    def model_post_init(self, context: Any, /) -> None:
        self._replies = deque(self.replies)
        self._errors = deque(self.errors)

    @property
    def _llm_type(self) -> str:
        return "chatchain-fake"

    @property
    def calls(self) -> list[list[BaseMessage]]:
        """The messages of every call so far, in order."""
        with self._lock:
            return list(self._calls)

    @property
    def tools_of_calls(self) -> list[list[dict[str, Any]]]:
        """The tools (OpenAI's format) sent with every call so far, in order (``[]``: none)."""
        with self._lock:
            return [list(tools) for tools in self._tools]

    def queue(self, *replies: Scripted) -> None:
        """Add replies to the script (text, or an `AIMessage` with tool calls)."""
        with self._lock:
            self._replies.extend(replies)

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """This model, sent ``tools`` with each call (converted as `ChatOpenAI` converts them)."""
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=formatted, **kwargs)

    def _next_reply(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> _Answer:
        """The answer to a call: ``finish`` is ``"length"`` when ``max_tokens`` cut its text."""
        tools = list(kwargs.get("tools") or [])
        scripted = self._uncapped_reply(messages, tools)
        text, calls = (scripted, []) if isinstance(scripted, str) else _parts(scripted)
        if calls and not tools:  # a model can only call the tools it was sent
            text, calls = text or self._echo(messages), []
        cap = self._cap(kwargs.get("max_tokens"))
        if cap is not None and len(text) > 4 * cap:
            return _Answer(text[: 4 * cap], calls, "length")
        return _Answer(text, calls, "tool_calls" if calls else "stop")

    def _cap(self, max_tokens: int | None) -> int | None:
        return max_tokens if max_tokens is not None else self.max_tokens

    def _uncapped_reply(self, messages: list[BaseMessage], tools: list[dict[str, Any]]) -> Scripted:
        with self._lock:
            self._calls.append(list(messages))
            self._tools.append(tools)
            if self._errors:
                raise self._errors.popleft()
            if self._replies:
                return self._replies.popleft()
        if self.respond is not None:
            return self.respond(list(messages))
        return self._echo(messages)

    def _echo(self, messages: list[BaseMessage]) -> str:
        return f"Echo: {_last_human_text(messages)}"

    def _usage(
        self, messages: list[BaseMessage], answer: _Answer, kwargs: dict[str, Any]
    ) -> UsageMetadata:
        prompt = count_tokens_approximately(messages, tools=kwargs.get("tools") or None)
        completion = 0
        if answer.text or answer.tool_calls:
            reply = AIMessage(content=answer.text, tool_calls=answer.tool_calls)
            completion = count_tokens_approximately([reply])
        cap = self._cap(kwargs.get("max_tokens"))
        completion = completion if cap is None else min(completion, cap)
        return UsageMetadata(
            input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion
        )

    def _pieces(self, reply: str) -> Iterable[str]:
        return [piece for piece in re.split(r"(\s+)", reply) if piece]

    def _answer(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> ChatResult:
        answer = self._next_reply(messages, kwargs)
        message = AIMessage(
            content=answer.text,
            tool_calls=answer.tool_calls,
            usage_metadata=self._usage(messages, answer, kwargs),
            response_metadata={"model_name": self.model_name, "finish_reason": answer.finish},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        time.sleep(self.delay)
        return self._answer(messages, kwargs)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        await asyncio.sleep(self.delay)
        return self._answer(messages, kwargs)

    def _chunks(
        self, messages: list[BaseMessage], kwargs: dict[str, Any]
    ) -> Iterator[ChatGenerationChunk]:
        answer = self._next_reply(messages, kwargs)
        pieces = [AIMessageChunk(content=piece) for piece in self._pieces(answer.text)]
        pieces += _call_chunks(answer.tool_calls)
        for index, piece in enumerate(pieces):
            if self.fail_after_chunks is not None and index >= self.fail_after_chunks:
                raise _cut_off()
            yield ChatGenerationChunk(message=piece)
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                usage_metadata=self._usage(messages, answer, kwargs),
                response_metadata={"model_name": self.model_name, "finish_reason": answer.finish},
                chunk_position="last",
            )
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in self._chunks(messages, kwargs):
            if self.delay:
                time.sleep(self.delay)
            if run_manager and chunk.text:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        for chunk in self._chunks(messages, kwargs):
            await asyncio.sleep(self.delay)
            if run_manager and chunk.text:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


def _parts(message: AIMessage) -> tuple[str, list[ToolCall]]:
    """A scripted message's text and tool calls (each with an id, as the endpoint gives)."""
    calls = [
        tool_call(name=call["name"], args=dict(call["args"]), id=call.get("id") or _call_id())
        for call in message.tool_calls
    ]
    return message.text, calls


def _call_chunks(calls: list[ToolCall]) -> list[AIMessageChunk]:
    """Tool calls as OpenAI streams them: name and id first, the arguments in two pieces."""
    chunks = []
    for index, call in enumerate(calls):
        args = json.dumps(call["args"])
        half = len(args) // 2
        first = tool_call_chunk(name=call["name"], args=args[:half], id=call["id"], index=index)
        rest = tool_call_chunk(name=None, args=args[half:], id=None, index=index)
        chunks += [
            AIMessageChunk(content="", tool_call_chunks=[first]),
            AIMessageChunk(content="", tool_call_chunks=[rest]),
        ]
    return chunks
