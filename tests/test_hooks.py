"""Turn hooks (`chatchain.hooks`): each event fired once, in order, from every entry point,
and a hook that raises changes nothing of the turn or of what it records."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import openai
import pytest
from langchain_core.messages import HumanMessage

from chatchain import (
    BudgetExceeded,
    Chatbot,
    ConfigurationError,
    ServerError,
    Settings,
    TurnDeadlineError,
    create_chat_chain,
)
from chatchain.hooks import (
    FirstToken,
    ModelCallEnded,
    ModelCallStarted,
    StoreCommitted,
    ToolCallEnded,
    ToolCallStarted,
    TurnEnded,
    TurnHooks,
    TurnStarted,
)
from chatchain.stores import MemoryStore
from chatchain.testing import FakeChatModel, tool_call_reply
from chatchain.usage import Budget
from tests.test_deadline import _join_workers

MODES = ["chat", "stream", "achat", "astream"]


class Recorder(TurnHooks):
    """Keeps every event it is told of, in order."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def on_turn_start(self, event: TurnStarted) -> None:
        self.events.append(event)

    def on_model_start(self, event: ModelCallStarted) -> None:
        self.events.append(event)

    def on_first_token(self, event: FirstToken) -> None:
        self.events.append(event)

    def on_model_end(self, event: ModelCallEnded) -> None:
        self.events.append(event)

    def on_tool_start(self, event: ToolCallStarted) -> None:
        self.events.append(event)

    def on_tool_end(self, event: ToolCallEnded) -> None:
        self.events.append(event)

    def on_commit(self, event: StoreCommitted) -> None:
        self.events.append(event)

    def on_turn_end(self, event: TurnEnded) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [type(event).__name__ for event in self.events]

    def ended(self) -> TurnEnded:
        ends = [e for e in self.events if isinstance(e, TurnEnded)]
        assert len(ends) == 1, self.kinds()
        return ends[0]


class Raising(TurnHooks):
    """Every hook raises."""

    def __init__(self) -> None:
        self.calls = 0

    def _fail(self, event: object) -> None:
        self.calls += 1
        raise RuntimeError(f"hook bug on {type(event).__name__}")

    on_turn_start = on_model_start = on_first_token = on_model_end = _fail  # type: ignore[assignment]
    on_tool_start = on_tool_end = on_commit = on_turn_end = _fail  # type: ignore[assignment]


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def _turn(bot: Chatbot, mode: str, text: str = "hello", **kwargs: Any) -> str:
    if mode == "chat":
        return bot.chat(text, session_id="s", **kwargs).text
    if mode == "stream":
        return "".join(bot.stream(text, session_id="s", **kwargs))
    if mode == "achat":
        return asyncio.run(bot.achat(text, session_id="s", **kwargs)).text

    async def consume() -> str:
        return "".join([piece async for piece in bot.astream(text, session_id="s", **kwargs)])

    return asyncio.run(consume())


def _stopped_early(bot: Chatbot, mode: str) -> str:
    """Take the stream's first piece, then stop it."""
    if mode == "stream":
        with bot.stream("one two three four", session_id="s") as stream:
            return next(stream)

    async def first() -> str:
        async with bot.astream("one two three four", session_id="s") as stream:
            return await anext(stream)

    return asyncio.run(first())


def _server_error() -> openai.InternalServerError:
    request = httpx.Request("POST", "https://api.example/v1/chat/completions")
    response = httpx.Response(500, request=request)
    return openai.InternalServerError("boom", response=response, body=None)


@pytest.mark.parametrize("mode", MODES)
def test_a_turn_with_a_tool_round_tells_each_event_once_in_order(
    settings: Settings, mode: str
) -> None:
    fake = FakeChatModel(
        model_name="gpt-4o-mini", replies=[tool_call_reply(("add", {"a": 1, "b": 2})), "It is 3"]
    )
    hooks = Recorder()
    bot = Chatbot(settings, llm=fake, tools=[add], hooks=hooks)

    assert _turn(bot, mode, "1 + 2?", user_id="ann") == "It is 3"

    streamed = mode in ("stream", "astream")
    assert hooks.kinds() == [
        "TurnStarted",
        "ModelCallStarted",
        "ModelCallEnded",
        "ToolCallStarted",
        "ToolCallEnded",
        "ModelCallStarted",
        *(["FirstToken"] if streamed else []),
        "ModelCallEnded",
        "StoreCommitted",
        "TurnEnded",
    ]
    turn = hooks.events[0].turn
    assert {event.turn for event in hooks.events} == {turn}
    assert (turn.session_id, turn.user_id, turn.model) == ("s", "ann", "gpt-4o-mini")
    assert turn.id == bot.usage_entries()[-1].id  # the ledger entry's id ties them together
    first, second = [e for e in hooks.events if isinstance(e, ModelCallEnded)]
    assert (first.index, first.finish_reason, first.error) == (0, "tool_calls", None)
    assert (second.index, second.model, second.error, second.interrupted) == (
        1,
        "gpt-4o-mini",
        None,
        False,
    )
    assert first.input_tokens and first.output_tokens and second.output_tokens
    started, finished = hooks.events[3], hooks.events[4]
    assert (started.name, started.args) == ("add", {"a": 1, "b": 2})
    assert (finished.call.id, finished.call.result, finished.call.status) == (
        started.id,
        "3",
        "success",
    )
    commit = hooks.events[-2]
    assert (commit.messages, commit.error) == (4, None)  # user, tool call, result, reply
    ended = hooks.ended()
    assert (ended.outcome, ended.error, ended.interrupted) == ("ok", None, False)
    assert ended.usage is not None
    assert ended.usage.total_tokens == bot.usage("s").total_tokens > 0
    assert ended.cost_usd == ended.usage.cost_usd is not None
    assert [call.name for call in ended.tool_runs] == ["add"]
    assert ended.seconds > 0
    assert (ended.first_token_s is not None) is streamed


@pytest.mark.parametrize("mode", MODES)
def test_a_failed_call_ends_its_model_call_and_the_turn_with_the_error(
    settings: Settings, mode: str
) -> None:
    hooks = Recorder()
    bot = Chatbot(settings, llm=FakeChatModel(errors=[_server_error()]), hooks=hooks)

    with pytest.raises(ServerError) as caught:
        _turn(bot, mode)

    assert hooks.kinds() == ["TurnStarted", "ModelCallStarted", "ModelCallEnded", "TurnEnded"]
    call = hooks.events[2]
    assert isinstance(call.error, openai.InternalServerError)
    ended = hooks.ended()
    assert (ended.outcome, ended.error, ended.usage) == ("error", caught.value, None)
    assert bot.history("s") == []


@pytest.mark.parametrize("mode", MODES)
def test_a_turn_a_budget_refuses_ends_refused_without_a_model_call(
    settings: Settings, mode: str
) -> None:
    hooks = Recorder()
    bot = Chatbot(settings, llm=FakeChatModel(), budget=Budget(session_tokens=5), hooks=hooks)

    with pytest.raises(BudgetExceeded) as caught:
        _turn(bot, mode)

    assert hooks.kinds() == ["TurnStarted", "TurnEnded"]
    ended = hooks.ended()
    assert (ended.outcome, ended.error) == ("refused", caught.value)


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_a_stream_stopped_early_ends_interrupted_with_its_partial_reply(
    settings: Settings, mode: str
) -> None:
    hooks = Recorder()
    bot = Chatbot(settings, llm=FakeChatModel(), hooks=hooks)

    assert _stopped_early(bot, mode) == "Echo:"

    assert hooks.kinds() == [
        "TurnStarted",
        "ModelCallStarted",
        "FirstToken",
        "ModelCallEnded",
        "StoreCommitted",
        "TurnEnded",
    ]
    assert hooks.events[3].interrupted
    ended = hooks.ended()
    assert (ended.outcome, ended.error, ended.interrupted) == ("interrupted", None, True)
    assert ended.usage is not None and ended.usage.total_tokens > 0
    assert bot.history("s")[-1].response_metadata["interrupted"]


@pytest.mark.parametrize("mode", MODES)
def test_a_hook_that_raises_breaks_neither_the_turn_nor_its_bookkeeping(
    settings: Settings, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeChatModel(replies=[tool_call_reply(("add", {"a": 1, "b": 2})), "It is 3"])
    raising, after = Raising(), Recorder()
    store = MemoryStore()
    bot = Chatbot(settings, llm=fake, store=store, tools=[add], hooks=[raising, after])

    with caplog.at_level(logging.ERROR, logger="chatchain"):
        assert _turn(bot, mode, "1 + 2?") == "It is 3"

    assert [m.type for m in bot.history("s")] == ["human", "ai", "tool", "ai"]
    assert bot.usage("s").turns == 1 and bot.usage("s").total_tokens > 0
    assert store.usage_entries()[-1].id == after.ended().turn.id
    assert after.ended().outcome == "ok"  # the hook after the one that raised is still told
    assert raising.calls == len(after.events)
    failures = [r for r in caplog.records if "Hook Raising." in r.getMessage()]
    assert len(failures) == raising.calls and all(r.exc_info for r in failures)


def test_a_hook_that_raises_on_a_failed_turn_leaves_the_turns_own_error(
    settings: Settings,
) -> None:
    bot = Chatbot(settings, llm=FakeChatModel(errors=[_server_error()]), hooks=Raising())

    with pytest.raises(ServerError):
        bot.chat("hello", session_id="s")


def test_hooks_given_to_the_chain_are_all_told_and_added_ones_from_the_next_turn(
    settings: Settings,
) -> None:
    one, two, later = Recorder(), Recorder(), Recorder()
    chain = create_chat_chain(FakeChatModel(), settings=settings, hooks=[one, two])
    chain.invoke({"input": "hi"}, config={"configurable": {"session_id": "c"}})
    assert (
        one.kinds()
        == two.kinds()
        == [
            "TurnStarted",
            "ModelCallStarted",
            "ModelCallEnded",
            "StoreCommitted",
            "TurnEnded",
        ]
    )

    bot = Chatbot(settings, llm=FakeChatModel())
    bot.chat("before")
    bot.add_hooks(later)
    bot.add_hooks(later)  # once only
    bot.chat("after")
    assert later.kinds().count("TurnEnded") == 1


def test_something_other_than_turn_hooks_is_refused_with_what_to_do(settings: Settings) -> None:
    with pytest.raises(ConfigurationError, match=r"subclass chatchain\.hooks\.TurnHooks"):
        Chatbot(settings, llm=FakeChatModel(), hooks=[print])  # type: ignore[list-item]


def test_the_turn_without_memory_tells_the_same_hooks(settings: Settings) -> None:
    hooks = Recorder()
    chain = create_chat_chain(FakeChatModel(), settings=settings, hooks=hooks)
    chain.without_memory().invoke(
        {"messages": [HumanMessage("hi")]}, config={"configurable": {"session_id": "bare"}}
    )
    assert hooks.ended().outcome == "ok"
    assert hooks.ended().turn.session_id == "bare"


@pytest.mark.parametrize("mode", MODES)
def test_a_turn_past_its_deadline_ends_with_outcome_deadline(settings: Settings, mode: str) -> None:
    hooks = Recorder()
    slow = FakeChatModel(delay=1.0)
    bot = Chatbot(settings.model_copy(update={"turn_deadline": 0.2}), llm=slow, hooks=hooks)

    with pytest.raises(TurnDeadlineError) as caught:
        _turn(bot, mode)

    ended = hooks.ended()
    assert (ended.outcome, ended.error) == ("deadline", caught.value)
    [call] = [e for e in hooks.events if isinstance(e, ModelCallEnded)]
    assert call.error is not None
    _join_workers()


@pytest.mark.parametrize("mode", MODES)
def test_a_turn_run_while_the_caller_handles_an_exception_still_ends_ok(
    settings: Settings, mode: str
) -> None:
    hooks = Recorder()
    bot = Chatbot(settings, llm=FakeChatModel(), hooks=hooks)

    try:
        raise KeyError("the caller's own")
    except KeyError:
        assert _turn(bot, mode) == "Echo: hello"

    assert (hooks.ended().outcome, hooks.ended().error) == ("ok", None)
