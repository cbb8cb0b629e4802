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
from types import ModuleType
from typing import TYPE_CHECKING, Any

from chatchain.usage import Usage

if TYPE_CHECKING:
    from langchain_community.callbacks.openai_info import OpenAICallbackHandler

__all__ = ["get_openai_callback", "new_handler", "usage_from"]


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


def _price_known(model_name: str) -> bool:
    info: Any = _openai_info()
    prompt = info.standardize_model_name(model_name, token_type=info.TokenType.PROMPT)
    completion = info.standardize_model_name(model_name, token_type=info.TokenType.COMPLETION)
    table = info.MODEL_COST_PER_1K_TOKENS
    return prompt in table and completion in table


def usage_from(
    handler: OpenAICallbackHandler,
    *,
    model: str | None,
    latency_s: float,
    first_token_s: float | None = None,
) -> Usage:
    """One turn's `Usage` from its handler.

    The cost is ``None`` when the model has no known price: never a silent 0.
    """
    cost: float | None = None
    if model and _price_known(model):
        cost = float(handler.total_cost)
    return Usage(
        prompt_tokens=handler.prompt_tokens,
        completion_tokens=handler.completion_tokens,
        total_tokens=handler.total_tokens,
        cached_tokens=handler.prompt_tokens_cached,
        reasoning_tokens=handler.reasoning_tokens,
        successful_requests=handler.successful_requests,
        cost_usd=cost,
        latency_s=latency_s,
        first_token_s=first_token_s,
        model=model,
        turns=1,
    )
