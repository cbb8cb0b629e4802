"""What a turn costs: tokens, requests, dollars and time, and a per-session ledger."""

from __future__ import annotations

import threading
from dataclasses import dataclass

__all__ = ["Usage", "UsageLedger"]


@dataclass(frozen=True)
class Usage:
    """Tokens, requests, cost and time of one turn, or the total of several.

    Example:
        >>> a = Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15, cost_usd=0.001)
        >>> (a + a).total_tokens
        30
        >>> (a + Usage(cost_usd=None)).cost_usd is None  # an unknown price stays unknown
        True
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens the endpoint served from its cache, where it reports them."""
    reasoning_tokens: int = 0
    """Completion tokens spent on reasoning, where the endpoint reports them."""
    successful_requests: int = 0
    cost_usd: float | None = 0.0
    """List-price cost in USD; ``None`` when any part of it is for a model of unknown price."""
    latency_s: float = 0.0
    """Wall-clock seconds of the turn (summed over turns in a total)."""
    first_token_s: float | None = None
    """Seconds to the first streamed text; ``None`` for non-streamed turns and totals."""
    model: str | None = None
    """The model that answered, as the endpoint named it; ``None`` in a mixed total."""
    turns: int = 0
    summaries: int = 0
    """Summary calls included (their tokens and cost are in the totals above)."""

    def __add__(self, other: Usage) -> Usage:
        cost = (
            None
            if self.cost_usd is None or other.cost_usd is None
            else self.cost_usd + other.cost_usd
        )
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
            successful_requests=self.successful_requests + other.successful_requests,
            cost_usd=cost,
            latency_s=self.latency_s + other.latency_s,
            model=_merge_model(self, other),
            turns=self.turns + other.turns,
            summaries=self.summaries + other.summaries,
        )

    def __str__(self) -> str:
        cost = "cost unknown" if self.cost_usd is None else f"${self.cost_usd:.6f}"
        return (
            f"{self.prompt_tokens} prompt + {self.completion_tokens} completion = "
            f"{self.total_tokens} tokens, {cost}, {self.latency_s:.2f} s"
        )


def _merge_model(a: Usage, b: Usage) -> str | None:
    if a.turns + a.summaries == 0:
        return b.model
    if b.turns + b.summaries == 0:
        return a.model
    return a.model if a.model == b.model else None


class UsageLedger:
    """Usage totals per session, in this process's memory.

    Example:
        >>> ledger = UsageLedger()
        >>> ledger.record("s1", Usage(total_tokens=7, turns=1))
        >>> ledger.total("s1").total_tokens
        7
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, Usage] = {}

    def record(self, session_id: str, usage: Usage) -> None:
        """Add one turn's usage to its session."""
        with self._lock:
            self._totals[session_id] = self._totals.get(session_id, Usage()) + usage

    def total(self, session_id: str | None = None) -> Usage:
        """The total of one session, or of all sessions when ``session_id`` is ``None``."""
        with self._lock:
            if session_id is not None:
                return self._totals.get(session_id, Usage())
            total = Usage()
            for usage in self._totals.values():
                total = total + usage
            return total

    def forget(self, session_id: str) -> None:
        """Drop a session's totals."""
        with self._lock:
            self._totals.pop(session_id, None)
