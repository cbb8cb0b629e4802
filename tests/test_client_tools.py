"""A call's own model options: the client's tools (never run here) and response format."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from chatchain import (
    Budget,
    BudgetExceeded,
    Chatbot,
    InvalidInputError,
    ModelOptions,
    Settings,
    StructuredReplyError,
    ToolCallDelta,
)
from chatchain.testing import FakeChatModel, tool_call_reply
from chatchain.window import halved

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TOOLS = ModelOptions(tools=(WEATHER,), tool_choice="auto")

CITY = {
    "type": "json_schema",
    "json_schema": {
        "name": "city",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "population": {"type": "integer"}},
            "required": ["name", "population"],
            "additionalProperties": False,
        },
    },
}


def _bot(*replies: Any, **settings: Any) -> tuple[Chatbot, FakeChatModel]:
    model = FakeChatModel(replies=list(replies))
    return Chatbot(Settings(**settings), llm=model, system="Be brief."), model


def _asked(bot: Chatbot, session: str = "s") -> tuple[Any, str]:
    reply = bot.chat("Weather in Oslo?", session_id=session, options=TOOLS)
    return reply, reply.message.tool_calls[0]["id"]


def test_the_model_is_sent_the_clients_tools_and_its_calls_are_the_reply() -> None:
    bot, model = _bot(tool_call_reply(("weather", {"city": "Oslo"})))
    reply, _ = _asked(bot)
    assert model.tools_of_calls == [[WEATHER]]  # sent as they are
    assert [(c["name"], c["args"]) for c in reply.message.tool_calls] == [
        ("weather", {"city": "Oslo"})
    ]
    assert reply.tool_runs == ()  # chatchain ran nothing
    assert reply.usage.turns == 1 and reply.usage.prompt_tokens > 0
    stored = bot.history("s")
    assert [m.type for m in stored] == ["human", "ai"]
    assert isinstance(stored[1], AIMessage) and stored[1].tool_calls


def test_the_results_continue_the_session_and_the_exchange_is_stored_whole() -> None:
    bot, model = _bot(tool_call_reply(("weather", {"city": "Oslo"})), "Sunny in Oslo.")
    _, call_id = _asked(bot)
    reply = bot.chat([ToolMessage("sunny", tool_call_id=call_id)], session_id="s", options=TOOLS)
    assert reply.text == "Sunny in Oslo."
    sent = model.calls[-1]
    assert [m.type for m in sent] == ["system", "human", "ai", "tool"]
    assert [m.type for m in bot.history("s")] == ["human", "ai", "tool", "ai"]
    assert bot.usage("s").turns == 2


def test_a_window_of_one_turn_sends_the_calls_with_their_results() -> None:
    bot, model = _bot(
        "first answer",
        tool_call_reply(("weather", {"city": "Oslo"})),
        "Sunny.",
        window_turns=1,
        summarize=False,
    )
    bot.chat("hello", session_id="s")
    _, call_id = _asked(bot)
    bot.chat([ToolMessage("sunny", tool_call_id=call_id)], session_id="s")
    assert [m.type for m in model.calls[-1]] == ["system", "human", "ai", "tool"]
    assert model.calls[-1][1].text == "Weather in Oslo?"


def test_without_a_window_the_results_go_with_their_calls_too() -> None:
    bot, model = _bot(
        tool_call_reply(("weather", {"city": "Oslo"})),
        "Sunny.",
        window_turns=None,
        window_tokens=None,
    )
    _, call_id = _asked(bot)
    bot.chat([ToolMessage("sunny", tool_call_id=call_id)], session_id="s")
    assert [m.type for m in model.calls[-1]] == ["system", "human", "ai", "tool"]


@pytest.mark.parametrize("window_turns", [6, None])
def test_calls_never_answered_are_not_sent_again(window_turns: int | None) -> None:
    bot, model = _bot(
        tool_call_reply(("weather", {"city": "Oslo"})),
        window_turns=window_turns,
        window_tokens=None,
    )
    _asked(bot)
    bot.chat("Never mind. Hi!", session_id="s")
    assert [m.type for m in model.calls[-1]] == ["system", "human", "human"]
    assert [m.type for m in bot.history("s")] == ["human", "ai", "human", "ai"]


@pytest.mark.parametrize(
    ("results", "problem"),
    [
        (lambda call_id: [ToolMessage("x", tool_call_id="call_other")], "answer the calls"),
        (lambda call_id: [], "non-empty list"),
        (lambda call_id: [HumanMessage("hi")], "ToolMessage"),
        (
            lambda call_id: [
                ToolMessage("a", tool_call_id=call_id),
                ToolMessage("b", tool_call_id=call_id),
            ],
            "answer the calls",
        ),
    ],
)
def test_results_that_do_not_answer_the_calls_are_refused_and_nothing_changes(
    results: Any, problem: str
) -> None:
    bot, model = _bot(tool_call_reply(("weather", {"city": "Oslo"})))
    _, call_id = _asked(bot)
    with pytest.raises(InvalidInputError, match=problem):
        bot.chat(results(call_id), session_id="s")
    assert len(model.calls) == 1
    assert [m.type for m in bot.history("s")] == ["human", "ai"]
    assert bot.usage("s").turns == 1


def test_results_without_a_pending_call_are_refused() -> None:
    bot, model = _bot()
    bot.chat("hello", session_id="s")
    with pytest.raises(InvalidInputError, match="asks for no tool"):
        bot.chat([ToolMessage("x", tool_call_id="c1")], session_id="s")
    assert len(model.calls) == 1


def test_the_tools_json_counts_in_the_budget_hold() -> None:
    big = {
        "type": "function",
        "function": {
            "name": "big",
            "description": "word " * 3000,
            "parameters": {"type": "object", "properties": {}},
        },
    }
    model = FakeChatModel()
    bot = Chatbot(Settings(), llm=model, budget=Budget(session_tokens=2000))
    bot.chat("hi", session_id="fits")  # the same prompt without the tools fits
    with pytest.raises(BudgetExceeded):
        bot.chat("hi", session_id="s", options=ModelOptions(tools=(big,)))
    assert len(model.calls) == 1


def test_the_response_formats_schema_counts_in_the_budget_hold() -> None:
    schema = {
        "type": "json_schema",
        "json_schema": {
            "name": "big",
            "schema": {"type": "object", "description": "word " * 3000},
        },
    }
    model = FakeChatModel()
    bot = Chatbot(Settings(), llm=model, budget=Budget(session_tokens=2000))
    with pytest.raises(BudgetExceeded):
        bot.chat("hi", session_id="s", options=ModelOptions(response_format=schema))
    assert model.calls == []


def test_a_bot_with_tools_of_its_own_refuses_client_tools() -> None:
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    model = FakeChatModel()
    bot = Chatbot(Settings(), llm=model, tools=[add])
    with pytest.raises(InvalidInputError, match="tools of its own"):
        bot.chat("hi", options=TOOLS)
    assert model.calls == []


def test_a_stream_yields_the_pieces_of_the_calls_and_keeps_them() -> None:
    bot, _ = _bot(tool_call_reply(("weather", {"city": "Oslo"})))
    with bot.stream("Weather?", session_id="s", options=TOOLS) as stream:
        events = list(stream.events())
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    assert deltas and deltas[0].name == "weather" and deltas[0].id
    assert "".join(d.arguments for d in deltas) == '{"city": "Oslo"}'
    assert stream.finish_reason == "tool_calls"
    assert stream.message is not None and stream.message.tool_calls[0]["args"] == {"city": "Oslo"}
    assert stream.usage is not None and stream.usage.completion_tokens > 0
    stored = bot.history("s")[-1]
    assert isinstance(stored, AIMessage) and stored.tool_calls[0]["id"] == deltas[0].id


def test_an_async_stream_without_memory_yields_the_pieces_too() -> None:
    bot, model = _bot(tool_call_reply(("weather", {"city": "Oslo"})))

    async def run() -> list[Any]:
        stream = bot.astream_messages(
            [HumanMessage("Weather?")], session_id="call-1", options=TOOLS
        )
        return [e async for e in stream.events()]

    events = asyncio.run(run())
    assert [e.name for e in events if isinstance(e, ToolCallDelta) and e.name] == ["weather"]
    assert model.tools_of_calls == [[WEATHER]]
    assert bot.history("call-1") == [] and bot.usage("call-1").turns == 1


def test_a_stream_without_client_tools_yields_no_deltas() -> None:
    bot, _ = _bot("plain")
    assert list(bot.stream("hi").events()) == ["plain"]


def test_a_reply_that_fits_the_json_schema_is_stored() -> None:
    bot, _ = _bot('{"name": "Oslo", "population": 709000}')
    options = ModelOptions(response_format=CITY)
    assert bot.chat("Capital of Norway?", session_id="s", options=options).text.startswith("{")
    assert len(bot.history("s")) == 2


@pytest.mark.parametrize("streamed", [False, True])
def test_a_reply_that_does_not_fit_the_json_schema_is_metered_and_not_stored(
    streamed: bool,
) -> None:
    bot, _ = _bot('{"name": "Oslo"}')
    options = ModelOptions(response_format=CITY)
    with pytest.raises(StructuredReplyError, match="population"):
        if streamed:
            list(bot.stream("Capital?", session_id="s", options=options))
        else:
            bot.chat("Capital?", session_id="s", options=options)
    assert bot.history("s") == []
    assert bot.usage("s").turns == 1 and bot.usage("s").completion_tokens > 0


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"tools": ({"type": "web_search"},)}, "only function tools"),
        ({"tools": (WEATHER, WEATHER)}, "share a name"),
        (
            {"tools": (WEATHER,), "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "not among the tools",
        ),
        ({"tool_choice": "required"}, "needs tools"),
        ({"response_format": {"type": "xml"}}, "must have a type"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "give the schema a name",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": 3}},
                }
            },
            "not a valid JSON schema",
        ),
    ],
)
def test_options_out_of_openais_format_are_refused(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(InvalidInputError, match=problem):
        ModelOptions(**options)


def test_halving_the_history_keeps_the_calls_the_input_answers() -> None:
    call = {"name": "weather", "args": {}, "id": "c1"}
    history = [
        HumanMessage("q1"),
        AIMessage("a1"),
        HumanMessage("q2"),
        AIMessage("", tool_calls=[call]),
    ]
    smaller = halved(history)
    assert smaller is not None and smaller[-1] is history[-1] and len(smaller) < len(history)
    assert halved([history[-1]]) is None
