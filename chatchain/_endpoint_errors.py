"""Turn the OpenAI client's exceptions into chatchain's errors, with what to do next."""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

import httpx
import openai

from chatchain import errors

try:  # newer langchain-core; langchain-openai raises its subclasses for context overflow
    from langchain_core.exceptions import ContextOverflowError as _ContextOverflowError
except ImportError:  # pragma: no cover - older langchain-core: the message patterns still work
    _ContextOverflowError = None  # type: ignore[assignment,misc]

__all__ = [
    "SchemaRefused",
    "describe",
    "is_context_overflow",
    "is_refusal",
    "overflow_without_history",
    "redact",
    "translate",
]

# OpenAI-style secret keys, in case an endpoint echoes one back in an error message.
_KEY_PATTERN = re.compile(r"\b(sk|rk|pk)-[A-Za-z0-9_\-*]{6,}")

# How each server says the prompt does not fit the model's context window:
#   OpenAI, Azure OpenAI  code "context_length_exceeded": "This model's maximum context length is
#                         8192 tokens. However, your messages resulted in 9000 tokens..." or
#                         "Input tokens exceed the configured limit of 272000 tokens..."
#   LiteLLM proxy         400, code "400": "litellm.ContextWindowExceededError: ..."
#   vLLM                  400: "This model's maximum context length is 4096 tokens. However, you
#                         requested 5000 tokens (...)" or "The decoder prompt (length 5000) is
#                         longer than the maximum model length of 4096..."
#   llama.cpp server      400, type "exceed_context_size_error": "request (9412 tokens) exceeds
#                         the available context size (8192 tokens), try increasing it"
#   Ollama                (it truncates unless told not to) "the input length exceeds the context
#                         length", "the prompt is longer than the context length currently
#                         available to the model", or llama.cpp's words passed through
#   langchain-openai      OpenAIContextOverflowError ("prompt is too long", "exceeds the context
#                         window", ...), a langchain-core ContextOverflowError
_CONTEXT_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error"})
_CONTEXT_PATTERN = re.compile(
    r"context_?window_?exceeded"
    r"|maximum context length"
    r"|exceeds? the (?:available |maximum |model's )?context (?:size|length|window)"
    r"|longer than the (?:maximum model length|context length)"
    r"|input tokens exceed the configured limit"
    r"|prompt (?:is )?too long",
    re.IGNORECASE,
)
# OpenAI's own host: the endpoint when OPENAI_BASE_URL is not set.
_OPENAI_HOST = "api.openai.com"


def redact(text: str, secret: str | None = None) -> str:
    """``text`` without ``secret`` or anything shaped like an API key."""
    if secret:
        text = text.replace(secret, "***")
    return _KEY_PATTERN.sub(r"\1-***", text)


def _detail(exc: BaseException, secret: str | None) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        message = body["message"]
    return redact(str(message), secret).strip().rstrip(".")


def describe(exc: BaseException) -> str:
    """What the endpoint said in ``exc`` (its error message), without anything key-shaped."""
    return _detail(exc, None)


class SchemaRefused(Exception):
    """A structured turn that the endpoint refused both ways (see `chatchain._structured`):
    ``response_format`` json_schema, then the forced tool call; `translate` makes it one
    `BadRequestError` naming both refusals.

    Attributes:
        json_schema: What the endpoint said when it refused json_schema.
        tools: What the forced tool call raised (a 400 or 422 of the endpoint).
    """

    def __init__(self, json_schema: str, tools: BaseException) -> None:
        super().__init__(f"json_schema refused: {json_schema}; tools refused: {tools}")
        self.json_schema = json_schema
        self.tools = tools


def is_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is the endpoint refusing the request as sent (400 or 422), rather than
    a prompt over the context window, a bad key or a failure."""
    return (
        isinstance(exc, openai.APIStatusError)
        and exc.status_code in (400, 422)
        and not is_context_overflow(exc)
    )


def _both_refused(exc: SchemaRefused, secret: str | None) -> errors.BadRequestError:
    _scrub(exc.tools, secret)
    status = getattr(exc.tools, "status_code", None)
    return errors.BadRequestError(
        "The endpoint refused both ways of asking for a structured reply: response_format "
        f"json_schema ({redact(exc.json_schema, secret)}) and a forced tool call ({status}: "
        f"{_detail(exc.tools, secret)}). Use a model or server that supports structured "
        "outputs or tool calling (OPENAI_MODEL), or ask without schema=.",
        status_code=status,
    )


def _scrub(exc: BaseException, secret: str | None) -> None:
    """Take the key out of ``exc``'s own text: it is chained to ours, and tracebacks print it.

    Some OpenAI-compatible servers echo the key they were sent in their error message.
    """
    exc.args = tuple(redact(arg, secret) if isinstance(arg, str) else arg for arg in exc.args)
    message = getattr(exc, "message", None)
    if isinstance(message, str):
        setattr(exc, "message", redact(message, secret))  # noqa: B010 - not every exception has it
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        for key, value in body.items():
            if isinstance(value, str):
                body[key] = redact(value, secret)


def _links(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (langchain-openai re-raises, chained)."""
    links: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and all(link is not seen for seen in links):
        links.append(link)
        link = link.__cause__ or link.__context__
    return links


def is_context_overflow(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) says the prompt exceeds the context window.

    Recognises OpenAI, Azure OpenAI, LiteLLM, vLLM, Ollama and llama.cpp server by their error
    codes and wording, and langchain-openai's own ``OpenAIContextOverflowError``.
    """
    for link in _links(exc):
        if _ContextOverflowError is not None and isinstance(link, _ContextOverflowError):
            return True
        if not isinstance(link, openai.APIError):
            continue
        if isinstance(link, openai.APIStatusError) and link.status_code == 413:
            return True  # Payload Too Large: a shorter history is what helps
        body = link.body if isinstance(link.body, dict) else {}
        words = [link.message, str(body.get("message") or "")]
        codes = {str(link.code), str(link.type), str(body.get("code")), str(body.get("type"))}
        if codes & _CONTEXT_CODES or any(_CONTEXT_PATTERN.search(text) for text in words):
            return True
    return False


def overflow_without_history(
    exc: BaseException, error: errors.ContextTooLongError
) -> errors.ContextTooLongError:
    """The error for an overflow that was sent with no stored history: none is left to drop.

    ``exc`` is what the model call raised, already scrubbed of the key by `translate` (which
    made ``error``); only the system message and the input are left to shorten.
    """
    return errors.ContextTooLongError(
        "The request does not fit the model's context window even with no earlier messages of "
        f"the session: {_detail(exc, None)}. Shorten the message (or the system prompt, or "
        "the messages the request sends), lower CHATCHAIN_MAX_TOKENS, or use a model with a "
        "larger context.",
        status_code=error.status_code,
    )


def _url_of(exc: BaseException) -> str | None:
    """The URL ``exc``'s request went to, without credentials or query, if it is known."""
    try:
        url = str(exc.request.url)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError for an unset request
        return None
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


# How each server says it does not know the model a request named:
#   OpenAI              404, code "model_not_found": "The model `gpt-9` does not exist or you do
#                       not have access to it."
#   vLLM                404, type "NotFoundError": "The model `x` does not exist."
#   Ollama              404: 'model "llama9" not found, try pulling it first'; 400 "model is
#                       required"
#   LiteLLM proxy       400: "Invalid model name passed in model=gpt-9. Call `/v1/models` to
#                       view available models for your key."
#   chatchain serve     404, code "model_not_found", param "model"
# A refusal that merely mentions the model ("'response_format' of type 'json_schema' is not
# supported with this model", Ollama's "... does not support tools") is not about its name.
_MODEL_CODES = frozenset({"model_not_found"})
_MODEL_PATTERN = re.compile(
    r"\bmodel\b.{0,120}?\b(?:not found|does not exist)"
    r"|\b(?:invalid|unknown|no such) model\b"
    r"|\bmodel (?:name )?is (?:required|invalid|not valid)"
    r"|\bmodel=",
    re.IGNORECASE,
)


def _complains_of_model(exc: BaseException, detail: str) -> bool:
    """Whether the endpoint says the model it was asked for is unknown (or missing): the one
    refusal after which checking the model name (``OPENAI_MODEL``) helps."""
    body = getattr(exc, "body", None)
    error: object = body.get("error", body) if isinstance(body, dict) else None
    fields = error if isinstance(error, dict) else {}
    codes = {str(getattr(exc, "code", None)), str(fields.get("code"))}
    if codes & _MODEL_CODES or "model" in (getattr(exc, "param", None), fields.get("param")):
        return True
    return _MODEL_PATTERN.search(detail) is not None


# Settings behind the request fields an endpoint may refuse by name (OpenAI's error.param).
_PARAM_SETTINGS = {
    "max_tokens": "CHATCHAIN_MAX_TOKENS",
    "max_completion_tokens": "CHATCHAIN_MAX_TOKENS",
    "temperature": "CHATCHAIN_TEMPERATURE",
}


def _refusal_advice(exc: BaseException, detail: str) -> str:
    """What to do after a 4xx refusal: the setting it names, and the model only when the
    endpoint complains about the model."""
    if _complains_of_model(exc, detail):
        return "Check the model name (OPENAI_MODEL, and CHATCHAIN_FALLBACK_MODEL if set)."
    param = getattr(exc, "param", None)
    body = getattr(exc, "body", None)
    if param is None and isinstance(body, dict):
        param = body.get("param")
    setting = _PARAM_SETTINGS.get(str(param))
    if setting is not None:
        return f"The endpoint does not take {param} as sent: check {setting}."
    if param in ("tools", "tool_choice", "functions", "parallel_tool_calls"):
        return "This model or server does not take tool calls: run the turn without tools."
    return "Change what its message names (a request setting, the turn's tools or schema)."


def translate(
    exc: BaseException,
    *,
    secret: str | None = None,
    timeout: float | None = None,
    retries: int | None = None,
) -> errors.ChatChainError | None:
    """The chatchain error for an endpoint failure, or ``None`` if ``exc`` is not one.

    Args:
        exc: What the model call raised.
        secret: The API key, scrubbed from every message.
        timeout: The configured timeout, to name it in the advice.
        retries: The configured retries, to name them in the advice.
    """
    if isinstance(exc, errors.ChatChainError):
        return exc
    if isinstance(exc, SchemaRefused):
        return _both_refused(exc, secret)
    for link in _links(exc):
        if isinstance(link, (openai.OpenAIError, httpx.HTTPError, json.JSONDecodeError)):
            _scrub(link, secret)
    after = f" after {retries} retries" if retries else ""
    detail = _detail(exc, secret)
    status = getattr(exc, "status_code", None)
    if isinstance(exc, openai.APITimeoutError):
        within = f"within {timeout:g} s" if timeout else "in time"
        return errors.EndpointTimeoutError(
            f"The endpoint did not answer {within}{after}. Try again, or raise CHATCHAIN_TIMEOUT."
        )
    if isinstance(exc, (openai.APIConnectionError, httpx.TransportError)):
        url = _url_of(exc)
        if url is not None and urlsplit(url).hostname == _OPENAI_HOST:
            return errors.EndpointConnectionError(
                f"Could not reach OpenAI's API at {url}, or it dropped the connection: {detail}. "
                "Check the network connection (and proxy), then try again. For another server, "
                "set OPENAI_BASE_URL (e.g. http://localhost:11434/v1)."
            )
        return errors.EndpointConnectionError(
            f"Could not reach the endpoint at {url or 'OPENAI_BASE_URL'}, or it dropped the "
            f"connection: {detail}. Check that the server is up and that OPENAI_BASE_URL "
            "points at it, then try again."
        )
    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return errors.AuthenticationError(
            f"The endpoint refused the API key ({status}): {detail}. Check OPENAI_API_KEY in "
            "the environment or .env, and OPENAI_BASE_URL if you use another server.",
            status_code=status,
        )
    if isinstance(exc, openai.RateLimitError):
        return errors.RateLimitError(
            f"The endpoint is limiting requests (429){after}: {detail}. Wait and try again, "
            "raise CHATCHAIN_MAX_RETRIES, or set CHATCHAIN_FALLBACK_MODEL.",
            status_code=status,
        )
    if is_context_overflow(exc):
        return errors.ContextTooLongError(
            f"The conversation no longer fits the model's context window: {detail}. Reset the "
            "session or start a new one, lower CHATCHAIN_WINDOW_TOKENS or CHATCHAIN_MAX_TOKENS, "
            "or use a model with a larger context.",
            status_code=status,
        )
    if status == 408:
        return errors.EndpointTimeoutError(
            f"The endpoint, or a gateway in front of it, timed out (408){after}: {detail}. Try "
            "again, or set CHATCHAIN_FALLBACK_MODEL.",
            status_code=status,
        )
    if isinstance(exc, openai.APIStatusError) and status in (404, 405):
        if status == 404 and _complains_of_model(exc, detail):
            return errors.BadRequestError(
                f"The endpoint does not know the model (404): {detail}. Check OPENAI_MODEL "
                "(and CHATCHAIN_FALLBACK_MODEL).",
                status_code=status,
            )
        return errors.BadRequestError(
            f"The endpoint has no chat completions at {_url_of(exc) or 'OPENAI_BASE_URL'} "
            f"({status}): {detail}. Check OPENAI_BASE_URL: an OpenAI-compatible server's base "
            "URL usually ends in /v1 (e.g. http://localhost:11434/v1).",
            status_code=status,
        )
    if status == 501:
        return errors.ServerError(
            f"The server at {_url_of(exc) or 'OPENAI_BASE_URL'} does not implement chat "
            f"completions (501): {detail}. Point OPENAI_BASE_URL at an OpenAI-compatible server "
            "that serves /chat/completions.",
            status_code=status,
        )
    if isinstance(exc, openai.APIStatusError) and status is not None and status < 500:
        return errors.BadRequestError(
            f"The endpoint refused the request ({status}): {detail}. "
            + _refusal_advice(exc, detail),
            status_code=status,
        )
    if isinstance(exc, openai.APIStatusError):
        return errors.ServerError(
            f"The endpoint failed ({status}){after}: {detail}. Try again later, or set "
            "CHATCHAIN_FALLBACK_MODEL.",
            status_code=status,
        )
    if isinstance(exc, (openai.APIResponseValidationError, openai.APIError, json.JSONDecodeError)):
        return errors.ServerError(
            f"The endpoint's reply could not be read: {detail}. Check that OPENAI_BASE_URL "
            "points at an OpenAI-compatible server."
        )
    return None
