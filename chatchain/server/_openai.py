"""The OpenAI-compatible API: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Existing OpenAI clients (the official ``openai`` SDK, chat front-ends that speak OpenAI) use
chatchain as their endpoint with a chatchain bearer token as their API key. Each request is
authenticated, rate-limited, metered and capped like a turn of the native API.

Two modes, chosen per request:

- **With an** ``X-Session-Id`` **header the server keeps the memory.** The request's *last
  user message* is run as one turn of the caller's session of that id (the same session the
  native API calls by that id): the deployment's system prompt, the stored history, its window
  and running summary apply, and the turn is stored. The request's other messages are
  ignored, system and developer messages included: the stored session is the conversation,
  and the operator's system prompt is not the client's to replace.
- **Without it the request is stateless.** Its messages are sent as they are (with its own
  system message, if any, and without the deployment's system prompt) and nothing is written
  to the history; the call is still metered in the ledger under the caller, with the
  completion's id (``chatcmpl-...``) as its session, and capped by the user's budget limits
  and the deployment's budgets (a per-session cap applies to each call on its own).

**Tools.** A client's own tools (``tools``, ``functions``, ``tool_choice``, tool messages) are
refused with 400: running tools that live in the client is another feature. The server's own
tools (``chatchain serve --tools MODULE``) run inside the turn in both modes, as in the
native API: the model may call them, the server runs them and sends the results back, and
the answer (streamed or not) is the final text only; the calls never reach the client. With
``X-Session-Id`` the whole exchange (the calls and their results) is stored with the turn,
and ``GET /v1/sessions/{id}/messages`` shows it.

``model`` is required, as OpenAI requires it, and picks the model that answers among those
the operator allows (``OPENAI_MODEL`` and ``CHATCHAIN_SERVER_MODELS``, which ``GET
/v1/models`` lists); any other is 404 ``model_not_found``, as OpenAI answers. Each model's
turns are priced, held and capped as that model's, and the ledger names it; the reply's
``model`` is the one the endpoint named (the requested one while streaming).

Sampling fields (``temperature``, ``top_p``, ``max_tokens``, ``stop``, ``seed``, ...) are
accepted and ignored: the deployment's settings decide them. What would change the kind of
reply (``n`` above 1, tools and function calls, a non-text ``response_format``, logprobs,
audio, images) is refused with 400, as is a field OpenAI does not define.

With ``"stream": true`` the reply comes as ``chat.completion.chunk`` events ending with
``data: [DONE]`` (the pieces that arrive together in one chunk). The usage chunk
(``"choices": []``, the turn's ``usage``) is sent only when
``stream_options.include_usage`` is true, as OpenAI does; every other chunk then carries
``"usage": null``. A turn refused before its first piece answers with its HTTP status, as
without streaming; a failure after it is a ``data: {"error": {...}}`` event, which the SDK
raises as ``openai.APIError``. A client that leaves mid-stream leaves the partial reply stored,
marked interrupted (with ``X-Session-Id``).

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so the SDK
raises its own exceptions (see `chatchain.server._errors.openai_error`): bad input 400
(``BadRequestError``), bad token 401 (``AuthenticationError``), budget 429 with code
``insufficient_quota`` and ``x-should-retry: false`` (``RateLimitError``, not retried),
too many requests or streams 429 with ``Retry-After``, busy session 409, endpoint failures
502/504, store down 503.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal
from uuid import uuid4

from fastapi import APIRouter, Header, Request
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from pydantic import BaseModel, ConfigDict, Field

from chatchain import AsyncReplyStream, Reply, Usage
from chatchain.server import _metrics
from chatchain.server._errors import HTTPProblem, openai_error
from chatchain.server._service import (
    Caller,
    Service,
    ServiceDep,
    app_state,
    session_header,
    session_key,
)
from chatchain.server._streaming import Piece, relay
from chatchain.users import User

__all__ = ["ChatCompletionRequest", "router"]

router = APIRouter(prefix="/v1", tags=["openai"])

ROUTE = "openai"  # the `route` label of these turns in the metrics

_OWNER = "chatchain"


class ContentPart(BaseModel):
    """One part of a message's content; only ``{"type": "text", "text": ...}`` is accepted."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message of the request, as OpenAI's chat format writes it."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None
    tool_call_id: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = None


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions`` (OpenAI's; unknown fields are refused)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Required: one of the models GET /v1/models lists.")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Accepted and ignored: the deployment's settings decide these.
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    prediction: dict[str, Any] | None = None
    # Refused unless left at what changes nothing (see `_refuse_unsupported`).
    n: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None


def _bad(message: str) -> HTTPProblem:
    return HTTPProblem(400, message, type="InvalidInputError")


def _refuse_unsupported(body: ChatCompletionRequest) -> None:
    """400 for what this endpoint cannot do, with what to send instead."""
    if body.n not in (None, 1):
        raise _bad(f"n={body.n} is not supported: this endpoint answers with one choice (n=1).")
    tools = {
        "tools": bool(body.tools),
        "functions": bool(body.functions),
        "tool_choice": body.tool_choice not in (None, "none"),
        "function_call": body.function_call not in (None, "none"),
    }
    used = [name for name, set_ in tools.items() if set_]
    if used:
        raise _bad(
            f"{', '.join(used)}: tool and function calling is not supported on this endpoint "
            "yet. Leave these fields out."
        )
    kind = (body.response_format or {}).get("type", "text")
    if kind != "text":
        raise _bad(
            f"response_format {kind!r} is not supported: replies are text. Leave "
            'response_format out, or send {"type": "text"}.'
        )
    if body.logprobs or body.top_logprobs:
        raise _bad("logprobs are not supported on this endpoint: leave logprobs out.")
    if body.audio is not None or any(kind != "text" for kind in body.modalities or ()):
        raise _bad('Only text replies: leave audio out and send modalities ["text"] or none.')
    if body.web_search_options is not None:
        raise _bad("web_search_options is not supported on this endpoint: leave it out.")
    for index, message in enumerate(body.messages):
        _check_message(index, message)


def _check_message(index: int, message: ChatMessage) -> None:
    where = f"messages[{index}]"
    if message.role in ("tool", "function") or message.tool_calls or message.function_call:
        raise _bad(
            f"{where}: tool and function messages are not supported on this endpoint yet. "
            "Send system, user and assistant messages with text content."
        )
    if message.content is None:
        raise _bad(f"{where}: the message has no content; send its text.")
    if isinstance(message.content, list):
        for part in message.content:
            if part.type != "text" or part.text is None:
                raise _bad(
                    f"{where}: content of type {part.type!r} is not supported; only text "
                    '(a string, or parts {"type": "text", "text": "..."}).'
                )


def _text(message: ChatMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    return "".join(part.text or "" for part in content or ())


def _last_user_text(messages: Sequence[ChatMessage]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            return _text(message)
    raise _bad(
        "With X-Session-Id the request's last user message is the turn, and there is none: "
        "send at least one message with role 'user'."
    )


def _langchain_messages(messages: Sequence[ChatMessage]) -> list[BaseMessage]:
    """The request's messages as LangChain's, to be sent as they are."""
    converted: list[BaseMessage] = []
    for message in messages:
        text, name = _text(message), message.name
        if message.role == "user":
            converted.append(HumanMessage(text, name=name))
        elif message.role == "assistant":
            converted.append(AIMessage(text, name=name))
        elif message.role == "developer":  # ChatOpenAI sends it with its own role
            converted.append(
                SystemMessage(text, name=name, additional_kwargs={"__openai_role__": "developer"})
            )
        else:
            converted.append(SystemMessage(text, name=name))
    return converted


class _Call:
    """One request's turn, in either mode, up to the point where it is run."""

    def __init__(
        self,
        service: Service,
        user: User,
        body: ChatCompletionRequest,
        session_id: str | None,
    ) -> None:
        self.service = service
        self.user = user
        self.bot = service.bot_for(body.model)
        self.id = f"chatcmpl-{uuid4().hex}"
        self.created = int(time.time())
        self.model = self.bot.settings.model
        if session_id is not None:
            self.text = _last_user_text(body.messages)
            self.key = session_key(user, session_id)
        else:
            self.messages = _langchain_messages(body.messages)
            # The call is metered under an id of its own: nothing waits for another call.
            self.key = session_key(user, self.id)
        self.stateful = session_id is not None

    async def reply(self) -> Reply:
        bot, limits = self.bot, self.service.users.limits(self.user)
        if self.stateful:
            return await bot.achat(
                self.text, session_id=self.key, user_id=self.user.name, limits=limits
            )
        return await bot.achat_messages(
            self.messages, session_id=self.key, user_id=self.user.name, limits=limits
        )

    def stream(self) -> AsyncReplyStream:
        bot, limits = self.bot, self.service.users.limits(self.user)
        if self.stateful:
            return bot.astream(
                self.text, session_id=self.key, user_id=self.user.name, limits=limits
            )
        return bot.astream_messages(
            self.messages, session_id=self.key, user_id=self.user.name, limits=limits
        )


def _usage_json(usage: Usage) -> dict[str, Any]:
    """A turn's usage as OpenAI writes it, plus ``cost_usd`` (``None``: price unknown)."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "cost_usd": usage.cost_usd,
    }


@router.post("/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    user: Caller,
    service: ServiceDep,
    x_session_id: Annotated[
        str | None,
        Header(
            description="Your session's id: the server keeps the memory and runs the "
            "request's last user message as its next turn. Without it the request is "
            "stateless (its messages are sent as they are, nothing is stored)."
        ),
    ] = None,
) -> Any:
    """OpenAI's chat completions (JSON, or ``chat.completion.chunk`` events with
    ``"stream": true``), over chatchain: authenticated, metered and capped."""
    _metrics.serving(ROUTE)
    _refuse_unsupported(body)
    call = _Call(service, user, body, session_header(x_session_id))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _Chunks(call, include_usage)
        return await relay(request, service, user, call.stream, chunks)
    reply = await call.reply()
    return {
        "id": call.id,
        "object": "chat.completion",
        "created": call.created,
        "model": reply.usage.model or call.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text, "refusal": None},
                "logprobs": None,
                "finish_reason": reply.message.response_metadata.get("finish_reason") or "stop",
            }
        ],
        "usage": _usage_json(reply.usage),
        "system_fingerprint": None,
    }


class _Chunks:
    """The ``chat.completion.chunk`` events of one reply, ending with ``data: [DONE]``."""

    def __init__(self, call: _Call, include_usage: bool) -> None:
        self.head = {
            "id": call.id,
            "object": "chat.completion.chunk",
            "created": call.created,
            "model": call.model,
            "system_fingerprint": None,
        }
        self.include_usage = include_usage
        # A text chunk is written around its text (the hot path: no dict per chunk); the
        # same JSON as `delta` writes.
        around = _json(self.delta_chunk({"content": "\0"})).split('"\\u0000"')
        self._before, self._after = (b"data: " + around[0].encode(), around[1].encode())

    def delta_chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> Any:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk: dict[str, Any] = {**self.head, "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def start(self) -> bytes:
        return _data(self.delta_chunk({"role": "assistant", "content": ""}))

    def pieces(self, pieces: Sequence[Piece]) -> bytes:
        text = "".join(piece for piece in pieces if isinstance(piece, str))
        if not text:
            return b""
        content = _json(text).encode()
        return b"".join((self._before, content, self._after, b"\r\n\r\n"))

    def end(self, stream: AsyncReplyStream) -> bytes:
        assert stream.usage is not None  # set when the stream ended
        events = _data(self.delta_chunk({}, stream.finish_reason or "stop"))
        if self.include_usage:
            usage = {**self.head, "choices": [], "usage": _usage_json(stream.usage)}
            events += _data(usage)
        return events + b"data: [DONE]\r\n\r\n"

    def error(self, kind: str, status: int, message: str) -> bytes:
        _, body, _ = openai_error(status, kind, message)
        return _data(body)


def _data(data: Any) -> bytes:
    return b"data: " + _json(data).encode() + b"\r\n\r\n"


def _json(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": _OWNER}


@router.get("/models")
def list_models(request: Request, user: Caller, service: ServiceDep) -> dict[str, Any]:
    """The models a request may name, the configured one first, as OpenAI lists models."""
    started = _started(request)
    return {"object": "list", "data": [_model_object(n, started) for n in service.model_names]}


@router.get("/models/{model:path}")  # model names may hold "/" (e.g. "meta-llama/Llama-3-8B")
def get_model(model: str, request: Request, user: Caller, service: ServiceDep) -> dict[str, Any]:
    """One of the models a request may name, or 404 ``model_not_found``."""
    bot = service.bot_for(model)
    return _model_object(bot.settings.model, _started(request))


def _started(request: Request) -> int:
    return app_state(request)["started"]
