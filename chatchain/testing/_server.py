"""A small OpenAI-compatible chat-completions server for tests, notebooks and benchmarks.

Standard library only: :mod:`http.server` in a background thread. It speaks enough of the
OpenAI wire protocol (``POST /v1/chat/completions``, streamed or not, and ``GET /v1/models``)
for the official ``openai`` client and ``langchain_openai.ChatOpenAI`` to talk to it, and it
can be told to misbehave (errors, rate limits, slow replies, cut streams, broken JSON) through
:class:`Fault`, including the ways of hostile endpoints met in the wild: a stream kept alive
with SSE comments, a body sent a byte at a time, replies under another model name (as proxies
give), and a reply holding a lone surrogate.

Example:
    >>> import openai
    >>> with OpenAITestServer() as server:
    ...     client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0)
    ...     reply = client.chat.completions.create(
    ...         model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    ...     )
    ...     client.close()
    >>> reply.choices[0].message.content
    'Echo: hi'
"""

from __future__ import annotations

import contextlib
import copy
import http
import json
import math
import os
import re
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal

import toktok  # type: ignore[import-untyped]  # ships no type hints

from chatchain.testing._scripts import (
    ScriptedCall,
    fit_schema,
    forced_tool,
    json_schema_format,
    offered_tools,
    results_pending,
)

__all__ = ["Fault", "OpenAITestServer", "ScriptedCall", "echo_reply", "memory_echo_reply"]

ReplyFn = Callable[[list[dict[str, Any]]], str]

_CHAT_PATH = "/v1/chat/completions"
_MODELS_PATH = "/v1/models"
_SYSTEM_FINGERPRINT = "fp_chatchain_test"
_REDACTED = "<redacted>"
# Request headers whose values are credentials; they are never stored.
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key"})
# A piece of text is a run of whitespace followed by a word; trailing whitespace is added to
# the last piece, so that joining the pieces gives the text back exactly.
_WORD_RE = re.compile(r"\s*\S+")
# Socket errors just mean "the client went away" (or stop() closed the connection).
_DISCONNECT_ERRORS = (OSError,)
# Half of an emoji (U+1F600 is \ud83d\ude00): what a proxy that cut a reply mid-pair sends.
_LONE_SURROGATE = " \ud83d"
_KEEP_ALIVE_COMMENT = b": keep-alive\n\n"

_DEFAULT_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "requests",
}
_DEFAULT_ERROR_CODES: dict[int, str] = {401: "invalid_api_key", 429: "rate_limit_exceeded"}
_DEFAULT_MESSAGES_BY_CODE: dict[str, str] = {
    "context_length_exceeded": (
        "This model's maximum context length is exceeded. Please reduce the length of the messages."
    ),
    "invalid_api_key": "Incorrect API key provided. You can find your API key in your settings.",
    "rate_limit_exceeded": "Rate limit reached for requests. Please try again shortly.",
    "insufficient_quota": (
        "You exceeded your current quota, please check your plan and billing details."
    ),
    "model_not_found": "The model does not exist or you do not have access to it.",
}
_DEFAULT_MESSAGES_BY_STATUS: dict[int, str] = {
    400: "Bad request.",
    401: "Incorrect API key provided. You can find your API key in your settings.",
    403: "You are not allowed to access this resource.",
    404: "The requested resource does not exist.",
    408: "The request timed out.",
    409: "The request conflicted with another request. Please try again.",
    422: "The request could not be processed.",
    429: "Rate limit reached for requests. Please try again shortly.",
    500: "The server had an error while processing your request. Sorry about that!",
    502: "Bad gateway.",
    503: "The engine is currently overloaded, please try again later.",
    504: "The server timed out while processing your request.",
}


def _encodable(text: str) -> str:
    """``text`` with any lone surrogate (which no tokenizer takes) as U+FFFD."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _content_text(content: Any) -> str:
    """Text of a message's ``content``: a string, or the joined text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
        return "".join(parts)
    return ""


def echo_reply(messages: list[dict[str, Any]]) -> str:
    """Default reply: ``"Echo: "`` plus the text of the last user message.

    The text is the message's string content, or the text parts of a list content joined
    with no separator (as LangChain's ``message.text`` does). With no user message, the reply
    is just ``"Echo: "``. Tool results sent after the last user message are echoed too:
    ``"Echo: <text> [tool results: <result>; <result>]"``. A chatchain summary request is
    answered with a summary: the existing one, then what the user said in the new lines.

    Args:
        messages: The ``messages`` of an OpenAI chat-completions request.

    Returns:
        The reply text.

    Example:
        >>> echo_reply([{"role": "system", "content": "Be brief."},
        ...             {"role": "user", "content": "hello"}])
        'Echo: hello'
        >>> echo_reply([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
        'Echo: hi'
        >>> echo_reply([{"role": "user", "content": "weather?"},
        ...             {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
        ...              "function": {"name": "weather", "arguments": "{}"}}]},
        ...             {"role": "tool", "tool_call_id": "c1", "content": "sunny"}])
        'Echo: weather? [tool results: sunny]'
    """
    results: list[str] = []
    for message in reversed(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "tool":
            results.insert(0, _content_text(message.get("content")))
        if role == "user":
            asked = _content_text(message.get("content"))
            if asked.startswith(_SUMMARY_REQUEST_MARK):
                return _echo_summary(asked)
            text = "Echo: " + asked
            return f"{text} [tool results: {'; '.join(results)}]" if results else text
    return "Echo: "


# chatchain's running-summary request (chatchain.window), answered as a reader would want it.
_SUMMARY_REQUEST_MARK = "[chatchain summary request]"
_SUMMARY_PARTS = re.compile(
    r"Existing summary:\n(?P<previous>.*?)\n\nNew lines of conversation:\n(?P<lines>.*)"
    r"\n\nThe extended summary:",
    re.S,
)


def _echo_summary(request: str) -> str:
    r"""A summary request's answer without a model: the summary so far, then what the user
    said in the new lines (not an echo of the request, which would nest in the next one).

    Example:
        >>> _echo_summary("[chatchain summary request]\nExisting summary:\n(none yet)\n\n"
        ...     "New lines of conversation:\nHuman: I'm Bob.\nAI: Hi Bob!\n\n"
        ...     "The extended summary:")
        "The user said: I'm Bob."
    """
    parts = _SUMMARY_PARTS.search(request)
    if parts is None:
        return "The user said nothing yet."
    said = [
        line.removeprefix("Human: ").strip()
        for line in parts["lines"].splitlines()
        if line.startswith("Human: ")
    ]
    previous = parts["previous"].strip()
    start = "The user said:" if previous == "(none yet)" else previous
    return " ".join([start, *said])


def memory_echo_reply(messages: list[dict[str, Any]]) -> str:
    """A reply that echoes the last message and says how many earlier messages were sent.

    The memory at work, shown without a model: the demo's and ``chatchain chat --offline``'s
    reply. System messages (the system prompt, a running summary) are not counted.

    Args:
        messages: The ``messages`` of an OpenAI chat-completions request.

    Returns:
        The reply text.

    Example:
        >>> memory_echo_reply([{"role": "system", "content": "Be brief."},
        ...                    {"role": "user", "content": "Hi! I'm Bob"},
        ...                    {"role": "assistant", "content": "Hello Bob!"},
        ...                    {"role": "user", "content": "What's my name?"}])
        "(echo; I was sent 2 earlier messages) What's my name?"
    """
    earlier = sum(1 for message in messages[:-1] if message.get("role") != "system")
    last = _content_text(messages[-1].get("content")) if messages else ""
    noun = "message" if earlier == 1 else "messages"
    return f"(echo; I was sent {earlier} earlier {noun}) {last}"


@dataclass(frozen=True)
class Fault:
    """One misbehaviour for the next matching request(s).

    Faults apply to ``POST /v1/chat/completions`` only and are queued first in, first out:
    every chat request consumes one use of the fault at the head of the queue. Within one
    fault, ``delay`` happens first, then ``status`` (an error reply) if set, else
    ``malformed``, else ``cut_after`` (for streamed requests; a non-streamed request is
    answered normally, but still uses up the fault).

    The hostile modes (``keep_alive``, ``drip``, ``answer_model``, ``lone_surrogate``,
    ``ignore_max_tokens``) shape an otherwise normal reply; a trickle ends by itself, then the
    reply is completed, so that a client without a whole-request deadline waits it out and
    succeeds.

    Attributes:
        status: Reply with this HTTP status (400-599) and an OpenAI-style error body
            ``{"error": {"message", "type", "param", "code"}}``.
        retry_after: With ``status``, send ``Retry-After`` (seconds) and ``retry-after-ms``
            headers. The ``openai`` client honours ``retry-after-ms`` first.
        code: ``error.code``, e.g. ``"context_length_exceeded"``, ``"rate_limit_exceeded"``,
            ``"invalid_api_key"`` (default: ``"invalid_api_key"`` for 401,
            ``"rate_limit_exceeded"`` for 429, else ``None``).
        message: ``error.message`` (default: a sensible message for the code or status).
        delay: Seconds to wait before answering, so a client timeout can fire.
        cut_after: Streaming only: send this many content chunks (for a tool-call reply,
            argument pieces), then drop the connection (no finishing chunk, no ``[DONE]``,
            no end of the chunked body).
        malformed: Answer 200 with a body that is not valid JSON (non-streamed) or with a
            garbage SSE ``data:`` line (streamed).
        times: How many requests this fault applies to.
        keep_alive: Seconds to hold the reply back after the response head, sending an SSE
            comment (``": keep-alive"``, streamed) or a blank (JSON whitespace, non-streamed)
            every ``interval`` seconds: a client's read timeout never fires.
        stall_after: Streaming, with ``keep_alive``: content chunks sent before the
            keep-alive comments (0: the comments come before any data).
        drip: Seconds during which the body goes out one byte every ``interval`` seconds;
            the rest follows at once.
        interval: Seconds between the bytes of a ``keep_alive`` or ``drip`` trickle.
        answer_model: Answer under this model name whatever the request asked for, as
            proxies do (e.g. ``"openrouter/gpt-4o-mini"`` for ``"gpt-4o-mini"``).
        lone_surrogate: End the reply with half an emoji, a lone surrogate (U+D83D, sent as
            the JSON escape ``\\ud83d``): valid JSON, but not valid Unicode.
        ignore_max_tokens: Answer (and bill) the whole reply whatever ``max_tokens`` or
            ``max_completion_tokens`` asked for, as some proxies and local servers do.

    Example:
        >>> server = OpenAITestServer()
        >>> server.add_fault(Fault(status=429, retry_after=0.05))   # one rate limit
        >>> server.add_fault(Fault(delay=2.0, times=3))            # then three slow replies
        >>> server.add_fault(Fault(keep_alive=30.0))               # then a 30 s keep-alive trickle
    """

    status: int | None = None
    retry_after: float | None = None
    code: str | None = None
    message: str | None = None
    delay: float = 0.0
    cut_after: int | None = None
    malformed: bool = False
    times: int = 1
    keep_alive: float = 0.0
    stall_after: int = 0
    drip: float = 0.0
    interval: float = 1.0
    answer_model: str | None = None
    lone_surrogate: bool = False
    ignore_max_tokens: bool = False

    def __post_init__(self) -> None:
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError(f"Fault.status must be an HTTP error status (400-599): {self.status}")
        if self.retry_after is not None and self.retry_after < 0:
            raise ValueError(f"Fault.retry_after must be >= 0: {self.retry_after}")
        if self.delay < 0:
            raise ValueError(f"Fault.delay must be >= 0: {self.delay}")
        if self.cut_after is not None and self.cut_after < 0:
            raise ValueError(f"Fault.cut_after must be >= 0: {self.cut_after}")
        if self.times < 1:
            raise ValueError(f"Fault.times must be >= 1: {self.times}")
        for name in ("keep_alive", "drip", "stall_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"Fault.{name} must be >= 0: {getattr(self, name)}")
        if self.interval <= 0:
            raise ValueError(f"Fault.interval must be > 0: {self.interval}")
        if self.answer_model == "":
            raise ValueError("Fault.answer_model must not be empty: give a model name or None")

    def _ticks(self, seconds: float) -> int:
        """How many bytes a trickle of ``seconds`` sends, one every ``interval``."""
        return math.ceil(seconds / self.interval) if seconds > 0 else 0


class _ReplyError(Exception):
    """An OpenAI-style error reply, raised inside the request handler."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or _DEFAULT_ERROR_TYPES.get(status) or "server_error"
        self.code = code
        self.param = param
        self.headers = list(headers)

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return json.dumps({"error": error}).encode()


def _format_seconds(seconds: float) -> str:
    if float(seconds).is_integer():
        return str(int(seconds))
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def _fault_error(fault: Fault, status: int) -> _ReplyError:
    code = fault.code if fault.code is not None else _DEFAULT_ERROR_CODES.get(status)
    message = fault.message
    if message is None:
        message = (_DEFAULT_MESSAGES_BY_CODE.get(code) if code else None) or (
            _DEFAULT_MESSAGES_BY_STATUS.get(status, f"Error {status}.")
        )
    type_ = "invalid_request_error" if code == "context_length_exceeded" else None
    headers: list[tuple[str, str]] = []
    if fault.retry_after is not None:
        headers.append(("retry-after", _format_seconds(fault.retry_after)))
        headers.append(("retry-after-ms", str(round(fault.retry_after * 1000))))
    return _ReplyError(status, message, type_=type_, code=code, headers=headers)


def _split_words(text: str, words_per_chunk: int) -> list[str]:
    """Split ``text`` into chunks of ``words_per_chunk`` words; ``"".join(chunks) == text``."""
    pieces = _WORD_RE.findall(text)
    consumed = sum(len(piece) for piece in pieces)
    if consumed < len(text):
        if pieces:
            pieces[-1] += text[consumed:]
        else:
            pieces = [text]
    if words_per_chunk == 1:
        return pieces
    return [
        "".join(pieces[i : i + words_per_chunk]) for i in range(0, len(pieces), words_per_chunk)
    ]


def _stream_deltas(
    answer: str | list[dict[str, Any]], words_per_chunk: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The first delta of a streamed reply and the rest, as OpenAI streams them.

    Text: the role with empty content, then the words. Tool calls: each call's id, type and
    name with empty arguments (all calls in the first delta), then each call's arguments in
    pieces of a few characters, tagged with the call's ``index``.
    """
    if isinstance(answer, str):
        pieces = _split_words(answer, words_per_chunk)
        return {"role": "assistant", "content": ""}, [{"content": piece} for piece in pieces]
    heads = []
    deltas: list[dict[str, Any]] = []
    for index, call in enumerate(answer):
        function = call["function"]
        heads.append(
            {
                "index": index,
                "id": call["id"],
                "type": "function",
                "function": {"name": function["name"], "arguments": ""},
            }
        )
        arguments = function["arguments"]
        step = 4 * words_per_chunk
        deltas += [
            {"tool_calls": [{"index": index, "function": {"arguments": arguments[i : i + step]}}]}
            for i in range(0, len(arguments), step)
        ]
    return {"role": "assistant", "content": None, "tool_calls": heads}, deltas


_ALL_SENT = "\x00all"  # marks a stream whose every delta went out (billed as computed)


def _delta_text(delta: dict[str, Any]) -> str:
    """The text a streamed delta carries: content, or a tool call's arguments."""
    calls = delta.get("tool_calls") or []
    return str(delta.get("content") or "") + "".join(
        str(call.get("function", {}).get("arguments") or "") for call in calls
    )


def _status_line(status: int) -> str:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return f"HTTP/1.1 {status} {phrase}\r\n"


class _HTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that tracks its open connections so it can close them."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], owner: OpenAITestServer) -> None:
        self.owner = owner
        self.connections: set[socket.socket] = set()
        self.connections_changed = threading.Condition()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_changed:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        try:
            super().shutdown_request(request)
        finally:
            with self.connections_changed:
                self.connections.discard(request)
                self.connections_changed.notify_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients disconnecting (or stop() closing their sockets) is normal here; anything
        # else is a bug in the server and is worth a traceback.
        if isinstance(sys.exc_info()[1], _DISCONNECT_ERRORS):
            return
        super().handle_error(request, client_address)  # pragma: no cover

    def close_connections(self, timeout: float) -> None:
        """Shut down every open connection socket and wait (a little) for handlers to end."""
        with self.connections_changed:
            for conn in list(self.connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self.connections_changed.wait_for(lambda: not self.connections, timeout)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "chatchain-test-server"
    sys_version = ""
    disable_nagle_algorithm = True
    server: _HTTPServer

    # --- plumbing -----------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request log lines."""

    def handle(self) -> None:
        try:
            super().handle()
        except _DISCONNECT_ERRORS:
            self.close_connection = True

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError(f"negative Content-Length: {length}")
        return self.rfile.read(length) if length > 0 else b""

    def _write_head(self, status: int, headers: Iterable[tuple[str, str]]) -> bytes:
        lines = [_status_line(status)]
        lines.append(f"Date: {self.date_time_string()}\r\n")
        lines.append(f"Server: {self.server_version}\r\n")
        lines.append(f"x-request-id: req_{os.urandom(12).hex()}\r\n")
        for name, value in headers:
            lines.append(f"{name}: {value}\r\n")
        if self.close_connection:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        head = self._write_head(
            status,
            [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers],
        )
        self.wfile.write(head + body)

    def _send_json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode())

    def _send_error(self, error: _ReplyError) -> None:
        self._send(error.status, error.body(), headers=error.headers)

    def _not_found(self) -> None:
        path = self.path.split("?", 1)[0]
        self._send_error(_ReplyError(404, f"Invalid URL ({self.command} {path})"))

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    # --- routes -------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self._path()
        owner = self.server.owner
        if path == _MODELS_PATH:
            self._send_json(200, {"object": "list", "data": [owner._model_object()]})
        elif path.startswith(_MODELS_PATH + "/") and path[len(_MODELS_PATH) + 1 :] == owner._model:
            self._send_json(200, owner._model_object())
        elif path.startswith(_MODELS_PATH + "/"):
            model = path[len(_MODELS_PATH) + 1 :]
            self._send_error(
                _ReplyError(
                    404,
                    f"The model `{model}` does not exist or you do not have access to it.",
                    code="model_not_found",
                )
            )
        else:
            self._not_found()

    def do_POST(self) -> None:
        try:
            body = self._read_body()
        except ValueError:
            self.close_connection = True
            self._send_error(_ReplyError(400, "Could not read the request body."))
            return
        if self._path() == _CHAT_PATH:
            self.server.owner._handle_chat(self, body)
        else:
            self._not_found()

    def _other_method(self) -> None:
        try:
            self._read_body()
        except ValueError:
            self.close_connection = True
        if self._path() in (_CHAT_PATH, _MODELS_PATH):
            self._send_error(_ReplyError(405, f"Method {self.command} not allowed on {self.path}"))
        else:
            self._not_found()

    do_PUT = do_PATCH = do_DELETE = _other_method


class OpenAITestServer:
    """An OpenAI-compatible chat-completions server running in a background thread.

    Replies come from :meth:`queue_replies` first, then from ``reply(messages)``. Usage is
    computed with :meth:`count_tokens`, a real tokenizer (``encoding``, o200k_base by
    default: a CJK character is about a token, as real endpoints bill it): ``prompt_tokens``
    is the sum over messages of ``count_tokens(content text) + 4``, plus 3;
    ``completion_tokens`` is ``count_tokens(reply)``. ``max_tokens`` /
    ``max_completion_tokens`` truncate the reply to that many tokens
    (``finish_reason="length"``). With ``context_window``, a
    prompt longer than that many tokens gets a 400 ``context_length_exceeded`` error.

    Every chat request is recorded in :attr:`requests` (``Authorization`` and ``api-key``
    values are replaced by ``"<redacted>"``).

    Tool calls, so that you can test your own tools offline with the real client (OpenAI's
    wire format: ``message.tool_calls``, ``finish_reason: "tool_calls"``, and when streaming
    one delta with each call's id and name, then its ``arguments`` in pieces):

    - a scripted sequence: :meth:`queue_tool_calls` queues one reply that calls one or more
      tools (several: parallel calls), among the :meth:`queue_replies` texts; e.g. calls,
      then the final answer the model gives once it has the results;
    - a rule: :meth:`add_tool_rule` ``(name, args)`` calls ``name`` with ``args`` whenever a
      request offers that tool in ``tools`` and holds no tool result since the last user
      message (the rules of every offered tool fire together, as parallel calls); once the
      results are sent, the reply is the answer (queued, or ``reply(messages)``, which by
      default echoes the user's text and the tool results).

    A request whose ``tool_choice`` forces a function (what ``with_structured_output``'s
    ``function_calling`` method sends) gets a call of it, its arguments the next queued
    reply (e.g. from :meth:`queue_json`) or else made to fit the function's parameters.
    Queued replies come first, then rules, then ``reply``.

    Structured replies: a request with ``response_format: {"type": "json_schema", ...}`` is
    answered with the next queued reply (queue JSON with :meth:`queue_json`, or any text to
    test replies that do not validate) or else with a JSON value made to fit the schema
    (simple schemas; see `fit_schema`). With ``json_schema=False`` such requests are refused
    with a 400, as servers without structured outputs do.

    Usage of tool traffic: the tools' JSON and the calls' names and arguments in the
    messages count into ``prompt_tokens``; a reply's calls into ``completion_tokens``.

    Args:
        host: Interface to bind (``"127.0.0.1"`` by default; ``"::1"`` for IPv6).
        port: Port to bind; 0 picks a free one.
        reply: Makes the reply text from the request's messages.
        context_window: Maximum prompt size in tokens, or ``None`` for no limit.
        overflow_wording: How a prompt over ``context_window`` is refused: ``"openai"``
            (code ``context_length_exceeded``) or ``"litellm"`` (LiteLLM's proxy: a 400
            ``litellm.ContextWindowExceededError`` with code ``"400"``).
        chunk_words: Words per content chunk when streaming.
        model: The model listed by ``GET /v1/models``, and used in replies when a request
            names none.
        stream_usage: ``False`` never sends a usage chunk when streaming, even when asked
            with ``stream_options.include_usage`` (as mockllm does).
        json_schema: ``False`` refuses ``response_format`` of type ``json_schema`` with a
            400 ``invalid_request_error`` (param ``response_format``), as OpenAI does for
            models without structured outputs and many compatible servers do.
        chunk_interval: Seconds to wait before each streamed content (or tool-call) chunk,
            as a model generating text does (0: all at once). Each waiting stream holds a
            thread.
        encoding: The tokenizer that bills: ``"o200k_base"`` or ``"cl100k_base"``; ``None``
            for about one token per 4 characters (and replies cut at ``4 * max_tokens``
            characters), which bills CJK text at a quarter of what real endpoints do.

    Example:
        >>> import openai
        >>> with OpenAITestServer(context_window=4096) as server:
        ...     server.queue_replies("first", "second")
        ...     with openai.OpenAI(base_url=server.base_url, api_key="k") as client:
        ...         reply = client.chat.completions.create(
        ...             model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        ...         )
        ...     len(server.requests)
        1
        >>> reply.choices[0].message.content, reply.usage.total_tokens
        ('first', 9)

        A tool call, then the answer once the result is sent:

        >>> city = {"type": "object", "properties": {"city": {"type": "string"}}}
        >>> weather = {"type": "function",
        ...            "function": {"name": "get_weather", "parameters": city}}
        >>> with OpenAITestServer() as server:
        ...     server.add_tool_rule("get_weather", {"city": "Oslo"})
        ...     with openai.OpenAI(base_url=server.base_url, api_key="k") as client:
        ...         asked = [{"role": "user", "content": "Weather in Oslo?"}]
        ...         first = client.chat.completions.create(
        ...             model="gpt-4o-mini", messages=asked, tools=[weather])
        ...         call = first.choices[0].message.tool_calls[0]
        ...         result = {"role": "tool", "tool_call_id": call.id, "content": "sunny"}
        ...         second = client.chat.completions.create(model="gpt-4o-mini", tools=[weather],
        ...             messages=[*asked, first.choices[0].message.model_dump(), result])
        >>> first.choices[0].finish_reason, call.function.name, call.function.arguments
        ('tool_calls', 'get_weather', '{"city": "Oslo"}')
        >>> second.choices[0].message.content
        'Echo: Weather in Oslo? [tool results: sunny]'
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        reply: Callable[[list[dict[str, Any]]], str] = echo_reply,
        context_window: int | None = None,
        chunk_words: int = 1,
        model: str = "gpt-4o-mini",
        stream_usage: bool = True,
        json_schema: bool = True,
        chunk_interval: float = 0.0,
        overflow_wording: Literal["openai", "litellm"] = "openai",
        encoding: str | None = "o200k_base",
    ) -> None:
        if chunk_interval < 0:
            raise ValueError(f"chunk_interval must be >= 0: {chunk_interval}")
        if chunk_words < 1:
            raise ValueError(f"chunk_words must be >= 1: {chunk_words}")
        if context_window is not None and context_window < 1:
            raise ValueError(f"context_window must be >= 1: {context_window}")
        self._host = host
        self._port = port
        self._reply = reply
        self._context_window = context_window
        self._overflow_wording = overflow_wording
        self._chunk_words = chunk_words
        self._model = model
        self._stream_usage = stream_usage
        self._json_schema = json_schema
        self._chunk_interval = chunk_interval
        self._encoding = encoding
        self._created = int(time.time())
        self._lock = threading.Lock()
        self._faults: deque[list[Any]] = deque()  # [Fault, remaining uses]
        self._replies: deque[str | tuple[ScriptedCall, ...]] = deque()
        self._tool_rules: dict[str, dict[str, Any]] = {}
        self._requests: list[dict[str, Any]] = []
        self._billed = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._lifecycle = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._base_url: str | None = None

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The base URL to give a client, e.g. ``"http://127.0.0.1:PORT/v1"``.

        Raises:
            RuntimeError: If the server is not running.
        """
        if self._base_url is None:
            raise RuntimeError("OpenAITestServer is not running; call start() first")
        return self._base_url

    def start(self) -> OpenAITestServer:
        """Bind the socket and serve in a daemon thread.

        Returns:
            The server itself, so ``server = OpenAITestServer().start()`` works.

        Raises:
            RuntimeError: If the server is already running.
        """
        self.count_tokens("warm")  # loads the tokenizer now, not in a request a client times
        with self._lifecycle:
            if self._httpd is not None:
                raise RuntimeError("OpenAITestServer is already running")
            server_cls = _HTTPServer6 if ":" in self._host else _HTTPServer
            httpd = server_cls((self._host, self._port), self)
            port = httpd.server_address[1]
            url_host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
                self._host, self._host
            )
            if ":" in url_host:
                url_host = f"[{url_host}]"
            self._stopping = threading.Event()
            thread = threading.Thread(
                target=httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"OpenAITestServer:{port}",
                daemon=True,
            )
            thread.start()
            self._httpd = httpd
            self._thread = thread
            self._base_url = f"http://{url_host}:{port}/v1"
        return self

    def stop(self) -> None:
        """Stop serving, close all connections (even kept-alive ones) and join the thread.

        Requests still waiting out a :attr:`Fault.delay` are abandoned. Calling ``stop`` on a
        server that is not running does nothing.
        """
        with self._lifecycle:
            httpd, thread = self._httpd, self._thread
            if httpd is None:
                return
            self._httpd = self._thread = None
            self._base_url = None
            self._stopping.set()
            httpd.shutdown()
            httpd.close_connections(timeout=2.0)
            httpd.server_close()
            if thread is not None:
                thread.join(timeout=2.0)

    def __enter__(self) -> OpenAITestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- scripting ----------------------------------------------------------------------

    def add_fault(self, fault: Fault) -> None:
        """Queue a fault; each chat request uses up one use of the fault at the head.

        Args:
            fault: The misbehaviour, applied to the next ``fault.times`` chat requests once
                the faults queued before it are used up.

        Example:
            >>> server = OpenAITestServer()
            >>> server.add_fault(Fault(status=500, times=2))
        """
        with self._lock:
            self._faults.append([fault, fault.times])

    def queue_replies(self, *texts: str) -> None:
        """Queue canned replies, used in order before falling back to ``reply``.

        A reply is used up only by a request that gets it (fully, or cut by
        :attr:`Fault.cut_after`), not by a request answered with an error.

        Args:
            *texts: The reply texts.

        Example:
            >>> server = OpenAITestServer()
            >>> server.queue_replies("Hello!", "Goodbye!")
        """
        with self._lock:
            self._replies.extend(texts)

    def queue_tool_calls(self, *calls: ScriptedCall) -> None:
        """Queue one reply that calls tools (several calls: parallel ones), among the texts.

        Args:
            *calls: The calls of that one reply, in order.

        Example:
            >>> server = OpenAITestServer()
            >>> server.queue_tool_calls(ScriptedCall("get_weather", {"city": "Oslo"}),
            ...                         ScriptedCall("get_time", {"zone": "CET"}))
            >>> server.queue_replies("Sunny, and it is noon.")   # the answer after the results
        """
        if not calls:
            raise ValueError("queue_tool_calls needs at least one ScriptedCall")
        with self._lock:
            self._replies.append(tuple(calls))

    def queue_json(self, *values: Any) -> None:
        """Queue replies that are these values as JSON text (structured replies).

        Example:
            >>> server = OpenAITestServer()
            >>> server.queue_json({"city": "Oslo", "days": 3})
        """
        self.queue_replies(*(json.dumps(value) for value in values))

    def add_tool_rule(self, name: str, args: Mapping[str, Any] | None = None) -> None:
        """Call tool ``name`` with ``args`` whenever a request offers it and awaits its result.

        A request "awaits" while its messages since the last user message hold no tool
        result: the first request of a turn. The request after the results gets the answer.
        A later rule for the same name replaces the earlier one.

        Example:
            >>> server = OpenAITestServer()
            >>> server.add_tool_rule("get_weather", {"city": "Oslo"})
        """
        arguments = dict(args or {})
        ScriptedCall(name, arguments)  # checks the name and that the args are JSON
        with self._lock:
            self._tool_rules[name] = arguments

    def clear(self) -> None:
        """Drop queued faults, replies and tool rules, and forget the recorded requests.

        Example:
            >>> server = OpenAITestServer()
            >>> server.queue_replies("unused")
            >>> server.clear()
        """
        with self._lock:
            self._faults.clear()
            self._replies.clear()
            self._tool_rules.clear()
            self._requests.clear()
            self._billed = dict.fromkeys(self._billed, 0)

    @property
    def requests(self) -> list[dict[str, Any]]:
        """A copy of every chat request received, in order.

        Each item is ``{"body": parsed JSON body (None if it was not JSON), "headers":
        {lower-case name: value}}``. Credential headers (``authorization``,
        ``proxy-authorization``, ``api-key``) are stored as ``"<redacted>"``.

        Example:
            >>> OpenAITestServer().requests
            []
        """
        with self._lock:
            return copy.deepcopy(self._requests)

    @property
    def billed(self) -> dict[str, int]:
        """What the server billed so far, as an endpoint would: ``requests``,
        ``prompt_tokens`` and ``completion_tokens`` of every reply it answered (a stream
        the client left early is billed for the reply tokens sent before it left).

        Example:
            >>> OpenAITestServer().billed
            {'requests': 0, 'prompt_tokens': 0, 'completion_tokens': 0}
        """
        with self._lock:
            return dict(self._billed)

    def _bill(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self._billed["requests"] += 1
            self._billed["prompt_tokens"] += prompt_tokens
            self._billed["completion_tokens"] += completion_tokens

    def count_tokens(self, text: str) -> int:
        """The server's token count of ``text``: its tokens in ``encoding``.

        Args:
            text: Any text.

        Returns:
            The number of tokens; with ``encoding=None``, 0 for empty text, else
            ``max(1, (len(text) + 3) // 4)``.

        Example:
            >>> server = OpenAITestServer()
            >>> server.count_tokens("Hello world"), server.count_tokens("你好世界")
            (2, 2)
            >>> OpenAITestServer(encoding=None).count_tokens("Hello world")
            3
        """
        if self._encoding is None:
            return max(1, (len(text) + 3) // 4) if text else 0
        return int(toktok.batch_count([_encodable(text)], self._encoding, threads=1)[0])

    def _cut(self, text: str, max_tokens: int) -> str | None:
        """``text`` cut to ``max_tokens`` tokens, or ``None`` when it fits."""
        if self._encoding is None:
            return text[: 4 * max_tokens] if len(text) > 4 * max_tokens else None
        cut, tokens = toktok.truncate(_encodable(text), max_tokens, self._encoding)
        return str(cut) if tokens > max_tokens else None

    # --- request handling ---------------------------------------------------------------

    def _model_object(self) -> dict[str, Any]:
        return {
            "id": self._model,
            "object": "model",
            "created": self._created,
            "owned_by": "system",
        }

    def _record_and_take_fault(self, body: Any, headers: dict[str, str]) -> Fault | None:
        with self._lock:
            self._requests.append({"body": body, "headers": headers})
            if not self._faults:
                return None
            entry = self._faults[0]
            fault: Fault = entry[0]
            entry[1] -= 1
            if entry[1] <= 0:
                self._faults.popleft()
            return fault

    def _take_answer(
        self, body: dict[str, Any], messages: list[dict[str, Any]]
    ) -> str | list[dict[str, Any]]:
        """The reply: its text, or its tool calls in the wire format."""
        with self._lock:
            queued = self._replies.popleft() if self._replies else None
            rules = dict(self._tool_rules)
        if isinstance(queued, tuple):
            return [call.wire(index) for index, call in enumerate(queued)]
        offered = offered_tools(body)
        forced = forced_tool(body)
        if forced is not None:
            arguments = (
                queued if queued is not None else json.dumps(fit_schema(offered.get(forced, {})))
            )
            return [ScriptedCall(forced).wire(0, arguments)]
        if queued is not None:
            return queued
        calls = [ScriptedCall(name, args) for name, args in rules.items() if name in offered]
        if calls and results_pending(messages):
            return [call.wire(index) for index, call in enumerate(calls)]
        schema = json_schema_format(body)
        if schema is not None:
            return json.dumps(fit_schema(schema))
        return self._reply_text(messages)

    def _reply_text(self, messages: list[dict[str, Any]]) -> str:
        try:
            text = self._reply(messages)
        except Exception as exc:
            raise _ReplyError(500, f"The test server's reply function raised {exc!r}") from exc
        if not isinstance(text, str):
            raise _ReplyError(500, f"The test server's reply function returned {type(text)}")
        return text

    def _prompt_tokens(self, body: dict[str, Any], messages: list[dict[str, Any]]) -> int:
        tokens = 3
        for m in messages:
            tokens += (
                self.count_tokens(_content_text(m.get("content") if isinstance(m, dict) else None))
                + 4
            )
            calls = m.get("tool_calls") if isinstance(m, dict) else None
            if isinstance(calls, list) and calls:
                tokens += self.count_tokens(json.dumps(calls))
        tools = body.get("tools")
        if isinstance(tools, list) and tools:
            tokens += self.count_tokens(json.dumps(tools))
        return tokens

    def _overflow(self, prompt_tokens: int) -> _ReplyError:
        if self._overflow_wording == "litellm":
            return _ReplyError(
                400,
                "litellm.ContextWindowExceededError: litellm.BadRequestError: "
                "ContextWindowExceededError: Input is too long for requested model. "
                f"({prompt_tokens} tokens > {self._context_window})",
                code="400",
            )
        return _ReplyError(
            400,
            f"This model's maximum context length is {self._context_window} tokens. "
            f"However, your messages resulted in {prompt_tokens} tokens. "
            "Please reduce the length of the messages.",
            code="context_length_exceeded",
            param="messages",
        )

    def _refuse_json_schema(self, body: dict[str, Any]) -> None:
        if self._json_schema or json_schema_format(body) is None:
            return
        raise _ReplyError(
            400,
            "Invalid parameter: 'response_format' of type 'json_schema' is not supported with "
            "this model. Learn more about supported models at the Structured Outputs guide: "
            "https://platform.openai.com/docs/guides/structured-outputs",
            param="response_format",
        )

    def _handle_chat(self, handler: _Handler, raw: bytes) -> None:
        headers: dict[str, str] = {}
        for name, value in handler.headers.items():
            key = name.lower()
            if key in _SECRET_HEADERS:
                value = _REDACTED
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        body: Any
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        fault = self._record_and_take_fault(body, headers)
        try:
            if fault is not None and fault.delay > 0 and self._stopping.wait(fault.delay):
                handler.close_connection = True
                return
            if fault is not None and fault.status is not None:
                raise _fault_error(fault, fault.status)
            self._complete(handler, body, fault)
        except _ReplyError as error:
            handler._send_error(error)

    def _complete(self, handler: _Handler, body: Any, fault: Fault | None) -> None:
        if not isinstance(body, dict):
            raise _ReplyError(
                400,
                "We could not parse the JSON body of your request. The OpenAI API expects a "
                "JSON payload, but what was sent was not valid JSON.",
            )
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _ReplyError(
                400, "'messages' must be a non-empty array of messages.", param="messages"
            )
        max_tokens: Any = body.get("max_completion_tokens")
        max_param = "max_completion_tokens"
        if max_tokens is None:
            max_tokens, max_param = body.get("max_tokens"), "max_tokens"
        if max_tokens is not None and (
            not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
        ):
            raise _ReplyError(
                400,
                f"Invalid '{max_param}': expected an integer >= 1, got {max_tokens!r}.",
                param=max_param,
                code="integer_below_min_value",
            )
        model = body.get("model")
        if not isinstance(model, str) or not model:
            model = self._model
        if fault is not None and fault.answer_model:
            model = fault.answer_model
        stream = body.get("stream") is True

        self._refuse_json_schema(body)
        prompt_tokens = self._prompt_tokens(body, messages)
        if self._context_window is not None and prompt_tokens > self._context_window:
            raise self._overflow(prompt_tokens)

        if fault is not None and fault.malformed:
            if stream:
                self._stream_malformed(handler)
            else:
                handler._send(200, b'{"id": "chatcmpl-malformed", "object": "chat.completion", [')
            return

        answer = self._take_answer(body, messages)
        calls = answer if isinstance(answer, list) else None
        text = answer if isinstance(answer, str) else ""
        finish_reason = "stop" if calls is None else "tool_calls"
        if fault is not None and fault.ignore_max_tokens:
            max_tokens = None
        cut = None if max_tokens is None else self._cut(text, max_tokens)
        if cut is not None:
            text, finish_reason = cut, "length"
        if fault is not None and fault.lone_surrogate and calls is None:
            text += _LONE_SURROGATE
        completion_tokens = self.count_tokens(text if calls is None else json.dumps(calls))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
        completion_id = "chatcmpl-" + os.urandom(12).hex()
        created = int(time.time())
        if not stream:
            self._bill(prompt_tokens, completion_tokens)
            self._send_reply(
                handler,
                fault,
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": text if calls is None else None,
                                "refusal": None,
                                "annotations": [],
                                **({"tool_calls": calls} if calls else {}),
                            },
                            "logprobs": None,
                            "finish_reason": finish_reason,
                        }
                    ],
                    "usage": usage,
                    "service_tier": "default",
                    "system_fingerprint": _SYSTEM_FINGERPRINT,
                },
            )
            return

        stream_options = body.get("stream_options")
        include_usage = (
            self._stream_usage
            and isinstance(stream_options, dict)
            and stream_options.get("include_usage") is True
        )
        answer = text if calls is None else calls
        sent: list[str] = []  # what went out: a client that leaves is billed for that only
        try:
            self._stream(
                handler,
                answer,
                completion_id=completion_id,
                created=created,
                model=model,
                finish_reason=finish_reason,
                usage=usage if include_usage else None,
                include_usage=include_usage,
                fault=fault,
                sent=sent,
            )
        finally:
            whole = len(sent) == 1 and sent[0] is _ALL_SENT
            billed = completion_tokens if whole else self.count_tokens("".join(sent))
            self._bill(prompt_tokens, billed)

    def _send_reply(self, handler: _Handler, fault: Fault | None, reply: dict[str, Any]) -> None:
        body = json.dumps(reply).encode()
        if fault is None or not (fault.keep_alive or fault.drip):
            handler._send(200, body)
            return
        blanks = fault._ticks(fault.keep_alive)  # JSON may start with whitespace
        length = str(blanks + len(body))
        head = [("Content-Type", "application/json"), ("Content-Length", length)]
        handler.wfile.write(handler._write_head(200, head))
        if self._trickle(handler, fault, [b" "] * blanks):
            self._drip(handler, fault, body, chunked=False)

    def _trickle(self, handler: _Handler, fault: Fault, pieces: list[bytes]) -> bool:
        """Send ``pieces`` one every ``fault.interval``; ``False`` if the server is stopping."""
        for piece in pieces:
            handler.wfile.write(piece)
            if self._stopping.wait(fault.interval):
                self._drop(handler)
                return False
        return True

    def _drip(self, handler: _Handler, fault: Fault, data: bytes, *, chunked: bool) -> bool:
        """Send ``data`` a byte at a time for ``fault.drip`` seconds, then the rest at once."""
        dripped = min(len(data), fault._ticks(fault.drip))
        pieces = [self._frame(data[i : i + 1], chunked) for i in range(dripped)]
        if not self._trickle(handler, fault, pieces):
            return False
        if dripped < len(data):
            handler.wfile.write(self._frame(data[dripped:], chunked))
        return True

    @staticmethod
    def _start_stream(handler: _Handler) -> bool:
        """Send the streaming response head; returns whether the body is chunk-encoded."""
        chunked = handler.request_version == "HTTP/1.1"
        if not chunked:
            handler.close_connection = True
        headers = [
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("Cache-Control", "no-cache"),
        ]
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        handler.wfile.write(handler._write_head(200, headers))
        return chunked

    @staticmethod
    def _frame(data: bytes, chunked: bool) -> bytes:
        return b"%x\r\n%b\r\n" % (len(data), data) if chunked else data

    def _stream(
        self,
        handler: _Handler,
        answer: str | list[dict[str, Any]],
        *,
        completion_id: str,
        created: int,
        model: str,
        finish_reason: str,
        usage: dict[str, Any] | None,
        include_usage: bool,
        fault: Fault | None,
        sent: list[str],
    ) -> None:
        write = handler.wfile.write
        chunked = self._start_stream(handler)
        frame = self._frame
        dumps = json.dumps
        # Every chunk is the same envelope around a different delta; build it once.
        envelope = dumps(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": _SYSTEM_FINGERPRINT,
            }
        )[:-1]
        prefix = f'{envelope}, "choices": [{{"index": 0, "delta": '
        usage_null = ', "usage": null}' if include_usage else "}"

        def sse(delta: dict[str, Any], finish: str | None = None) -> bytes:
            data = f'{prefix}{dumps(delta)}, "logprobs": null, "finish_reason": {dumps(finish)}}}]'
            return f"data: {data}{usage_null}\n\n".encode()

        def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return frame(sse(delta, finish), chunked)

        first, deltas = _stream_deltas(answer, self._chunk_words)
        if fault is not None and (fault.keep_alive or fault.drip):
            events = [sse(first)]
            events += [sse(delta) for delta in deltas]
            events.append(sse({}, finish_reason))
            if usage is not None:
                events.append(
                    f'data: {envelope}, "choices": [], "usage": {dumps(usage)}}}\n\n'.encode()
                )
            events.append(b"data: [DONE]\n\n")
            sent.append(_ALL_SENT)
            self._stream_slowly(handler, fault, events, chunked)
            return
        cut_after = fault.cut_after if fault is not None else None
        write(event(first))
        if cut_after is not None:
            for delta in deltas[:cut_after]:
                write(event(delta))
                sent.append(_delta_text(delta))
            self._drop(handler)
            return
        for delta in deltas:
            if self._chunk_interval and self._stopping.wait(self._chunk_interval):
                self._drop(handler)
                return
            write(event(delta))
            sent.append(_delta_text(delta))
        sent[:] = [_ALL_SENT]

        tail = [event({}, finish_reason)]
        if usage is not None:
            usage_chunk = f'{envelope}, "choices": [], "usage": {dumps(usage)}}}'
            tail.append(frame(f"data: {usage_chunk}\n\n".encode(), chunked))
        tail.append(frame(b"data: [DONE]\n\n", chunked))
        if chunked:
            tail.append(b"0\r\n\r\n")
        write(b"".join(tail))

    def _stream_slowly(
        self, handler: _Handler, fault: Fault, events: list[bytes], chunked: bool
    ) -> None:
        """A stream that keeps the client waiting: keep-alive comments and/or a drip."""
        # The role chunk and ``stall_after`` content chunks go first, then the comments.
        stall = 1 + fault.stall_after if fault.keep_alive and fault.stall_after else 0
        if stall:
            handler.wfile.write(self._frame(b"".join(events[:stall]), chunked))
        comment = self._frame(_KEEP_ALIVE_COMMENT, chunked)
        if not self._trickle(handler, fault, [comment] * fault._ticks(fault.keep_alive)):
            return
        if not self._drip(handler, fault, b"".join(events[stall:]), chunked=chunked):
            return
        if chunked:
            handler.wfile.write(b"0\r\n\r\n")

    def _stream_malformed(self, handler: _Handler) -> None:
        chunked = self._start_stream(handler)
        garbage = b'data: {"id": "chatcmpl-malformed", "object": "chat.completion.chunk", [\n\n'
        handler.wfile.write(
            self._frame(garbage, chunked)
            + self._frame(b"data: [DONE]\n\n", chunked)
            + (b"0\r\n\r\n" if chunked else b"")
        )

    @staticmethod
    def _drop(handler: _Handler) -> None:
        """Drop the connection mid-body: the client sees an incomplete chunked body."""
        handler.close_connection = True
        with contextlib.suppress(OSError):
            handler.connection.shutdown(socket.SHUT_RDWR)
