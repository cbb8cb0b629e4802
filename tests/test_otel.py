"""OpenTelemetry spans of turns (`chatchain.otel`), read back from the SDK's in-memory
exporter: the span tree, the GenAI semantic conventions' attributes, errors and interruption,
through every entry point."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from chatchain import BudgetExceeded, Chatbot, ConfigurationError, ServerError, Settings
from chatchain.otel import OpenTelemetryHooks
from chatchain.testing import FakeChatModel, tool_call_reply
from chatchain.usage import Budget
from tests.test_hooks import MODES, _server_error, _stopped_early, _turn, add


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


@pytest.fixture
def hooks(exporter: InMemorySpanExporter) -> OpenTelemetryHooks:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return OpenTelemetryHooks(provider)


def _spans(exporter: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    spans: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        spans.setdefault(span.name, []).append(span)
    return spans


def _root(spans: dict[str, list[ReadableSpan]]) -> ReadableSpan:
    [turn] = spans["invoke_agent chatchain"]
    assert turn.parent is None
    return turn


@pytest.mark.parametrize("mode", MODES)
def test_a_turn_with_a_tool_round_is_a_span_tree_with_the_genai_attributes(
    settings: Settings, hooks: OpenTelemetryHooks, exporter: InMemorySpanExporter, mode: str
) -> None:
    fake = FakeChatModel(
        model_name="gpt-4o-mini", replies=[tool_call_reply(("add", {"a": 1, "b": 2})), "It is 3"]
    )
    bot = Chatbot(settings, llm=fake, tools=[add], hooks=hooks)

    _turn(bot, mode, "1 + 2?", user_id="ann")

    spans = _spans(exporter)
    assert sorted((name, len(found)) for name, found in spans.items()) == [
        ("chat gpt-4o-mini", 2),
        ("commit_turn", 1),
        ("execute_tool add", 1),
        ("invoke_agent chatchain", 1),
    ]
    turn = _root(spans)
    children = [span for name, found in spans.items() for span in found if span is not turn]
    assert turn.context is not None
    for child in children:  # every other span is the turn's child, in its trace
        assert child.parent is not None
        assert child.parent.span_id == turn.context.span_id
        assert child.context is not None and child.context.trace_id == turn.context.trace_id
        assert child.start_time is not None and turn.start_time is not None
        assert turn.start_time <= child.start_time
    entry = bot.usage_entries()[-1]
    assert turn.attributes is not None
    assert dict(turn.attributes) | {"chatchain.cost_usd": 0.0} == {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": "chatchain",
        "gen_ai.provider.name": "openai",
        "gen_ai.system": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini",
        "gen_ai.conversation.id": "s",
        "user.id": "ann",
        "chatchain.turn.id": entry.id,
        "chatchain.turn.outcome": "ok",
        "gen_ai.usage.input_tokens": entry.prompt_tokens,
        "gen_ai.usage.output_tokens": entry.completion_tokens,
        "chatchain.cost_usd": 0.0,
        **(
            {"chatchain.turn.first_token_s": turn.attributes["chatchain.turn.first_token_s"]}
            if mode in ("stream", "astream")
            else {}
        ),
    }
    assert turn.attributes["chatchain.cost_usd"] == pytest.approx(entry.cost_usd)
    assert turn.status.status_code is StatusCode.UNSET

    first, second = sorted(spans["chat gpt-4o-mini"], key=lambda span: span.start_time or 0)
    for call in (first, second):
        assert call.kind is SpanKind.CLIENT
        assert call.attributes is not None
        assert call.attributes["gen_ai.operation.name"] == "chat"
        assert call.attributes["gen_ai.request.model"] == "gpt-4o-mini"
        assert call.attributes["gen_ai.response.model"] == "gpt-4o-mini"
        assert call.attributes["gen_ai.usage.input_tokens"] > 0
        assert call.attributes["gen_ai.usage.output_tokens"] > 0
    assert first.attributes is not None and second.attributes is not None
    assert first.attributes["gen_ai.response.finish_reasons"] == ("tool_calls",)
    assert second.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert sum(c.attributes["gen_ai.usage.input_tokens"] for c in (first, second)) == (  # type: ignore[index, misc]
        entry.prompt_tokens
    )

    [tool] = spans["execute_tool add"]
    assert tool.attributes is not None
    assert tool.attributes["gen_ai.operation.name"] == "execute_tool"
    assert tool.attributes["gen_ai.tool.name"] == "add"
    assert tool.attributes["gen_ai.tool.call.id"] == bot.history("s")[2].tool_call_id  # type: ignore[attr-defined]
    assert first.end_time is not None and tool.start_time is not None
    assert first.end_time <= tool.start_time  # the tool runs between the two calls
    assert tool.end_time is not None and second.start_time is not None
    assert tool.end_time <= second.start_time
    [commit] = spans["commit_turn"]
    assert commit.attributes is not None and commit.attributes["chatchain.commit.messages"] == 4


@pytest.mark.parametrize("mode", MODES)
def test_a_failed_turn_ends_its_spans_with_status_error_and_the_error_type(
    settings: Settings, hooks: OpenTelemetryHooks, exporter: InMemorySpanExporter, mode: str
) -> None:
    bot = Chatbot(settings, llm=FakeChatModel(errors=[_server_error()]), hooks=hooks)

    with pytest.raises(ServerError):
        _turn(bot, mode)

    spans = _spans(exporter)
    assert sorted(spans) == ["chat fake-chat-model", "invoke_agent chatchain"]
    turn = _root(spans)
    assert turn.status.status_code is StatusCode.ERROR
    assert turn.attributes is not None
    assert turn.attributes["error.type"] == "ServerError"
    assert turn.attributes["chatchain.turn.outcome"] == "error"
    [call] = spans["chat fake-chat-model"]
    assert call.status.status_code is StatusCode.ERROR
    assert call.attributes is not None
    assert call.attributes["error.type"] == "InternalServerError"  # the endpoint's own


@pytest.mark.parametrize("mode", MODES)
def test_a_refused_turn_says_which_cap_refused_it(
    settings: Settings, hooks: OpenTelemetryHooks, exporter: InMemorySpanExporter, mode: str
) -> None:
    bot = Chatbot(settings, llm=FakeChatModel(), budget=Budget(session_tokens=5), hooks=hooks)

    with pytest.raises(BudgetExceeded):
        _turn(bot, mode)

    turn = _root(_spans(exporter))
    assert turn.status.status_code is StatusCode.ERROR
    assert turn.attributes is not None
    assert turn.attributes["error.type"] == "BudgetExceeded"
    assert turn.attributes["chatchain.turn.outcome"] == "refused"


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_a_stream_stopped_early_ends_its_spans_marked_interrupted(
    settings: Settings, hooks: OpenTelemetryHooks, exporter: InMemorySpanExporter, mode: str
) -> None:
    bot = Chatbot(settings, llm=FakeChatModel(), hooks=hooks)

    _stopped_early(bot, mode)

    spans = _spans(exporter)
    assert sorted(spans) == ["chat fake-chat-model", "commit_turn", "invoke_agent chatchain"]
    turn = _root(spans)
    assert turn.attributes is not None
    assert turn.attributes["chatchain.turn.outcome"] == "interrupted"
    assert turn.attributes["chatchain.turn.interrupted"] is True
    assert turn.status.status_code is StatusCode.UNSET  # the caller stopped it: no error
    [call] = spans["chat fake-chat-model"]
    assert call.attributes is not None and call.attributes["chatchain.turn.interrupted"] is True


def test_without_the_otel_extra_the_error_says_which_pip_install_fixes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)

    with pytest.raises(ConfigurationError, match=r"pip install 'chatchain\[otel\]'"):
        OpenTelemetryHooks()
