"""The chat model: `ChatOpenAI` configured from settings, with an optional fallback."""

from __future__ import annotations

import operator
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
from langchain_core.language_models import BaseChatModel
from langchain_core.prompts import BasePromptTemplate
from langchain_core.runnables import (
    Runnable,
    RunnableBinding,
    RunnableConfig,
    RunnableSequence,
    RunnableWithFallbacks,
)
from langchain_core.runnables.base import RunnableBindingBase
from langchain_core.runnables.history import RunnableWithMessageHistory
from langchain_openai import ChatOpenAI
from langchain_openai.chat_models.base import BaseChatOpenAI

from chatchain import _deadline
from chatchain._async_clients import with_loop_clients
from chatchain.errors import ConfigurationError
from chatchain.settings import Settings

__all__ = [
    "bounds_its_deadline",
    "create_chat_model",
    "create_summary_model",
    "prepare_chat_model",
]


def _chat_openai(settings: Settings, model: str) -> ChatOpenAI:
    chat = ChatOpenAI(
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
        # Ends each call at the turn's deadline where its bytes arrive (see `_deadline`).
        http_client=_deadline.http_client(),
    )
    return with_loop_clients(chat)


def create_chat_model(settings: Settings | None = None) -> Runnable[Any, Any]:
    """`ChatOpenAI` from the settings, falling back to ``fallback_model`` when it fails.

    The fallback is tried only for failures of the endpoint (unreachable, timeouts, rate
    limits, server errors), never for a request the endpoint refuses as wrong.

    Raises:
        MissingAPIKeyError: No ``OPENAI_API_KEY`` and no ``OPENAI_BASE_URL``.

    Example:
        >>> model = create_chat_model(Settings(api_key="sk-test", model="gpt-4o-mini"))
    """
    settings = settings or Settings.load()
    primary: BaseChatModel = _chat_openai(settings, settings.model)
    if not settings.fallback_model:
        return primary
    fallback = _chat_openai(settings, settings.fallback_model)
    return _RequestTimeoutsNamed(bound=primary).with_fallbacks(
        [fallback],
        exceptions_to_handle=(
            openai.APIConnectionError,  # includes timeouts
            _RequestTimeout,  # 408 from a gateway: a timeout too
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


class _RequestTimeout(openai.APIStatusError):
    """A 408 Request Timeout. The openai client raises a bare `openai.APIStatusError` for it,
    which cannot be told from a refused request by its class, the only thing a fallback sees."""


def _as_timeout(exc: openai.APIStatusError) -> _RequestTimeout | None:
    if exc.status_code != 408 or isinstance(exc, _RequestTimeout):
        return None
    return _RequestTimeout(exc.message, response=exc.response, body=exc.body)


class _RequestTimeoutsNamed(RunnableBinding[Any, Any]):
    """The main model, raising its 408s as `_RequestTimeout` so that the fallback is tried."""

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        try:
            return super().invoke(input, config, **kwargs)
        except openai.APIStatusError as exc:
            if (timeout := _as_timeout(exc)) is None:
                raise
            raise timeout from exc

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        try:
            return await super().ainvoke(input, config, **kwargs)
        except openai.APIStatusError as exc:
            if (timeout := _as_timeout(exc)) is None:
                raise
            raise timeout from exc

    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        try:
            yield from super().stream(input, config, **kwargs)
        except openai.APIStatusError as exc:
            if (timeout := _as_timeout(exc)) is None:
                raise
            raise timeout from exc

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        try:
            async for chunk in super().astream(input, config, **kwargs):
                yield chunk
        except openai.APIStatusError as exc:
            if (timeout := _as_timeout(exc)) is None:
                raise
            raise timeout from exc


def prepare_chat_model(llm: Runnable[Any, Any]) -> Runnable[Any, Any]:
    """``llm`` as a chain uses it: refused if it is not a chat model, else metered in full.

    A `ChatOpenAI` (also inside fallbacks or a ``.bind(...)``) is copied, never changed: the
    copy asks the endpoint for usage while streaming (unless ``stream_usage=False`` was
    given), so that streamed turns are counted, not estimated, and it uses an async client
    of the running event loop, so that it works across ``asyncio.run`` calls. Unless it has an
    ``http_client`` (or ``openai_proxy``) of its own, its sync calls go through chatchain's
    HTTP client, which ends them at the turn's deadline (see `bounds_its_deadline`).

    Raises:
        ConfigurationError: ``llm`` is a prompt, a chain such as ``prompt | model``, or a
            chain with history, rather than a chat model.

    Example:
        >>> model = ChatOpenAI(model="gpt-4o-mini", api_key="sk-test", base_url="http://x/v1")
        >>> prepare_chat_model(model).stream_usage, model.stream_usage
        (True, None)
    """
    if isinstance(llm, RunnableWithFallbacks):
        runnable = prepare_chat_model(llm.runnable)
        fallbacks = [prepare_chat_model(fallback) for fallback in llm.fallbacks]
        if runnable is llm.runnable and all(map(operator.is_, fallbacks, llm.fallbacks)):
            return llm
        return llm.model_copy(update={"runnable": runnable, "fallbacks": fallbacks})
    if isinstance(llm, (RunnableSequence, BasePromptTemplate, RunnableWithMessageHistory)):
        raise ConfigurationError(
            f"llm must be the chat model itself, e.g. ChatOpenAI(...), not a "
            f"{type(llm).__name__} (a prompt, or a chain such as prompt | model): chatchain "
            "builds the prompt and the history around the model. Put the system message in "
            "system='...' (its {variables} in prompt_vars={...}) and pass the model alone "
            "as llm."
        )
    if isinstance(llm, RunnableBindingBase):  # .bind(...), .bind_tools(...), .with_retry()
        bound = prepare_chat_model(llm.bound)
        return llm if bound is llm.bound else llm.model_copy(update={"bound": bound})
    if isinstance(llm, BaseChatOpenAI):
        if llm.stream_usage is None:
            llm = llm.model_copy(update={"stream_usage": True})
        return with_loop_clients(_with_deadline_client(llm))
    return llm


def _with_deadline_client(model: BaseChatOpenAI) -> BaseChatOpenAI:
    """A copy of ``model`` whose sync calls use chatchain's HTTP client (see `_deadline`).

    A model with an HTTP client, a proxy or socket options of its own keeps them: that
    client is its owner's, and its turns' deadline is kept by a worker thread instead.
    """
    client = _deadline.http_client()
    root = model.root_client
    if (
        client is None
        or model.http_client is not None
        or model.openai_proxy
        or model.http_socket_options is not None
        or not isinstance(root, openai.OpenAI)
    ):
        return model
    bounded = root.copy(http_client=client)
    return model.model_copy(
        update={"http_client": client, "root_client": bounded, "client": bounded.chat.completions}
    )


def bounds_its_deadline(llm: Runnable[Any, Any]) -> bool:
    """Whether every chat model in ``llm`` ends its own calls at the turn's deadline.

    True for `ChatOpenAI` models (fallbacks and bindings included) over chatchain's HTTP
    client: their blocking calls then run in the caller's thread. Any other model may block
    without a byte for chatchain to see, so its calls run in a worker thread that the turn
    abandons at the deadline (see `_deadline`).
    """
    if isinstance(llm, RunnableWithFallbacks):
        return all(map(bounds_its_deadline, [llm.runnable, *llm.fallbacks]))
    if isinstance(llm, RunnableBindingBase):
        return bounds_its_deadline(llm.bound)
    return isinstance(llm, BaseChatOpenAI) and _deadline.is_bounded(llm.http_client)
