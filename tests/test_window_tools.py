"""The window and the summary keep a tool exchange with its turn (property-based).

Random histories of turns with tool exchanges (several calls a step, several steps a turn),
some of them damaged (a turn cut short after its calls, a lost result, a stray result), go
through the window and the summary; whatever is sent must be a prompt an OpenAI endpoint
accepts: it opens on a user message, every AI message that calls tools is followed by a
result for each call, and no result is without its call.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool

from chatchain import Chatbot, MemoryStore, Settings
from chatchain._tokens import APPROXIMATE
from chatchain.stores import Summary
from chatchain.testing import FakeChatModel
from chatchain.window import SUMMARY_REQUEST_MARK, HistoryWindow, Recall, whole_exchanges

PROPERTY = hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sendable(messages: Sequence[BaseMessage]) -> None:
    """Assert that an OpenAI endpoint accepts ``messages`` as a history."""
    if messages:
        assert messages[0].type == "human", [m.type for m in messages]
    index = 0
    while index < len(messages):
        message = messages[index]
        index += 1
        assert not isinstance(message, ToolMessage), "a tool result without its call"
        if isinstance(message, AIMessage) and message.tool_calls:
            wanted = [call["id"] for call in message.tool_calls]
            answered = []
            while index < len(messages) and isinstance(messages[index], ToolMessage):
                result = messages[index]
                assert isinstance(result, ToolMessage)
                answered.append(result.tool_call_id)
                index += 1
            assert sorted(answered) == sorted(wanted), (wanted, answered)


@st.composite
def turns(draw: st.DrawFn, damaged: bool = False) -> list[list[BaseMessage]]:
    """A history as a list of turns; ``damaged`` adds cut turns, lost and stray results."""
    history: list[list[BaseMessage]] = []
    serial = 0
    for number in range(draw(st.integers(0, 9))):
        turn: list[BaseMessage] = [
            HumanMessage(f"question {number} " + "x" * draw(st.integers(0, 40)))
        ]
        for _step in range(draw(st.integers(0, 3))):
            calls = []
            for _ in range(draw(st.integers(1, 3))):
                serial += 1
                calls.append({"name": "lookup", "args": {"n": serial}, "id": f"call_{serial}"})
            text = draw(st.sampled_from(["", "Let me look."]))
            turn.append(AIMessage(text, tool_calls=calls))
            results: list[BaseMessage] = [
                ToolMessage("r" * draw(st.integers(1, 30)), tool_call_id=call["id"])
                for call in calls
            ]
            results = draw(st.permutations(results))
            if damaged and draw(st.booleans()):
                results = results[: draw(st.integers(0, len(results) - 1))]  # lost results
            if damaged and draw(st.integers(0, 4)) == 0:
                results.append(ToolMessage("stray", tool_call_id="call_nowhere"))
            turn += results
        if not damaged or draw(st.integers(0, 3)):  # a damaged turn may end without its answer
            turn.append(AIMessage(f"answer {number}"))
        history.append(turn)
    return history


def flat(history: list[list[BaseMessage]]) -> list[BaseMessage]:
    return [message for turn in history for message in turn]


def recall(window: HistoryWindow) -> Recall:
    return Recall(window, APPROXIMATE, FakeChatModel())


@PROPERTY
@given(
    history=turns(damaged=True),
    cut=st.integers(0, 60),
    max_turns=st.integers(1, 6),
    max_tokens=st.one_of(st.none(), st.integers(20, 400)),
)
def test_the_window_sends_only_whole_exchanges(
    history: list[list[BaseMessage]], cut: int, max_turns: int, max_tokens: int | None
) -> None:
    messages = flat(history)[cut:]  # a load from the store may start anywhere
    window = HistoryWindow(max_turns=max_turns, max_tokens=max_tokens, summarize=False)
    inputs = [HumanMessage("new question")]
    sent = recall(window).select(messages, None, inputs, window)
    sendable(sent)
    if max_tokens is not None:
        assert APPROXIMATE(sent) + APPROXIMATE(inputs) <= max_tokens


@PROPERTY
@given(history=turns(), cut=st.integers(0, 60), max_tokens=st.integers(20, 400))
def test_a_whole_history_is_sent_as_a_suffix_of_whole_turns(
    history: list[list[BaseMessage]], cut: int, max_tokens: int
) -> None:
    messages = flat(history)[cut:]
    window = HistoryWindow(max_turns=None, max_tokens=max_tokens, summarize=False)
    sent = recall(window).select(messages, None, [HumanMessage("q")], window)
    sendable(sent)
    assert sent == messages[len(messages) - len(sent) :]  # nothing rewritten, nothing skipped
    turn_starts = {id(turn[0]) for turn in history}
    assert not sent or id(sent[0]) in turn_starts


@PROPERTY
@given(history=turns(damaged=True))
def test_whole_exchanges_is_idempotent_and_keeps_every_user_message(
    history: list[list[BaseMessage]],
) -> None:
    messages = flat(history)
    once = whole_exchanges(messages)
    sendable(once)
    assert whole_exchanges(once) == once
    assert [m for m in once if m.type == "human"] == [m for m in messages if m.type == "human"]
    # What a damaged step loses is its calls, never its text.
    texts = [m.text for m in messages if m.type == "ai" and m.text]
    assert [m.text for m in once if m.type == "ai" and m.text] == texts


@PROPERTY
@given(history=turns(), max_turns=st.integers(1, 4), runs=st.integers(1, 4))
def test_the_summary_covers_whole_turns(
    history: list[list[BaseMessage]], max_turns: int, runs: int
) -> None:
    store = MemoryStore()
    model = FakeChatModel(respond=lambda messages: "summary.")
    memory = Recall(HistoryWindow(max_turns=max_turns, max_tokens=None), APPROXIMATE, model)
    messages = flat(history)
    starts = {0, len(messages)} | {i for i, m in enumerate(messages) if m.type == "human"}
    store("s").add_messages(messages)
    for _ in range(runs):
        memory.summarize(store, "s")
        summary = store.get_summary("s")
        if summary is not None:
            assert summary.covers in starts  # the summary ends where a turn starts
    assert all(call[-1].text.startswith(SUMMARY_REQUEST_MARK) for call in model.calls)
    summary = store.get_summary("s")
    covered = summary.covers if summary else 0
    window = memory.load(store, "s", [HumanMessage("q")])
    sendable([m for m in window if m.type != "system"])
    # Nothing between the summary and the window is lost: the window starts where it ends,
    # or later only by whole turns the window's limit left out.
    rest = [m for m in window if m.type != "system"]
    if rest:
        assert messages.index(rest[0]) >= covered


def test_a_summary_due_inside_one_long_tool_turn_covers_the_whole_turn() -> None:
    calls = [{"name": "lookup", "args": {"n": i}, "id": f"c{i}"} for i in range(6)]
    long_turn: list[BaseMessage] = [HumanMessage("q0"), AIMessage("", tool_calls=calls)]
    long_turn += [ToolMessage(f"r{i}", tool_call_id=f"c{i}") for i in range(6)]
    long_turn.append(AIMessage("a0"))
    tail: list[BaseMessage] = [HumanMessage("q1"), AIMessage("a1")]
    store = MemoryStore()
    store("s").add_messages([*long_turn, *tail])
    model = FakeChatModel(respond=lambda messages: "summary.")
    memory = Recall(HistoryWindow(max_turns=1, max_tokens=None), APPROXIMATE, model)
    # Due: 11 messages, a window of 2 and a batch of 2; upto (9) falls inside the long turn.
    assert memory.summarize(store, "s") is not None
    assert store.get_summary("s") == Summary("summary.", covers=len(long_turn))
    folded = model.calls[-1][-1].text
    assert "r5" in folded and "q1" not in folded


def test_the_old_cut_would_split_the_exchange() -> None:
    """Without turn boundaries, the summary would end between a call and its result."""
    calls = [{"name": "lookup", "args": {}, "id": "c1"}]
    messages: list[BaseMessage] = [
        HumanMessage("q0"),
        AIMessage("", tool_calls=calls),
        ToolMessage("r1", tool_call_id="c1"),
        AIMessage("a0"),
        HumanMessage("q1"),
        AIMessage("", tool_calls=[{**calls[0], "id": "c2"}]),
        ToolMessage("r2", tool_call_id="c2"),
        AIMessage("a1"),
    ]
    store = MemoryStore()
    store("s").add_messages(messages)
    memory = Recall(
        HistoryWindow(max_turns=1, max_tokens=None),
        APPROXIMATE,
        FakeChatModel(respond=lambda m: "summary."),
    )
    assert memory._summary_plan(len(messages), None) == (0, 6)  # count - 2: inside turn 2
    memory.summarize(store, "s")
    summary = store.get_summary("s")
    assert summary is not None and summary.covers == 4


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_turn_after_a_cut_tool_exchange_sends_a_valid_history(mode: str) -> None:
    import asyncio

    fake = FakeChatModel()
    settings = Settings(api_key="sk-test", model="gpt-4o-mini", window_turns=3)
    store = MemoryStore()
    call = {"name": "lookup", "args": {}, "id": "c1"}
    store("s").add_messages(
        [
            HumanMessage("q0"),
            AIMessage("", tool_calls=[call, {**call, "id": "c2"}]),
            ToolMessage("r1", tool_call_id="c1"),  # c2's result was lost (a cut turn)
            HumanMessage("q1"),
            AIMessage("a1"),
        ]
    )
    bot = Chatbot(settings, llm=fake, store=store, system="S")
    if mode == "sync":
        bot.chat("q2", session_id="s")
    else:
        asyncio.run(bot.achat("q2", session_id="s"))
    assert [f"{m.type}:{m.text}" for m in fake.calls[-1]] == [
        "system:S",
        "human:q0",
        "human:q1",
        "ai:a1",
        "human:q2",
    ]


def test_count_tools_counts_the_schemas_as_bind_tools_sends_them() -> None:
    @tool
    def get_weather(city: str) -> str:
        """The weather in a city, in a few words."""
        return "sunny"

    tokens = APPROXIMATE.count_tools([get_weather])
    assert tokens > 10
    assert APPROXIMATE.count_tools([get_weather, get_weather]) > tokens
    assert APPROXIMATE.count_tools([]) == 0
    from langchain_core.messages.utils import count_tokens_approximately

    # LangChain's own approximate count of tools agrees within a few tokens.
    assert abs(count_tokens_approximately([], tools=[get_weather]) - tokens) <= 15


@PROPERTY
@given(history=turns(damaged=True))
def test_an_export_of_tool_exchanges_imports_unless_a_result_lost_its_call(
    history: list[list[BaseMessage]],
) -> None:
    from chatchain import InvalidInputError

    messages = flat(history)
    store = MemoryStore()
    store("s").add_messages(messages)
    export = store.export_session("s") if messages else None
    if export is None:
        return
    made: set[str] = set()
    orphan = False
    for message in messages:
        if isinstance(message, AIMessage):
            made.update(str(call["id"]) for call in message.tool_calls)
        elif isinstance(message, ToolMessage):
            orphan = orphan or message.tool_call_id not in made
    if orphan:  # a stray result: refused whole, nothing stored
        with pytest.raises(InvalidInputError, match="which no AI message before it made"):
            store.import_session(export, session_id="copy")
        assert store.load("copy") == []
    else:  # calls that lost their results are kept as they are (the window copes)
        store.import_session(export, session_id="copy")
        assert [m.model_dump() for m in store.load("copy")] == [m.model_dump() for m in messages]
