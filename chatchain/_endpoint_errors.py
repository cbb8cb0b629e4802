"""Turn the OpenAI client's exceptions into chatchain's errors, with what to do next."""

from __future__ import annotations

import json
import re

import httpx
import openai

from chatchain import errors

__all__ = ["redact", "translate"]

# OpenAI-style secret keys, in case an endpoint echoes one back in an error message.
_KEY_PATTERN = re.compile(r"\b(sk|rk|pk)-[A-Za-z0-9_\-*]{6,}")


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
    return redact(str(message), secret).rstrip(".")


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
    link: BaseException | None = exc
    seen: set[int] = set()
    while link is not None and id(link) not in seen:  # langchain-openai re-raises, chained
        seen.add(id(link))
        if isinstance(link, (openai.OpenAIError, httpx.HTTPError, json.JSONDecodeError)):
            _scrub(link, secret)
        link = link.__cause__ or link.__context__
    after = f" after {retries} retries" if retries else ""
    detail = _detail(exc, secret)
    status = getattr(exc, "status_code", None)
    if isinstance(exc, openai.APITimeoutError):
        within = f"within {timeout:g} s" if timeout else "in time"
        return errors.EndpointTimeoutError(
            f"The endpoint did not answer {within}{after}. Try again, or raise CHATCHAIN_TIMEOUT."
        )
    if isinstance(exc, (openai.APIConnectionError, httpx.TransportError)):
        return errors.EndpointConnectionError(
            f"Could not reach the endpoint, or it dropped the connection: {detail}. Check "
            "OPENAI_BASE_URL and that the server is up, then try again."
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
    if isinstance(exc, openai.BadRequestError) and (
        getattr(exc, "code", None) == "context_length_exceeded" or "context length" in detail
    ):
        return errors.ContextTooLongError(
            f"The conversation no longer fits the model's context window: {detail}. Reset the "
            "session or start a new one, or use a model with a larger context.",
            status_code=status,
        )
    if isinstance(exc, openai.APIStatusError) and status is not None and status < 500:
        return errors.BadRequestError(
            f"The endpoint refused the request ({status}): {detail}. Check the model name "
            "(OPENAI_MODEL) and the request settings.",
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
