"""A fake chat model for tests: scripted or echo replies, real streaming, real usage."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.utils import count_tokens_approximately
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import Field, PrivateAttr

__all__ = ["FakeChatModel"]


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
    streaming and history behave as with `ChatOpenAI`. Errors can be scripted: ``errors`` are
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
    """

    replies: list[str] = Field(default_factory=list)
    """Replies to give, in order, before echoing."""
    errors: list[BaseException] = Field(default_factory=list)
    """Exceptions the next calls raise, one per call, before answering again."""
    fail_after_chunks: int | None = None
    """Drop every stream after this many chunks, as a server that cuts the connection."""
    delay: float = 0.0
    """Seconds to wait before each streamed chunk (and before a whole reply)."""
    model_name: str = "fake-chat-model"
    """The name reported in ``response_metadata`` (e.g. a real one to get a price)."""
    respond: Callable[[list[BaseMessage]], str] | None = None
    """Computes the reply from the messages when no scripted reply is left (else: echo)."""
    max_tokens: int | None = None
    """Cut replies to ``4 * max_tokens`` characters (a call's own ``max_tokens`` wins)."""

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _replies: deque[str] = PrivateAttr()
    _errors: deque[BaseException] = PrivateAttr()
    _calls: list[list[BaseMessage]] = PrivateAttr(default_factory=list)

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

    def queue(self, *replies: str) -> None:
        """Add replies to the script."""
        with self._lock:
            self._replies.extend(replies)

    def _next_reply(
        self, messages: list[BaseMessage], max_tokens: int | None = None
    ) -> tuple[str, str]:
        """The reply text and its finish reason (``"length"`` when ``max_tokens`` cut it)."""
        reply = self._uncapped_reply(messages)
        cap = self._cap(max_tokens)
        if cap is not None and len(reply) > 4 * cap:
            return reply[: 4 * cap], "length"
        return reply, "stop"

    def _cap(self, max_tokens: int | None) -> int | None:
        return max_tokens if max_tokens is not None else self.max_tokens

    def _uncapped_reply(self, messages: list[BaseMessage]) -> str:
        with self._lock:
            self._calls.append(list(messages))
            if self._errors:
                raise self._errors.popleft()
            if self._replies:
                return self._replies.popleft()
        if self.respond is not None:
            return self.respond(list(messages))
        return f"Echo: {_last_human_text(messages)}"

    def _usage(
        self, messages: list[BaseMessage], reply: str, max_tokens: int | None
    ) -> UsageMetadata:
        prompt = count_tokens_approximately(messages)
        completion = count_tokens_approximately([AIMessage(content=reply)]) if reply else 0
        cap = self._cap(max_tokens)
        completion = completion if cap is None else min(completion, cap)
        return UsageMetadata(
            input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion
        )

    def _pieces(self, reply: str) -> Iterable[str]:
        return [piece for piece in re.split(r"(\s+)", reply) if piece]

    def _answer(self, messages: list[BaseMessage], max_tokens: int | None) -> ChatResult:
        reply, finish = self._next_reply(messages, max_tokens)
        message = AIMessage(
            content=reply,
            usage_metadata=self._usage(messages, reply, max_tokens),
            response_metadata={"model_name": self.model_name, "finish_reason": finish},
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
        return self._answer(messages, kwargs.get("max_tokens"))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        await asyncio.sleep(self.delay)
        return self._answer(messages, kwargs.get("max_tokens"))

    def _chunks(
        self, messages: list[BaseMessage], max_tokens: int | None
    ) -> Iterator[ChatGenerationChunk]:
        reply, finish = self._next_reply(messages, max_tokens)
        for index, piece in enumerate(self._pieces(reply)):
            if self.fail_after_chunks is not None and index >= self.fail_after_chunks:
                raise _cut_off()
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                usage_metadata=self._usage(messages, reply, max_tokens),
                response_metadata={"model_name": self.model_name, "finish_reason": finish},
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
        for chunk in self._chunks(messages, kwargs.get("max_tokens")):
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
        for chunk in self._chunks(messages, kwargs.get("max_tokens")):
            await asyncio.sleep(self.delay)
            if run_manager and chunk.text:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
