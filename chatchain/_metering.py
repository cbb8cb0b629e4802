"""Token and cost metering with langchain-community's OpenAI callback, kept behind this module.

`langchain_community` is archived and warns on import that it is being sunset. Users cannot act
on that warning, so it is imported lazily, once, with exactly that warning filtered. When a
later engine replaces the callback, only this module changes.

Each turn gets its own `OpenAICallbackHandler` (the handler `get_openai_callback` yields),
passed in the run's config rather than through the context variable that
`get_openai_callback` sets. That way turns in threads, generators and `asyncio.gather` are
counted separately and exactly, and a user's own ``with get_openai_callback()`` around a call
still sees every token, because chatchain never resets the variable under it.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from chatchain import _cache
from chatchain.pricing import Pricer
from chatchain.usage import UsageEntry

if TYPE_CHECKING:
    from langchain_community.callbacks.openai_info import OpenAICallbackHandler
    from langchain_core.outputs import LLMResult
    from langchain_core.runnables import RunnableConfig

__all__ = [
    "CacheHits",
    "Estimate",
    "community_price_known",
    "entry_from",
    "get_openai_callback",
    "new_handler",
    "report_estimate",
]


@functools.cache
def _openai_info() -> ModuleType:
    with warnings.catch_warnings():
        # The sunset notice of the archived package; see the module docstring.
        warnings.filterwarnings(
            "ignore", message=r".langchain-community. is being sunset", category=DeprecationWarning
        )
        import langchain_community.callbacks.manager
        import langchain_community.callbacks.openai_info as openai_info
    _ = langchain_community.callbacks.manager  # registers get_openai_callback's context hook
    return openai_info


@contextmanager
def get_openai_callback() -> Iterator[OpenAICallbackHandler]:
    """langchain-community's `get_openai_callback`, without its sunset warning.

    Example:
        >>> from chatchain import get_openai_callback
        >>> with get_openai_callback() as cb:
        ...     pass  # chain.invoke(...)
        >>> cb.total_tokens
        0
    """
    _openai_info()
    from langchain_community.callbacks.manager import get_openai_callback as community_callback

    with community_callback() as handler:
        yield handler


# What the community handler counts, and so what a reply from the response cache adds to it.
_COUNTS = (
    "prompt_tokens",
    "completion_tokens",
    "prompt_tokens_cached",
    "reasoning_tokens",
    "successful_requests",
    "total_cost",
)


@dataclass
class CacheHits:
    """What the calls answered from the response cache (``CHATCHAIN_CACHE``) added to a
    handler's counts: none of it was sent or billed."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_cached: int = 0
    reasoning_tokens: int = 0
    successful_requests: int = 0
    total_cost: float = 0.0


@functools.cache
def _handler_class() -> type[OpenAICallbackHandler]:
    base: type[OpenAICallbackHandler] = _openai_info().OpenAICallbackHandler

    class TurnHandler(base):  # type: ignore[misc, valid-type]
        """The community handler, also keeping apart what replies from the cache added."""

        # Run on the event loop: LangChain would hand each of an async stream's chunks to a
        # thread of the default executor (a thread hop per chunk, for a handler that does
        # nothing with them); `on_llm_end` only takes an uncontended lock.
        run_inline = True

        def __init__(self) -> None:
            super().__init__()
            self.hits = CacheHits()
            self._ends = threading.Lock()  # its counts change only here: deltas are exact

        def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
            with self._ends:
                before = [getattr(self, name) for name in _COUNTS]
                super().on_llm_end(response, **kwargs)
                if not _cache.result_is_hit(response):
                    return
                self.hits.calls += 1
                for name, old in zip(_COUNTS, before, strict=True):
                    setattr(self.hits, name, getattr(self.hits, name) + getattr(self, name) - old)

    return TurnHandler


def new_handler() -> OpenAICallbackHandler:
    """A fresh handler that counts one turn's tokens, requests and list-price cost, and keeps
    apart (in ``hits``, a `CacheHits`) what calls answered from the response cache added."""
    handler: OpenAICallbackHandler = _handler_class()()
    return handler


def community_price_known(model_name: str) -> bool:
    """Whether langchain-community's frozen table has a price for ``model_name``."""
    info: Any = _openai_info()
    prompt = info.standardize_model_name(model_name, token_type=info.TokenType.PROMPT)
    completion = info.standardize_model_name(model_name, token_type=info.TokenType.COMPLETION)
    table = info.MODEL_COST_PER_1K_TOKENS
    return prompt in table and completion in table


@dataclass(frozen=True)
class Estimate:
    """Tokens of a turn's calls that the endpoint never reported (a stream cut before its
    usage chunk, an endpoint that sends none), counted here, call by call."""

    prompt_tokens: int
    completion_tokens: int
    requests: int = 0
    """Those calls that the handler did not see end (a cut stream): not yet counted."""


def entry_from(
    handler: OpenAICallbackHandler,
    *,
    session_id: str,
    user_id: str | None,
    model: str | None,
    pricer: Pricer,
    latency_s: float,
    first_token_s: float | None = None,
    summary: bool = False,
    estimate: Estimate | None = None,
    configured_model: str | None = None,
) -> UsageEntry:
    """The ledger entry of one turn, from its handler's counts plus ``estimate``.

    The cost comes from `chatchain.pricing` (settings, genai-prices, langchain-community's
    table, in that order); a model no source knows is priced as ``configured_model`` (source
    ``"configured:<source>"``); the cost is ``None`` when neither is known: never a silent 0.

    Calls answered from the response cache (the handler's ``hits``) sent nothing: their
    tokens, requests and cost are left out, and ``saved_usd`` is what they would have cost
    (the tokens their replies were first billed with). An entry all of whose calls were hits
    is ``cached``, with tokens, requests and cost 0.
    """
    hits: CacheHits = getattr(handler, "hits", None) or CacheHits()
    prompt = handler.prompt_tokens - hits.prompt_tokens
    completion = handler.completion_tokens - hits.completion_tokens
    cached_prompt = handler.prompt_tokens_cached - hits.prompt_tokens_cached
    requests = handler.successful_requests - hits.successful_requests
    estimated = estimate is not None
    if estimate is not None:  # calls whose usage never came, added to those that reported it
        prompt += estimate.prompt_tokens
        completion += estimate.completion_tokens
        requests += estimate.requests
    community = saved_community = None
    if model and not estimated and community_price_known(model):
        community = float(handler.total_cost) - hits.total_cost
        saved_community = hits.total_cost
    price = pricer.price(
        model,
        prompt,
        completion,
        cached_prompt,
        community_cost=community,
        configured=configured_model,
    )
    saved = None
    if hits.calls:
        saved = pricer.price(
            model,
            hits.prompt_tokens,
            hits.completion_tokens,
            hits.prompt_tokens_cached,
            community_cost=saved_community,
            configured=configured_model,
        )
    cached = hits.calls > 0 and requests == 0 and not estimated
    return UsageEntry(
        session_id,
        model=model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cached_tokens=cached_prompt,
        reasoning_tokens=handler.reasoning_tokens - hits.reasoning_tokens,
        requests=requests,
        cost_usd=0.0 if cached else price.cost_usd,
        price_source=(saved or price).source if cached else price.source,
        latency_s=latency_s,
        first_token_s=first_token_s,
        summary=summary,
        estimated=estimated,
        cached=cached,
        saved_usd=None if saved is None else saved.cost_usd,
        user_id=user_id,
    )


def _callback_handlers(config: RunnableConfig) -> list[Any]:
    """The handlers of a run: ``get_openai_callback``'s (a context variable), then the
    config's own (a list, or a callback manager's handlers)."""
    _openai_info()
    from langchain_community.callbacks.manager import openai_callback_var

    callbacks: Any = config.get("callbacks")
    given = callbacks if isinstance(callbacks, list) else getattr(callbacks, "handlers", [])
    return [openai_callback_var.get(), *given]


def report_estimate(
    config: RunnableConfig, own: Any, estimate: Estimate, model: str | None
) -> None:
    """Tell the user's `get_openai_callback` handlers what a turn's calls whose usage never
    came were counted here, as the ledger records them.

    The handlers (langchain-community's `OpenAICallbackHandler`, in a ``with
    get_openai_callback()`` around the call or in the run's callbacks; not the turn's own
    ``own``) saw those calls end with no usage, or not end at all (a cut stream). Each is
    given a result per such call through its public `on_llm_end`, with the tokens and the
    model, so it adds them and prices them with its own table, as it does every call. The
    handler has no field to mark a count as estimated: the result's ``llm_output`` says
    ``"estimated": True`` to any handler that reads it, and the turn's ledger entry and
    `Usage` carry ``estimated``. A non-streamed call that ended without usage was already
    counted as a request by the handler, which then counts it twice.
    """
    base = _openai_info().OpenAICallbackHandler
    from langchain_core.outputs import LLMResult

    seen = {id(own)}
    for handler in _callback_handlers(config):
        if not isinstance(handler, base) or id(handler) in seen:
            continue
        seen.add(id(handler))
        tokens = (estimate.prompt_tokens, estimate.completion_tokens)
        for _ in range(max(estimate.requests, 1)):  # one result per request, tokens once
            usage = {"prompt_tokens": tokens[0], "completion_tokens": tokens[1]}
            usage["total_tokens"] = sum(tokens)
            output = {"token_usage": usage, "model_name": model or "", "estimated": True}
            handler.on_llm_end(LLMResult(generations=[], llm_output=output))
            tokens = (0, 0)
