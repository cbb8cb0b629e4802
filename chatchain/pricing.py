"""What tokens cost: a price you set, else `genai-prices`, else LangChain's table, else unknown.

`get_openai_callback` counts tokens well, but its price table is frozen and it prices an
unknown model at a silent $0. chatchain keeps its token counts and takes the price from, in
order:

1. ``CHATCHAIN_PRICES``: prices you set per model (USD per million tokens), which win;
2. `genai-prices`, a maintained price library, from the data it ships with (never the network);
3. langchain-community's table behind `get_openai_callback`;
4. the configured model's price (from 1 or 2), when the endpoint answered under a name no
   source knows (a proxy or an alias), marked ``"configured:<source>"``;
5. nothing: the cost is ``None`` ("cost unknown"), never 0.

Each cost carries its source, so a report can say where a number came from.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ModelPrice", "Price", "Pricer"]

logger = logging.getLogger("chatchain")


class ModelPrice(BaseModel):
    """A model's price in USD per million tokens, as set in ``CHATCHAIN_PRICES``.

    Example:
        >>> price = ModelPrice(input=0.15, output=0.60, cached_input=0.075)
        >>> round(price.cost(prompt_tokens=1000, completion_tokens=500, cached_tokens=200), 8)
        0.000435
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: float = Field(ge=0)
    """USD per million prompt tokens."""
    output: float = Field(ge=0)
    """USD per million completion tokens (reasoning included)."""
    cached_input: float | None = Field(default=None, ge=0)
    """USD per million prompt tokens served from the cache; ``input`` when not set."""

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        """The cost of a call (cached tokens are part of ``prompt_tokens``)."""
        cached = min(cached_tokens, prompt_tokens)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        return (
            (prompt_tokens - cached) * self.input
            + cached * cached_rate
            + completion_tokens * self.output
        ) / 1_000_000


@dataclass(frozen=True)
class Price:
    """A cost and where it came from (``cost_usd`` and ``source`` are ``None`` when unknown)."""

    cost_usd: float | None
    source: str | None


UNKNOWN = Price(None, None)


class Pricer:
    """Prices calls for one endpoint.

    Args:
        prices: Prices set by the user, by model name; they win over every table.
        base_url: The endpoint, to pick the provider's prices in `genai-prices` (OpenAI's
            when it is not set, or when `genai-prices` does not know the URL).

    Example:
        >>> Pricer().price("gpt-4o-mini", 1000, 500)
        Price(cost_usd=0.00045, source='genai-prices')
        >>> Pricer().price("my-local-model", 1000, 500)
        Price(cost_usd=None, source=None)
    """

    def __init__(
        self, prices: dict[str, ModelPrice] | None = None, base_url: str | None = None
    ) -> None:
        self.prices = dict(prices or {})
        self.base_url = base_url

    def price(
        self,
        model: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
        *,
        community_cost: float | None = None,
        configured: str | None = None,
    ) -> Price:
        """The cost of a call to ``model``; ``community_cost`` is LangChain's, if it had one.

        Your prices are found by the name the endpoint answered with, by the ``configured``
        name (``gpt-4o-mini`` for a reply from ``gpt-4o-mini-2024-07-18``), or by the longest
        name of yours that the answered one extends with a dash. When no source knows the
        answered name (proxies and aliases answer as ``openrouter/gpt-4o-mini``), the call is
        priced as the ``configured`` model, with the source ``"configured:<source>"``: the
        budget held it at that price, and a cap must not let an unknown name through.

        Example:
            >>> Pricer().price("openrouter/gpt-4o-mini", 1000, 500, configured="gpt-4o-mini")
            Price(cost_usd=0.00045, source='configured:genai-prices')
        """
        if model is None:
            return UNKNOWN
        own = self._own_price(model, configured)
        if own is not None:
            return Price(own.cost(prompt_tokens, completion_tokens, cached_tokens), "settings")
        cost = _genai_price(model, self.base_url, prompt_tokens, completion_tokens, cached_tokens)
        if cost is not None:
            return Price(cost, "genai-prices")
        if community_cost is not None:
            return Price(community_cost, "langchain-community")
        if configured is not None and configured != model:
            fallback = self.price(configured, prompt_tokens, completion_tokens, cached_tokens)
            if fallback.cost_usd is not None:
                return Price(fallback.cost_usd, f"configured:{fallback.source}")
        return UNKNOWN

    def _own_price(self, model: str, configured: str | None) -> ModelPrice | None:
        for name in (model, configured):
            if name is not None and name in self.prices:
                return self.prices[name]
        extended = [name for name in self.prices if model.startswith(name + "-")]
        return self.prices[max(extended, key=len)] if extended else None

    def knows(self, model: str | None) -> bool:
        """Whether ``model`` has a price anywhere (a USD budget needs one)."""
        return self.price(model, 1, 1).cost_usd is not None or _community_knows(model)


@functools.cache
def _genai() -> Any:
    import genai_prices

    return genai_prices


@functools.lru_cache(maxsize=256)
def _provider_args(model: str, base_url: str | None) -> dict[str, str] | None:
    """How to ask genai-prices about ``model`` at ``base_url``; ``None`` when it cannot."""
    genai = _genai()
    probe = genai.Usage(input_tokens=1, output_tokens=1)
    attempts: list[dict[str, str]] = []
    if base_url and "api.openai.com" not in base_url:
        attempts.append({"provider_api_url": base_url})
    attempts += [{"provider_id": "openai"}, {}]
    for args in attempts:
        try:
            genai.calc_price(probe, model, **args)
        except LookupError:
            continue
        return args
    return None


def _genai_price(
    model: str, base_url: str | None, prompt: int, completion: int, cached: int
) -> float | None:
    args = _provider_args(model, base_url)
    if args is None:
        return None
    genai = _genai()
    usage = genai.Usage(
        input_tokens=prompt, output_tokens=completion, cache_read_tokens=min(cached, prompt) or None
    )
    total: Decimal = genai.calc_price(usage, model, **args).total_price
    return float(total)


def _community_knows(model: str | None) -> bool:
    if model is None:
        return False
    from chatchain import _metering

    return _metering.community_price_known(model)
