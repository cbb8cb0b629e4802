"""OpenTelemetry spans of chatchain's turns (``pip install 'chatchain[otel]'``).

`OpenTelemetryHooks` is a `TurnHooks` that traces each turn as a tree of spans, with the
attribute names of OpenTelemetry's semantic conventions for generative AI (``gen_ai.*``)::

    invoke_agent chatchain          the turn (gen_ai.conversation.id: the session id)
    ├── chat gpt-4o-mini            each call to the model (a tool round makes one more)
    ├── execute_tool add            each tool call
    ├── chat gpt-4o-mini
    └── commit_turn                 the write of the turn to the store

A span that failed has status ``ERROR`` and ``error.type`` (the exception's class; for the
turn ``BudgetExceeded`` or ``TurnDeadlineError`` when a cap or the deadline stopped it). A
stream stopped early ends its spans with ``chatchain.turn.interrupted`` set. Message text
is never recorded: spans carry ids, models, token counts, cost and timings only.

Spans are parented explicitly (the turn is not made the current span), so they form the
tree above whichever thread or task runs the turn.

Example:
    >>> from opentelemetry.sdk.trace import TracerProvider
    >>> from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    >>> from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    ...     InMemorySpanExporter,
    ... )
    >>> from chatchain import Chatbot
    >>> from chatchain.testing import FakeChatModel
    >>> exporter = InMemorySpanExporter()
    >>> provider = TracerProvider()
    >>> provider.add_span_processor(SimpleSpanProcessor(exporter))
    >>> bot = Chatbot(llm=FakeChatModel(), hooks=OpenTelemetryHooks(provider))
    >>> _ = bot.chat("hi")
    >>> [span.name for span in exporter.get_finished_spans()]
    ['chat fake-chat-model', 'commit_turn', 'invoke_agent chatchain']
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from chatchain.errors import ConfigurationError
from chatchain.hooks import (
    ModelCallEnded,
    ModelCallStarted,
    StoreCommitted,
    ToolCallEnded,
    ToolCallStarted,
    TurnEnded,
    TurnHooks,
    TurnInfo,
    TurnStarted,
)

if TYPE_CHECKING:
    from opentelemetry.trace import Span, TracerProvider

__all__ = ["OpenTelemetryHooks"]

AGENT = "chatchain"
"""The ``gen_ai.agent.name`` of a turn's span (a turn is a small agent: model and tools)."""


def _trace() -> Any:
    """``opentelemetry.trace``, or an error that says which ``pip install`` fixes it."""
    try:
        from opentelemetry import trace
    except ImportError as exc:
        raise ConfigurationError(
            f"OpenTelemetryHooks needs the OpenTelemetry API, which is not installed ({exc}): "
            "pip install 'chatchain[otel]'."
        ) from exc
    return trace


class OpenTelemetryHooks(TurnHooks):
    """Exports each turn as OpenTelemetry spans (see the module's docstring).

    Args:
        tracer_provider: Where the spans go; the global one (``trace.get_tracer_provider``,
            as the OpenTelemetry SDK or ``opentelemetry-instrument`` set it) by default.
        provider_name: The ``gen_ai.provider.name`` of the model calls (``"openai"``: any
            OpenAI-compatible endpoint).

    Raises:
        ConfigurationError: The OpenTelemetry API is not installed.
    """

    def __init__(
        self, tracer_provider: TracerProvider | None = None, *, provider_name: str = "openai"
    ) -> None:
        from chatchain import __version__

        self._trace = _trace()
        self._tracer = self._trace.get_tracer(
            "chatchain", __version__, tracer_provider=tracer_provider
        )
        self._provider = provider_name
        self._turns: dict[str, Span] = {}
        self._children: dict[tuple[str, str], Span] = {}  # (turn id, "call 0"/"tool <id>")
        self._lock = threading.Lock()  # a sync stream's tools may run in a worker thread

    # -- helpers ----------------------------------------------------------------------------

    def _common(self, turn: TurnInfo) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "gen_ai.provider.name": self._provider,
            "gen_ai.system": self._provider,  # the older name, still read by many backends
            "gen_ai.conversation.id": turn.session_id,
            "chatchain.turn.id": turn.id,
        }
        if turn.model:
            attributes["gen_ai.request.model"] = turn.model
        if turn.user_id is not None:
            attributes["user.id"] = turn.user_id
        return attributes

    def _start_child(
        self, turn: TurnInfo, key: str, name: str, attributes: dict[str, Any], kind: Any = None
    ) -> None:
        with self._lock:
            parent = self._turns.get(turn.id)
        if parent is None:  # hooks added while the turn ran: its spans start with the next
            return
        context = self._trace.set_span_in_context(parent)
        span = self._tracer.start_span(
            name,
            context=context,
            kind=kind if kind is not None else self._trace.SpanKind.INTERNAL,
            attributes=attributes,
        )
        with self._lock:
            self._children[(turn.id, key)] = span

    def _take_child(self, turn: TurnInfo, key: str) -> Span | None:
        with self._lock:
            return self._children.pop((turn.id, key), None)

    def _failed(self, span: Span, kind: str, description: str | None = None) -> None:
        span.set_attribute("error.type", kind)
        span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, description))

    # -- the events -------------------------------------------------------------------------

    def on_turn_start(self, event: TurnStarted) -> None:
        attributes = {
            **self._common(event.turn),
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": AGENT,
        }
        span = self._tracer.start_span(f"invoke_agent {AGENT}", attributes=attributes)
        with self._lock:
            self._turns[event.turn.id] = span

    def on_model_start(self, event: ModelCallStarted) -> None:
        attributes = {**self._common(event.turn), "gen_ai.operation.name": "chat"}
        if event.max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = event.max_tokens
        name = f"chat {event.turn.model}" if event.turn.model else "chat"
        kind = self._trace.SpanKind.CLIENT
        self._start_child(event.turn, f"call {event.index}", name, attributes, kind)

    def on_model_end(self, event: ModelCallEnded) -> None:
        span = self._take_child(event.turn, f"call {event.index}")
        if span is None:
            return
        if event.model:
            span.set_attribute("gen_ai.response.model", event.model)
        if event.response_id:
            span.set_attribute("gen_ai.response.id", event.response_id)
        if event.finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [event.finish_reason])
        if event.input_tokens is not None:
            span.set_attribute("gen_ai.usage.input_tokens", event.input_tokens)
        if event.output_tokens is not None:
            span.set_attribute("gen_ai.usage.output_tokens", event.output_tokens)
        if event.interrupted:
            span.set_attribute("chatchain.turn.interrupted", True)
        if event.error is not None:
            self._failed(span, type(event.error).__qualname__, str(event.error))
        span.end()

    def on_tool_start(self, event: ToolCallStarted) -> None:
        attributes = {
            **self._common(event.turn),
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": event.name,
            "gen_ai.tool.call.id": event.id,
            "gen_ai.tool.type": "function",
        }
        self._start_child(event.turn, f"tool {event.id}", f"execute_tool {event.name}", attributes)

    def on_tool_end(self, event: ToolCallEnded) -> None:
        span = self._take_child(event.turn, f"tool {event.call.id}")
        if span is None:
            return
        if event.call.status == "error":
            self._failed(span, "ToolError", event.call.error)
        span.end()

    def on_commit(self, event: StoreCommitted) -> None:
        with self._lock:
            parent = self._turns.get(event.turn.id)
        if parent is None:
            return
        # The event comes once the write is over: its span starts when the write did.
        end = time.time_ns()
        span = self._tracer.start_span(
            "commit_turn",
            context=self._trace.set_span_in_context(parent),
            attributes={**self._common(event.turn), "chatchain.commit.messages": event.messages},
            start_time=end - int(event.seconds * 1e9),
        )
        if event.error is not None:
            self._failed(span, type(event.error).__qualname__, str(event.error))
        span.end(end_time=end)

    def on_turn_end(self, event: TurnEnded) -> None:
        with self._lock:
            span = self._turns.pop(event.turn.id, None)
            left = [key for key in self._children if key[0] == event.turn.id]
            children = [self._children.pop(key) for key in left]
        for child in children:  # a tool still running when the turn stopped
            child.set_attribute("chatchain.turn.interrupted", True)
            child.end()
        if span is None:
            return
        span.set_attribute("chatchain.turn.outcome", event.outcome)
        if event.interrupted:
            span.set_attribute("chatchain.turn.interrupted", True)
        usage = event.usage
        if usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
            if usage.cost_usd is not None:
                span.set_attribute("chatchain.cost_usd", usage.cost_usd)
            if usage.model:
                span.set_attribute("gen_ai.response.model", usage.model)
        if event.first_token_s is not None:
            span.set_attribute("chatchain.turn.first_token_s", event.first_token_s)
        if event.error is not None:
            self._failed(span, type(event.error).__qualname__, str(event.error))
        span.end()
