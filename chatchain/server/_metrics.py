"""Prometheus metrics of the service (prometheus-client), served at ``GET /metrics``.

With several worker processes (``chatchain serve --workers N``) each worker writes its values
to files in ``PROMETHEUS_MULTIPROC_DIR`` (the command sets it to a fresh folder) and
``/metrics``, whichever worker answers, adds up all of them: prometheus-client's
multiprocess mode. The variable must be set before the workers start.

What is about turns is counted by `TurnMetrics`, the turn hooks (`chatchain.hooks`) the app
adds to its Chatbot, from the turn's own events; each route names itself first (`serving`).
What is about HTTP (error answers, open streams) is counted where it is answered.

Metric names (counters end in ``_total`` on the wire):

- ``chatchain_turns_total{route, outcome}``: turns that ran (took their session's lock; a
  request refused before, e.g. bad input or a busy session, is in ``chatchain_errors_total``
  only), ``outcome`` ``ok``, ``interrupted`` (the client left after part of the reply came),
  ``abandoned`` (the client left before any of it came) or ``error`` (a failure, a budget
  refusal or the deadline);
- ``chatchain_tokens_total{kind}``: ``prompt`` and ``completion`` tokens of turns that did
  not fail;
- ``chatchain_cost_usd_total``: their list-price cost (priced models only);
- ``chatchain_turn_seconds``: histogram of a turn's wall-clock time;
- ``chatchain_first_token_seconds``: histogram of the time to a streamed reply's first text;
- ``chatchain_errors_total{type}``: error answers by error class (``BudgetExceeded``, ...);
- ``chatchain_open_streams``: streamed replies in progress (summed over live workers).
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from dataclasses import dataclass

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

from chatchain.hooks import TurnEnded, TurnHooks

__all__ = [
    "ERRORS",
    "HOOKS",
    "OPEN_STREAMS",
    "TurnMetrics",
    "exposition",
    "left_before_turn",
    "process_exited",
    "serving",
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


@dataclass
class _Request:
    route: str
    counted: bool = False  # whether its turn was counted (a request runs one turn at most)


_REQUEST: ContextVar[_Request | None] = ContextVar("chatchain_metrics_request", default=None)


def serving(route: str) -> None:
    """Count the turns the current request runs under ``route`` (``native``, ``openai``,
    ``responses``).

    A context variable: the tasks the request starts (a streamed turn's) inherit it.
    """
    _REQUEST.set(_Request(route))


def left_before_turn() -> None:
    """The client left before the reply began, and its turn was stopped: count the request
    ``abandoned`` if the turn had not even started (e.g. it waited for the session's lock),
    which its own end would have counted."""
    request = _REQUEST.get()
    if request is not None and not request.counted:
        request.counted = True
        TURNS.labels(request.route, "abandoned").inc()


def _outcome(event: TurnEnded) -> str:
    if event.outcome == "ok":
        return "ok"
    if event.outcome != "interrupted":
        return "error"
    began = event.first_token_s is not None or event.tool_runs
    return "interrupted" if began else "abandoned"


class TurnMetrics(TurnHooks):
    """Counts each turn a route ran (see `serving`), from its `TurnEnded` event."""

    def on_turn_end(self, event: TurnEnded) -> None:
        request = _REQUEST.get()
        if request is None:  # a turn the service did not run for a request
            return
        request.counted = True
        outcome = _outcome(event)
        TURNS.labels(request.route, outcome).inc()
        usage = event.usage
        if usage is None or outcome == "error":
            return
        TOKENS.labels("prompt").inc(usage.prompt_tokens)
        TOKENS.labels("completion").inc(usage.completion_tokens)
        COST.inc(usage.priced_cost_usd or 0.0)
        LATENCY.observe(usage.latency_s)
        if usage.first_token_s is not None:
            FIRST_TOKEN.observe(usage.first_token_s)


HOOKS = TurnMetrics()
"""The hooks every app adds to its Chatbot (one object: adding it twice counts once)."""


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
