"""Prometheus metrics of the service (prometheus-client), served at ``GET /metrics``.

With several worker processes (``chatchain serve --workers N``) each worker writes its values
to files in ``PROMETHEUS_MULTIPROC_DIR`` (the command sets it to a fresh folder) and
``/metrics``, whichever worker answers, adds up all of them: prometheus-client's
multiprocess mode. The variable must be set before the workers start.

Metric names (counters end in ``_total`` on the wire):

- ``chatchain_turns_total{route, outcome}``: turns, ``outcome`` ``ok``, ``interrupted`` (the
  client left, or the stream broke, after part of the reply was sent), ``abandoned`` (the
  client left before the reply began: nothing was sent) or ``error``;
- ``chatchain_tokens_total{kind}``: ``prompt`` and ``completion`` tokens of answered turns;
- ``chatchain_cost_usd_total``: their list-price cost (priced models only);
- ``chatchain_turn_seconds``: histogram of a turn's wall-clock time;
- ``chatchain_first_token_seconds``: histogram of the time to a streamed reply's first text;
- ``chatchain_errors_total{type}``: error answers by error class (``BudgetExceeded``, ...);
- ``chatchain_open_streams``: streamed replies in progress (summed over live workers).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from chatchain.usage import Usage

__all__ = [
    "ERRORS",
    "OPEN_STREAMS",
    "exposition",
    "process_exited",
    "record_abandoned",
    "record_failed_turn",
    "record_turn",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

TURNS = Counter("chatchain_turns", "Turns served, by route and outcome.", ["route", "outcome"])
TOKENS = Counter("chatchain_tokens", "Tokens of the turns served, by kind.", ["kind"])
COST = Counter("chatchain_cost_usd", "List-price USD of the turns served (priced models only).")
LATENCY = Histogram("chatchain_turn_seconds", "Wall-clock seconds of a turn.", buckets=_SECONDS)
FIRST_TOKEN = Histogram(
    "chatchain_first_token_seconds", "Seconds to a streamed reply's first text.", buckets=_SECONDS
)
ERRORS = Counter("chatchain_errors", "Error answers, by error class.", ["type"])
OPEN_STREAMS = Gauge(
    "chatchain_open_streams", "Streamed replies in progress.", multiprocess_mode="livesum"
)


def record_turn(route: str, usage: Usage | None, *, interrupted: bool = False) -> None:
    """Count one turn that ended with a reply (whole or ``interrupted``)."""
    _record(route, "interrupted" if interrupted else "ok", usage)


def record_abandoned(route: str, usage: Usage | None) -> None:
    """Count one turn whose client left before any of the reply was sent (what it used too)."""
    _record(route, "abandoned", usage)


def _record(route: str, outcome: str, usage: Usage | None) -> None:
    TURNS.labels(route, outcome).inc()
    if usage is None:
        return
    TOKENS.labels("prompt").inc(usage.prompt_tokens)
    TOKENS.labels("completion").inc(usage.completion_tokens)
    COST.inc(usage.priced_cost_usd or 0.0)
    LATENCY.observe(usage.latency_s)
    if usage.first_token_s is not None:
        FIRST_TOKEN.observe(usage.first_token_s)


def record_failed_turn(route: str) -> None:
    """Count one turn that ended in an error (the error itself is counted by its answer)."""
    TURNS.labels(route, "error").inc()


def exposition() -> tuple[bytes, str]:
    """The metrics in Prometheus' text format, and its content type: this process's, or all
    workers' in multiprocess mode."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def process_exited() -> None:
    """Drop this worker's live gauges from the shared files (multiprocess mode only)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
