"""chatchain's errors as HTTP answers: one status per error class, one JSON shape.

Every error answer is ``{"error": {"type": ..., "message": ...}}``: the class name and
chatchain's own message (which says what to do next). Never a traceback, never the key.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatchain.errors import (
    BudgetExceeded,
    ChatChainError,
    ConfigurationError,
    EndpointError,
    EndpointTimeoutError,
    InvalidInputError,
    SessionBusyError,
    SessionLockLostError,
    StoreError,
    TurnJournaledError,
)
from chatchain.server import _metrics

__all__ = [
    "HTTPProblem",
    "error_body",
    "install_error_handlers",
    "is_openai_path",
    "openai_error",
    "public_message",
    "status_of",
]

logger = logging.getLogger("chatchain.server")

# Most specific first: the first class an error is an instance of gives its status.
_STATUS: tuple[tuple[type[ChatChainError], int], ...] = (
    (InvalidInputError, 422),
    (BudgetExceeded, 402),
    (SessionBusyError, 409),
    (SessionLockLostError, 409),
    (StoreError, 503),
    (EndpointTimeoutError, 504),
    (EndpointError, 502),
    (ConfigurationError, 500),
)

_HTTP_TYPES: Mapping[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    404: "NotFound",
    405: "MethodNotAllowed",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
    429: "TooManyRequests",
}


class HTTPProblem(Exception):
    """An answer of the service itself (not of a turn): 401, 404, 413, 429.

    Attributes:
        status: The HTTP status.
        type: The ``error.type`` of the body, e.g. ``"Unauthorized"``.
        message: What happened and what to do next.
        headers: Extra headers, e.g. ``Retry-After`` or ``WWW-Authenticate``.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type or _HTTP_TYPES.get(status, "Error")
        self.message = message
        self.headers = dict(headers or {})


def status_of(exc: ChatChainError) -> int:
    """The HTTP status of a chatchain error (500 for one the table does not name).

    Example:
        >>> from chatchain.errors import EndpointConnectionError, TurnDeadlineError
        >>> status_of(TurnDeadlineError("late")), status_of(EndpointConnectionError("down"))
        (504, 502)
    """
    return next((status for kind, status in _STATUS if isinstance(exc, kind)), 500)


# What a client is told when the store fails: where the store is (user@host:port/db, a file's
# path) and why are for the operator's log, not for every API client.
STORE_DOWN = (
    "The history store is not available right now. Try again in a moment; if it persists, "
    "tell the operator (the server's log names the store and the cause)."
)


# The journal's own message names the server's files and the store: the client reads this.
JOURNALED = (
    "Your message was delivered and billed, but the history store is not available right "
    "now, so the turn is not in your history yet. The server keeps it and saves it as soon as "
    "the store is back: do not send the message again."
)


def public_message(exc: ChatChainError) -> str:
    """The message of ``exc`` that a client may read: a store failure is logged, not sent.

    Example:
        >>> public_message(StoreError("The PostgreSQL store app@db:5432/chat failed"))[:29]
        'The history store is not avai'
    """
    if isinstance(exc, TurnJournaledError):
        logger.error("Billed turn journaled, answered with 503: %s", exc)
        return JOURNALED
    if isinstance(exc, StoreError):
        logger.error("Store failure answered with 503: %s", exc)
        return STORE_DOWN
    return str(exc)


def error_body(type: str, message: str) -> dict[str, dict[str, str]]:
    """The JSON body of every error answer."""
    return {"error": {"type": type, "message": message}}


# The OpenAI-compatible routes (`chatchain.server._openai`, `_responses`) answer errors in
# OpenAI's shape.
_OPENAI_PATH = re.compile(r"/v1/(chat/completions|models|responses)(/|$)")

# OpenAI's own codes, where it has one for what happened; else the code is chatchain's class.
_OPENAI_CODES: Mapping[str, str] = {
    "Unauthorized": "invalid_api_key",
    "TooManyRequests": "rate_limit_exceeded",
    "BudgetExceeded": "insufficient_quota",
    "ContextTooLongError": "context_length_exceeded",
}


def is_openai_path(path: str) -> bool:
    """Whether ``path`` is one of the OpenAI-compatible routes.

    Example:
        >>> is_openai_path("/v1/chat/completions"), is_openai_path("/v1/sessions")
        (True, False)
    """
    return _OPENAI_PATH.search(path) is not None


def openai_error(
    status: int, type: str, message: str
) -> tuple[int, dict[str, dict[str, str | None]], dict[str, str]]:
    """An error answer as OpenAI gives it: the status, body and headers its SDK expects.

    ``type`` is chatchain's (the error class, or e.g. ``"Unauthorized"``). Bad input is 400
    (OpenAI has no 422); a budget is 429 with code ``insufficient_quota`` and
    ``x-should-retry: false``, as OpenAI answers an exhausted quota, so the SDK raises
    ``RateLimitError`` without retrying in vain; a prompt over the model's context window is
    400 ``context_length_exceeded``, as OpenAI answers it. ``code`` is OpenAI's where it has
    one for what happened, else chatchain's error class.

    Example:
        >>> status, body, headers = openai_error(402, "BudgetExceeded", "Budget exceeded: ...")
        >>> status, body["error"]["type"], body["error"]["code"], headers
        (429, 'insufficient_quota', 'insufficient_quota', {'x-should-retry': 'false'})
    """
    headers: dict[str, str] = {}
    if status == 422 or type == "ContextTooLongError":  # OpenAI: the request's fault, 400
        status = 400
    if type == "BudgetExceeded":
        status, kind = 429, "insufficient_quota"
        headers["x-should-retry"] = "false"
    elif status == 429:
        kind = "requests"
    elif status >= 500:
        kind = "server_error"
        # Answered and billed (stored, or a reply that did not fit the schema): the SDK's
        # own retry would bill again without the client deciding to.
        if type in ("TurnJournaledError", "StructuredReplyError"):
            headers["x-should-retry"] = "false"
    else:
        kind = "invalid_request_error"
    code = _OPENAI_CODES.get(type, type)
    return (
        status,
        {"error": {"message": message, "type": kind, "param": None, "code": code}},
        headers,
    )


def _answer(
    status: int,
    type: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    *,
    path: str = "",
) -> JSONResponse:
    _metrics.ERRORS.labels(type).inc()
    if is_openai_path(path):
        status, body, extra = openai_error(status, type, message)
        return JSONResponse(body, status_code=status, headers={**(headers or {}), **extra})
    return JSONResponse(error_body(type, message), status_code=status, headers=headers)


async def _chatchain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ChatChainError)
    return _answer(status_of(exc), type(exc).__name__, public_message(exc), path=request.url.path)


async def _problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPProblem)
    return _answer(exc.status, exc.type, exc.message, exc.headers, path=request.url.path)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "The request was refused."
    if exc.status_code == 404 and message == "Not Found":
        message = f"There is no {request.url.path}: the API is described at /docs."
    type = _HTTP_TYPES.get(exc.status_code, "Error")
    return _answer(exc.status_code, type, message, exc.headers, path=request.url.path)


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # pydantic's own text may echo the input: rebuild it from the locations and messages.
    problems = [
        f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors()
    ]
    message = "Invalid request: " + "; ".join(problems) + ". See /docs for the request's shape."
    return _answer(422, "InvalidInputError", message, path=request.url.path)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # uvicorn logs the traceback (Starlette re-raises after this answer); the client sees none.
    return _answer(
        500,
        "InternalError",
        "The server failed unexpectedly; nothing more is shown here. Try again, and see the "
        "server's log if it persists.",
        path=request.url.path,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error with the one JSON shape and the status of its class."""
    app.add_exception_handler(ChatChainError, _chatchain_error)
    app.add_exception_handler(HTTPProblem, _problem)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(Exception, _unexpected)
