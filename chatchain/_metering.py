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
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from chatchain.pricing import Pricer
from chatchain.usage import UsageEntry

if TYPE_CHECKING:
    from langchain_community.callbacks.openai_info import OpenAICallbackHandler

__all__ = ["Estimate", "community_price_known", "entry_from", "get_openai_callback", "new_handler"]


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


def new_handler() -> OpenAICallbackHandler:
    """A fresh handler that counts one turn's tokens, requests and list-price cost."""
    handler: OpenAICallbackHandler = _openai_info().OpenAICallbackHandler()
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
    """Tokens counted here when the endpoint never reported them (a stream cut short)."""

    prompt_tokens: int
    completion_tokens: int


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
    cached: bool = False,
) -> UsageEntry:
    """The ledger entry of one call, from its handler's counts (or ``estimate``).

    The cost comes from `chatchain.pricing` (settings, genai-prices, langchain-community's
    table, in that order); a model no source knows is priced as ``configured_model`` (source
    ``"configured:<source>"``); the cost is ``None`` when neither is known: never a silent 0.

    A ``cached`` call (a reply from the response cache) sent nothing: its tokens, requests
    and cost are 0, and ``saved_usd`` is what the tokens the handler saw (those the reply
    was first billed with) would have cost.
    """
    prompt, completion = handler.prompt_tokens, handler.completion_tokens
    requests = handler.successful_requests
    estimated = handler.total_tokens == 0 and estimate is not None
    if estimated:
        assert estimate is not None
        prompt, completion = estimate.prompt_tokens, estimate.completion_tokens
        requests = max(requests, 1)
    community = None
    if model and not estimated and community_price_known(model):
        community = float(handler.total_cost)
    price = pricer.price(
        model,
        prompt,
        completion,
        handler.prompt_tokens_cached,
        community_cost=community,
        configured=configured_model,
    )
    if cached:
        return UsageEntry(
            session_id,
            model=model,
            cost_usd=0.0,
            price_source=price.source,
            latency_s=latency_s,
            first_token_s=first_token_s,
            summary=summary,
            cached=True,
            saved_usd=price.cost_usd,
            user_id=user_id,
        )
    return UsageEntry(
        session_id,
        model=model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cached_tokens=handler.prompt_tokens_cached,
        reasoning_tokens=handler.reasoning_tokens,
        requests=requests,
        cost_usd=price.cost_usd,
        price_source=price.source,
        latency_s=latency_s,
        first_token_s=first_token_s,
        summary=summary,
        estimated=estimated,
        user_id=user_id,
    )
