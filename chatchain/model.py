"""The chat model: `ChatOpenAI` configured from settings, with an optional fallback."""

from __future__ import annotations

from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import Runnable
from langchain_openai import ChatOpenAI

from chatchain.settings import Settings

__all__ = ["create_chat_model", "create_summary_model"]


def _chat_openai(settings: Settings, model: str) -> ChatOpenAI:
    return ChatOpenAI(
        model=model,
        api_key=settings.resolved_api_key(),
        base_url=settings.base_url,
        temperature=settings.temperature,
        max_tokens=settings.max_tokens,  # type: ignore[call-arg]
        timeout=settings.timeout,
        # Retries with exponential backoff that honour Retry-After: the OpenAI client's own.
        max_retries=settings.max_retries,
        # A custom base URL turns usage reporting off while streaming; metering needs it.
        stream_usage=True,
    )


def create_chat_model(settings: Settings | None = None) -> Runnable[Any, Any]:
    """`ChatOpenAI` from the settings, falling back to ``fallback_model`` when it fails.

    The fallback is tried only for failures of the endpoint (unreachable, timeouts, rate
    limits, server errors), never for a request the endpoint refuses as wrong.

    Raises:
        MissingAPIKeyError: No ``OPENAI_API_KEY`` and no ``OPENAI_BASE_URL``.

    Example:
        >>> model = create_chat_model(Settings(api_key="sk-test", model="gpt-4o-mini"))
    """
    import openai

    settings = settings or Settings.load()
    primary: BaseChatModel = _chat_openai(settings, settings.model)
    if not settings.fallback_model:
        return primary
    fallback = _chat_openai(settings, settings.fallback_model)
    return primary.with_fallbacks(
        [fallback],
        exceptions_to_handle=(
            openai.APIConnectionError,  # includes timeouts
            openai.RateLimitError,
            openai.InternalServerError,
            openai.NotFoundError,  # the main model is gone or misnamed at this endpoint
        ),
    )


def create_summary_model(settings: Settings | None = None) -> ChatOpenAI:
    """`ChatOpenAI` for running-summary calls: ``summary_model`` capped at its own max_tokens.

    The model is ``CHATCHAIN_SUMMARY_MODEL`` (``OPENAI_MODEL`` by default) and each reply is
    capped at ``CHATCHAIN_SUMMARY_MAX_TOKENS`` (``CHATCHAIN_SUMMARY_TOKENS`` by default), not
    at ``CHATCHAIN_MAX_TOKENS``, which caps turns.

    Raises:
        MissingAPIKeyError: No ``OPENAI_API_KEY`` and no ``OPENAI_BASE_URL``.

    Example:
        >>> settings = Settings(api_key="sk-test", max_tokens=50, summary_model="gpt-4.1-nano")
        >>> model = create_summary_model(settings)
        >>> model.model_name, model.max_tokens
        ('gpt-4.1-nano', 500)
    """
    settings = settings or Settings.load()
    summary = settings.model_copy(update={"max_tokens": settings.summary_reply_tokens})
    return _chat_openai(summary, settings.summary_model or settings.model)
