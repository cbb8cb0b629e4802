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

**Client tools and structured output.** ``tools`` (function tools), ``tool_choice`` and
``parallel_tool_calls`` are sent to the model with the call, and ``response_format``
``json_object`` or ``json_schema`` too (see `chatchain.ModelOptions`); chatchain never runs a
client's tools. A reply that calls them has ``message.tool_calls`` (streamed: OpenAI's
``delta.tool_calls`` pieces) and ``finish_reason: "tool_calls"``; the client runs them and
sends their results as ``role: "tool"`` messages in its next request. Without
``X-Session-Id`` the request's messages, tool calls and results included, are sent as they
are. With it, the stored session holds the exchange whole: the first request stores the user's
message and the reply with its calls; the next request's *trailing* ``tool`` messages are its
turn (they must answer every call of that reply, each once, else 400) and are stored with the
model's answer to them. With a ``json_schema`` the reply is checked against the schema: one that
does not fit is a 502 (``code`` ``StructuredReplyError``, ``x-should-retry: false``: the call
was billed and is in the usage), and nothing is stored; streamed, such a reply comes whole,
once checked. The legacy ``functions`` / ``function_call`` fields and ``role: "function"``
messages are refused with 400 (send ``tools`` and ``tool_choice``).

**The server's own tools** (``chatchain serve --tools MODULE``) run inside the turn in both
modes, as in the native API: the model may call them, the server runs them and sends the
results back, and the answer (streamed or not) is the final text only; the calls never reach
the client. With ``X-Session-Id`` the whole exchange is stored with the turn, and
``GET /v1/sessions/{id}/messages`` shows it. A request that sends ``tools`` of its own to a
deployment with tools of its own is refused with 400: the model's calls could not be told
apart (which to run here, which to hand back), so the two never meet in one call. A
``response_format`` alone is honoured there, for a call without the server's tools.

``model`` is required, as OpenAI requires it, and picks the model that answers among those
the operator allows (``OPENAI_MODEL`` and ``CHATCHAIN_SERVER_MODELS``, which ``GET
/v1/models`` lists); any other is 404 ``model_not_found``, as OpenAI answers. Each model's
turns are priced, held and capped as that model's, and the ledger names it; the reply's
``model`` is the one the endpoint named (the requested one while streaming).

``max_tokens`` and ``max_completion_tokens`` (the smaller, if both are sent) lower the cap on
the reply, never raise it: the reply takes at most the smallest of the client's limit, the
deployment's (``CHATCHAIN_MAX_TOKENS`` or the model's own) and what the budget can pay for
(see `chatchain.ModelOptions`); a reply cut there ends with ``finish_reason: "length"``. Other
sampling fields (``temperature``, ``top_p``, ``stop``, ``seed``, ...) are accepted and
ignored: the deployment's settings decide them. What would change the kind of
reply (``n`` above 1, legacy function calls, logprobs, audio, images) is refused with 400, as
is a field OpenAI does not define.

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
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from pydantic import BaseModel, ConfigDict, Field

from chatchain import AsyncReplyStream, ModelOptions, Reply, ToolCallDelta, Usage
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
from chatchain.server._streaming import Piece, relay, texts_joined
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
    # The client's cap on the reply: lowers the deployment's, never raises it (see `_options`).
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    # Accepted and ignored: the deployment's settings decide these.
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    prediction: dict[str, Any] | None = None
    # The client's tools and structured output, sent to the model (see `_options`).
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    # Refused unless left at what changes nothing (see `_refuse_unsupported`).
    n: int | None = None
    functions: list[Any] | None = None
    function_call: Any = None
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
    legacy = [
        name
        for name, used in (
            ("functions", bool(body.functions)),
            ("function_call", body.function_call not in (None, "none")),
        )
        if used
    ]
    if legacy:
        raise _bad(
            f"{', '.join(legacy)}: the legacy function calling fields are not supported. Send "
            'the functions as tools ({"type": "function", "function": {...}}) and '
            "function_call as tool_choice."
        )
    if body.logprobs or body.top_logprobs:
        raise _bad("logprobs are not supported on this endpoint: leave logprobs out.")
    if body.audio is not None or any(kind != "text" for kind in body.modalities or ()):
        raise _bad('Only text replies: leave audio out and send modalities ["text"] or none.')
    if body.web_search_options is not None:
        raise _bad("web_search_options is not supported on this endpoint: leave it out.")
    for index, message in enumerate(body.messages):
        _check_message(index, message)


def _options(body: ChatCompletionRequest) -> ModelOptions | None:
    """The request's tools, response format and reply cap for the model, or ``None`` (none
    given).

    ``tool_choice`` and ``parallel_tool_calls`` go only with tools (OpenAI refuses them
    alone); ``"none"`` or ``"auto"`` without tools change nothing. ``max_tokens`` and
    ``max_completion_tokens`` are one cap: the smaller, if both are sent.

    Raises:
        InvalidInputError: A tool, the tool choice or the response format is not OpenAI's,
            or a token limit is not a positive int.
    """
    tools = tuple(body.tools or ())
    choice = body.tool_choice
    limits = [n for n in (body.max_tokens, body.max_completion_tokens) if n is not None]
    options = ModelOptions(
        tools=tools,
        tool_choice=choice if tools or choice not in ("none", "auto") else None,
        parallel_tool_calls=body.parallel_tool_calls if tools else None,
        response_format=body.response_format,
        max_tokens=min(limits) if limits else None,
    )
    return options if options or options.max_tokens is not None else None


def _check_message(index: int, message: ChatMessage) -> None:
    where = f"messages[{index}]"
    if message.role == "function" or message.function_call:
        raise _bad(
            f"{where}: legacy function messages are not supported; send tool calls "
            '(tool_calls) and their results as role "tool" messages with tool_call_id.'
        )
    if message.role == "tool" and not message.tool_call_id:
        raise _bad(f"{where}: a tool message needs the tool_call_id of the call it answers.")
    if message.tool_calls and message.role != "assistant":
        raise _bad(f"{where}: only assistant messages carry tool_calls.")
    if message.content is None:
        if message.tool_calls:
            return
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


def _session_input(messages: Sequence[ChatMessage]) -> str | list[ToolMessage]:
    """A session turn's input: the trailing tool results, or else the last user text."""
    results: list[ToolMessage] = []
    for message in reversed(messages):
        if message.role != "tool":
            break
        results.insert(0, _tool_message(message))
    return results or _last_user_text(messages)


def _tool_message(message: ChatMessage) -> ToolMessage:
    return ToolMessage(_text(message), tool_call_id=str(message.tool_call_id))


def _tool_calls(index: int, message: ChatMessage) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls`` as LangChain's (arguments parsed).

    Raises:
        HTTPProblem: 400, a call is not OpenAI's function call with JSON arguments.
    """
    calls = []
    for number, wire in enumerate(message.tool_calls or ()):
        where = f"messages[{index}].tool_calls[{number}]"
        function = wire.get("function") if isinstance(wire, dict) else None
        if not isinstance(function, dict) or not wire.get("id") or not function.get("name"):
            raise _bad(
                f'{where}: a tool call is {{"id", "type": "function", "function": {{"name", '
                '"arguments"}}.'
            )
        try:
            args = json.loads(function.get("arguments") or "{}")
        except ValueError:
            raise _bad(f"{where}: function.arguments is not JSON.") from None
        if not isinstance(args, dict):
            raise _bad(f"{where}: function.arguments must be a JSON object.")
        calls.append({"name": function["name"], "args": args, "id": str(wire["id"])})
    return calls


def _langchain_messages(messages: Sequence[ChatMessage]) -> list[BaseMessage]:
    """The request's messages as LangChain's, to be sent as they are."""
    converted: list[BaseMessage] = []
    for index, message in enumerate(messages):
        text, name = _text(message), message.name
        if message.role == "user":
            converted.append(HumanMessage(text, name=name))
        elif message.role == "assistant":
            calls = _tool_calls(index, message)
            converted.append(AIMessage(text, name=name, tool_calls=calls))
        elif message.role == "tool":
            converted.append(_tool_message(message))
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
        self.options = _options(body)
        self.client_tools = bool(self.options and self.options.tools)
        if session_id is not None:
            self.input = _session_input(body.messages)
            self.key = session_key(user, session_id)
        else:
            self.messages = _langchain_messages(body.messages)
            # The call is metered under an id of its own: nothing waits for another call.
            self.key = session_key(user, self.id)
        self.stateful = session_id is not None

    async def reply(self) -> Reply:
        bot, limits = self.bot, self.service.users.limits(self.user)
        user_id, options = self.user.name, self.options
        if self.stateful:
            return await bot.achat(
                self.input, session_id=self.key, user_id=user_id, limits=limits, options=options
            )
        return await bot.achat_messages(
            self.messages, session_id=self.key, user_id=user_id, limits=limits, options=options
        )

    def stream(self) -> AsyncReplyStream:
        bot, limits = self.bot, self.service.users.limits(self.user)
        user_id, options = self.user.name, self.options
        if self.stateful:
            return bot.astream(
                self.input, session_id=self.key, user_id=user_id, limits=limits, options=options
            )
        return bot.astream_messages(
            self.messages, session_id=self.key, user_id=user_id, limits=limits, options=options
        )


def _wire_calls(message: BaseMessage) -> list[dict[str, Any]]:
    """A reply's tool calls as OpenAI writes them (``[]``: none)."""
    calls = getattr(message, "tool_calls", None) or []
    return [
        {
            "id": call.get("id"),
            "type": "function",
            "function": {"name": call["name"], "arguments": _json(call.get("args") or {})},
        }
        for call in calls
    ]


def _finish_reason(message: BaseMessage | None, calls: bool) -> str:
    reason = message.response_metadata.get("finish_reason") if message is not None else None
    if calls and reason in (None, "stop"):
        return "tool_calls"
    return reason if isinstance(reason, str) and reason else "stop"


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
        return await relay(request, service, user, call.stream, chunks, tools=call.client_tools)
    reply = await call.reply()
    calls = _wire_calls(reply.message)
    message: dict[str, Any] = {"role": "assistant", "content": reply.text, "refusal": None}
    if calls:
        message = {**message, "content": reply.text or None, "tool_calls": calls}
    return {
        "id": call.id,
        "object": "chat.completion",
        "created": call.created,
        "model": reply.usage.model or call.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _finish_reason(reply.message, bool(calls)),
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
        self.client_tools = call.client_tools
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
        if self.client_tools:
            return b"".join(map(self._piece, texts_joined(pieces)))
        text = "".join(piece for piece in pieces if isinstance(piece, str))
        return self._text(text)

    def _text(self, text: str) -> bytes:
        if not text:
            return b""
        content = _json(text).encode()
        return b"".join((self._before, content, self._after, b"\r\n\r\n"))

    def _piece(self, piece: Piece) -> bytes:
        """One piece of a reply to a request with tools: text, or a piece of a tool call."""
        if isinstance(piece, str):
            return self._text(piece)
        if not isinstance(piece, ToolCallDelta):
            return b""  # the server's tool events: never with the client's tools
        call: dict[str, Any] = {"index": piece.index}
        if piece.id is not None:
            call["id"], call["type"] = piece.id, "function"
        function: dict[str, Any] = {"arguments": piece.arguments}
        if piece.name is not None:
            function = {"name": piece.name, **function}
        return _data(self.delta_chunk({"tool_calls": [{**call, "function": function}]}))

    def end(self, stream: AsyncReplyStream) -> bytes:
        assert stream.usage is not None  # set when the stream ended
        if self.client_tools:
            message = stream.message
            reason = _finish_reason(message, bool(getattr(message, "tool_calls", None)))
        else:
            reason = stream.finish_reason or "stop"
        events = _data(self.delta_chunk({}, reason))
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
