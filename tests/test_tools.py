"""Tool calling inside a turn, with FakeChatModel scripting the model's tool calls.

The same exchange on every store (one atomic save, under the session lock) is in
tests/stores/test_tool_turns.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.messages.utils import count_tokens_approximately
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import var_child_runnable_config
from langchain_core.tools import StructuredTool, ToolException, tool

from chatchain import (
    Budget,
    BudgetExceeded,
    Chatbot,
    ConfigurationError,
    Settings,
    ToolFinished,
    ToolRun,
    ToolStarted,
    TurnDeadlineError,
    create_chat_chain,
)
from chatchain._tokens import APPROXIMATE
from chatchain._turn import TURN_KEY
from chatchain.testing import FakeChatModel, tool_call_reply

KEY = "sk-tool-secret-0123456789abcdef"


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


async def multiply(a: int, b: int) -> int:
    """Multiply two numbers."""
    await asyncio.sleep(0)
    return a * b


@tool
def explode(reason: str) -> str:
    """Fail on purpose."""
    raise RuntimeError(f"kaboom: {reason}")


def settings(**changes: Any) -> Settings:
    base = Settings(
        api_key=KEY,
        model="gpt-4o-mini",
        window_turns=None,
        window_tokens=None,
        summarize=False,
        lock_timeout=5.0,
    )
    return base.model_copy(update=changes)


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at the end of a test: tools that block wait for it, so no thread outlives it long."""
    event = threading.Event()
    yield event
    event.set()


def bot_with(fake: FakeChatModel, tools: list[Any], **changes: Any) -> Chatbot:
    return Chatbot(settings(**changes), llm=fake, tools=tools)


def shape(messages: list[BaseMessage]) -> list[str]:
    """Each message's type, with an AI message's tool call names and a result's status."""
    out = []
    for m in messages:
        if isinstance(m, AIMessage) and m.tool_calls:
            out.append("ai:" + ",".join(call["name"] for call in m.tool_calls))
        elif isinstance(m, ToolMessage):
            out.append(f"tool:{m.status}")
        else:
            out.append(m.type)
    return out


def answered(messages: list[BaseMessage]) -> bool:
    """Every tool call in ``messages`` has exactly one result, right after its AI message."""
    for i, m in enumerate(messages):
        if isinstance(m, AIMessage) and m.tool_calls:
            ids = [call["id"] for call in m.tool_calls]
            results = messages[i + 1 : i + 1 + len(ids)]
            if sorted(getattr(r, "tool_call_id", "") for r in results) != sorted(ids):
                return False
    return True


def script(*steps: AIMessage | str) -> FakeChatModel:
    return FakeChatModel(model_name="gpt-4o-mini", replies=list(steps))


# -- the loop -------------------------------------------------------------------------------


def test_a_turn_runs_the_tools_and_saves_the_whole_exchange() -> None:
    fake = script(
        tool_call_reply(("add", {"a": 1, "b": 2}), ("multiply", {"a": 3, "b": 4})), "3 and 12"
    )
    bot = bot_with(fake, [add, multiply])
    reply = bot.chat("1+2 and 3*4?", session_id="s")
    assert reply.text == "3 and 12"
    assert [(c.name, c.result, c.status) for c in reply.tool_runs] == [
        ("add", "3", "success"),
        ("multiply", "12", "success"),
    ]
    history = bot.history("s")
    assert shape(history) == ["human", "ai:add,multiply", "tool:success", "tool:success", "ai"]
    assert answered(history)
    # The second call was sent the tool results, answering the first call's ids.
    sent = fake.calls[1]
    assert [m.type for m in sent[-3:]] == ["ai", "tool", "tool"]
    assert [m.content for m in sent[-2:]] == ["3", "12"]


def test_every_call_is_metered_into_one_entry() -> None:
    fake = script(tool_call_reply(("add", {"a": 1, "b": 2})), "3")
    bot = bot_with(fake, [add])
    reply = bot.chat("1+2?", session_id="s")
    # What each call reported: its prompt (tool schemas included) and its reply.
    prompts = [
        count_tokens_approximately(messages, tools=tools or None)
        for messages, tools in zip(fake.calls, fake.tools_of_calls, strict=True)
    ]
    assert fake.tools_of_calls[0] and fake.tools_of_calls[1]  # both calls were sent the tools
    entries = bot.usage_entries(session_id="s")
    assert len(entries) == 1
    assert entries[0].requests == 2
    assert entries[0].prompt_tokens == sum(prompts) == reply.usage.prompt_tokens
    assert reply.usage.successful_requests == 2
    assert reply.usage.cost_usd is not None and reply.usage.cost_usd > 0


def test_a_tool_that_raises_is_reported_and_the_turn_goes_on() -> None:
    fake = script(tool_call_reply(("explode", {"reason": "test"})), "It failed, sorry.")
    bot = bot_with(fake, [explode])
    reply = bot.chat("go", session_id="s")
    assert reply.text == "It failed, sorry."
    (call,) = reply.tool_runs
    assert call.status == "error" and call.error == "RuntimeError: kaboom: test"
    result = fake.calls[1][-1]
    assert isinstance(result, ToolMessage) and result.status == "error"
    assert "kaboom: test" in result.text


def test_unknown_tools_and_invalid_arguments_are_reported_to_the_model() -> None:
    fake = script(
        tool_call_reply(("made_up", {"x": 1}), ("add", {"a": "one"})),
        "ok",
    )
    bot = bot_with(fake, [add])
    reply = bot.chat("go", session_id="s")
    made_up, bad = reply.tool_runs
    assert made_up.status == bad.status == "error"
    assert made_up.error is not None and "no tool named 'made_up'" in made_up.error
    assert "the tools are: add" in made_up.error
    assert bad.error is not None and "arguments for 'add' are not valid" in bad.error
    assert "a:" in bad.error and "b:" in bad.error  # which fields are wrong
    assert shape(bot.history("s")) == ["human", "ai:made_up,add", "tool:error", "tool:error", "ai"]


class _BrokenJson(FakeChatModel):
    """Answers the first call with a call whose arguments are not JSON, as ChatOpenAI reports."""

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        if any(m.type == "tool" for m in messages):
            return super()._generate(messages, *args, **kwargs)
        bad = {"name": "add", "args": "{not json", "id": "call_bad", "error": None}
        message = AIMessage("", invalid_tool_calls=[bad])
        return ChatResult(generations=[ChatGeneration(message=message)])


def test_arguments_that_are_not_json_are_reported() -> None:
    fake = _BrokenJson(replies=["ok"])
    bot = bot_with(fake, [add])
    reply = bot.chat("go", session_id="s")
    (call,) = reply.tool_runs
    assert call.status == "error" and call.id == "call_bad"
    assert call.error is not None and "could not be read (not valid JSON)" in call.error
    history = bot.history("s")
    assert [m.type for m in history] == ["human", "ai", "tool", "ai"]
    assert history[2].tool_call_id == "call_bad"  # type: ignore[attr-defined]


def test_a_slow_tool_is_cancelled_at_the_tool_timeout(release: threading.Event) -> None:
    @tool
    def stuck() -> str:
        """Never returns in time."""
        release.wait(30)
        return "late"

    fake = script(tool_call_reply(("stuck", {}), ("add", {"a": 1, "b": 1})), "gave up")
    bot = bot_with(fake, [stuck, add], tool_timeout=0.2)
    reply = bot.chat("go", session_id="s")
    stuck_call, add_call = reply.tool_runs
    assert stuck_call.status == "error"
    assert stuck_call.error is not None and "did not finish within 0.2 s" in stuck_call.error
    assert "CHATCHAIN_TOOL_TIMEOUT" in stuck_call.error
    assert add_call.result == "2"  # the other call of the step is not held up
    assert answered(bot.history("s"))


async def test_an_async_tool_past_the_timeout_is_cancelled() -> None:
    cancelled = asyncio.Event()

    async def hang() -> str:
        """Hangs."""
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    fake = script(tool_call_reply(("hang", {})), "gave up")
    bot = bot_with(fake, [hang], tool_timeout=0.2)
    reply = await bot.achat("go", session_id="s")
    assert reply.tool_runs[0].status == "error"
    await asyncio.wait_for(cancelled.wait(), 5)


def test_long_results_are_cut_with_a_note() -> None:
    def dump() -> str:
        """A lot of text."""
        return "word " * 5000

    fake = script(tool_call_reply(("dump", {})), "ok")
    bot = bot_with(fake, [dump], tool_result_tokens=50)
    reply = bot.chat("go", session_id="s")
    result = reply.tool_runs[0].result
    assert result.startswith("word word")
    assert "The result was cut" in result and "CHATCHAIN_TOOL_RESULT_TOKENS keeps 50" in result
    body = result.split("\n[The result was cut")[0]
    assert count_tokens_approximately([ToolMessage(body, tool_call_id="")]) <= 50
    assert bot.history("s")[2].content == result  # what the model saw is what is kept


def test_the_round_limit_ends_with_a_call_without_tools_and_a_notice() -> None:
    fake = FakeChatModel(respond=lambda m: tool_call_reply(("add", {"a": 1, "b": 1}), text="more"))
    bot = bot_with(fake, [add], tool_rounds=2)
    reply = bot.chat("loop forever", session_id="s")
    assert len(fake.calls) == 3
    assert [bool(tools) for tools in fake.tools_of_calls] == [True, True, False]
    assert reply.text == "more" and not reply.message.tool_calls  # type: ignore[attr-defined]
    assert any("CHATCHAIN_TOOL_ROUNDS" in notice for notice in reply.notices)
    assert shape(bot.history("s")) == ["human", "ai:add", "tool:success"] * 1 + [
        "ai:add",
        "tool:success",
        "ai",
    ]


def test_the_calls_of_one_step_run_at_once(release: threading.Event) -> None:
    both = threading.Barrier(2, timeout=10)

    def left() -> str:
        """Waits for right."""
        both.wait()
        return "left"

    def right() -> str:
        """Waits for left."""
        both.wait()
        return "right"

    fake = script(tool_call_reply(("left", {}), ("right", {})), "both")
    reply = bot_with(fake, [left, right]).chat("go", session_id="s")
    assert [c.result for c in reply.tool_runs] == ["left", "right"]  # neither broke the barrier


async def test_async_turns_run_async_tools_together_and_sync_ones_in_threads() -> None:
    loop_thread = threading.get_ident()
    seen: dict[str, int] = {}
    first, second = asyncio.Event(), asyncio.Event()

    async def ping() -> str:
        """Waits for pong."""
        first.set()
        await asyncio.wait_for(second.wait(), 10)
        return "ping"

    async def pong() -> str:
        """Waits for ping."""
        await asyncio.wait_for(first.wait(), 10)
        second.set()
        return "pong"

    def where() -> str:
        """Says which thread it runs in."""
        seen["where"] = threading.get_ident()
        return "here"

    fake = script(tool_call_reply(("ping", {}), ("pong", {}), ("where", {})), "done")
    reply = await bot_with(fake, [ping, pong, where]).achat("go", session_id="s")
    assert [c.result for c in reply.tool_runs] == ["ping", "pong", "here"]
    assert seen["where"] != loop_thread


def test_async_tools_work_in_sync_turns() -> None:
    fake = script(tool_call_reply(("multiply", {"a": 6, "b": 7})), "42")
    reply = bot_with(fake, [multiply]).chat("6*7", session_id="s")
    assert reply.tool_runs[0].result == "42"


def test_tools_never_see_the_turn_the_settings_or_the_key() -> None:
    seen: dict[str, Any] = {}

    @tool
    def spy(config: RunnableConfig) -> str:
        """Looks at what it was given."""
        seen["config"] = config
        seen["context"] = var_child_runnable_config.get()
        return "looked"

    fake = script(tool_call_reply(("spy", {})), "ok")
    bot = bot_with(fake, [spy])
    bot.chat("go", session_id="s", user_id="ann")
    config = seen["config"]
    assert config["configurable"] == {"session_id": "s", "user_id": "ann"}
    assert TURN_KEY not in json.dumps(config, default=repr)
    assert KEY not in json.dumps(config, default=repr)
    assert not config.get("callbacks")
    context = seen["context"] or {}
    assert TURN_KEY not in context.get("configurable", {})  # not through the context either


def test_a_turn_that_fails_after_a_tool_round_keeps_it_and_records_what_was_billed() -> None:
    def respond(messages: list[BaseMessage]) -> str:
        raise ConnectionError("the endpoint went away")

    fake = FakeChatModel(
        model_name="gpt-4o-mini",
        replies=[tool_call_reply(("add", {"a": 1, "b": 2}))],
        respond=respond,
    )
    bot = bot_with(fake, [add])
    with pytest.raises(ConnectionError):
        bot.chat("go", session_id="s")
    # As a stream keeps it: the tool ran, so a retry must see that it did (not run it again).
    history = bot.history("s")
    assert shape(history) == ["human", "ai:add", "tool:success", "ai"]
    assert history[-1].response_metadata["interrupted"] is True
    (entry,) = bot.usage_entries(session_id="s")  # the first call was billed
    assert entry.requests == 1 and entry.prompt_tokens > 0


def test_a_failed_turn_without_tool_rounds_records_nothing() -> None:
    fake = FakeChatModel(errors=[ConnectionError("down")])
    bot = bot_with(fake, [add])
    with pytest.raises(ConnectionError):
        bot.chat("go", session_id="s")
    assert bot.history("s") == [] and bot.usage_entries() == []


def test_the_deadline_covers_the_tools(release: threading.Event) -> None:
    def slow() -> str:
        """Takes long."""
        release.wait(30)
        return "late"

    fake = script(tool_call_reply(("slow", {})), "never")
    bot = bot_with(fake, [slow], turn_deadline=0.3, tool_timeout=30)
    with pytest.raises(TurnDeadlineError):
        bot.chat("go", session_id="s")
    history = bot.history("s")  # the tool call is kept, its result says it did not finish
    assert shape(history) == ["human", "ai:slow", "tool:error", "ai"], [m.content for m in history]
    assert history[-1].response_metadata["interrupted"] is True


async def test_the_deadline_covers_async_tools() -> None:
    async def slow() -> str:
        """Takes long."""
        await asyncio.sleep(60)
        return "late"

    fake = script(tool_call_reply(("slow", {})), "never")
    bot = bot_with(fake, [slow], turn_deadline=0.3, tool_timeout=30)
    with pytest.raises(TurnDeadlineError):
        await bot.achat("go", session_id="s")
    history = bot.history("s")  # the tool call is kept, its result says it did not finish
    assert shape(history) == ["human", "ai:slow", "tool:error", "ai"], [m.content for m in history]
    assert history[-1].response_metadata["interrupted"] is True


# -- budgets: each call held before it is sent -----------------------------------------------


class _Holds:
    """Records each hold a ledger takes (tokens), around the real one."""

    def __init__(self, bot: Chatbot) -> None:
        self.tokens: list[int] = []
        ledger = bot.ledger
        real = ledger.hold

        def hold(hold: Any, limits: Any) -> Any:
            self.tokens.append(hold.tokens)
            return real(hold, limits)

        ledger.hold = hold  # type: ignore[method-assign]


def test_each_call_is_held_covering_the_calls_before_it() -> None:
    fake = script(tool_call_reply(("add", {"a": 1, "b": 2})), "3")
    bot = Chatbot(
        settings(max_tokens=100), llm=fake, tools=[add], budget=Budget(total_tokens=10**6)
    )
    holds = _Holds(bot)
    reply = bot.chat("1+2?", session_id="s")
    assert len(holds.tokens) == 2
    schemas = APPROXIMATE.count_tools(fake.tools_of_calls[0])
    assert schemas > 0
    assert holds.tokens[0] == count_tokens_approximately(fake.calls[0]) + schemas + 100
    # The second hold covers the first call's tokens, its own prompt and its reply cap.
    assert holds.tokens[1] >= holds.tokens[0] + 100
    assert bot.ledger.total().total_tokens == reply.usage.total_tokens


def test_a_budget_that_cannot_pay_the_next_call_stops_the_turn() -> None:
    probe = script(tool_call_reply(("add", {"a": 1, "b": 2})), "3")
    Chatbot(settings(max_tokens=60), llm=probe, tools=[add]).chat("1+2?", session_id="s")
    first = count_tokens_approximately(probe.calls[0], tools=probe.tools_of_calls[0])
    budget = Budget(total_tokens=first + 60)  # pays the first call, not the second too
    fake = script(tool_call_reply(("add", {"a": 1, "b": 2})), "3")
    bot = Chatbot(settings(max_tokens=60), llm=fake, tools=[add], budget=budget)
    with pytest.raises(BudgetExceeded):
        bot.chat("1+2?", session_id="s")
    assert len(fake.calls) == 1  # the second call was never sent
    history = bot.history("s")  # the round that ran is kept, the reply marked interrupted
    assert shape(history) == ["human", "ai:add", "tool:success", "ai"]
    assert history[-1].response_metadata["interrupted"] is True
    spent = bot.ledger.total()
    assert spent.successful_requests == 1  # what the first call cost is on the ledger
    assert budget.total_tokens is not None and spent.total_tokens <= budget.total_tokens


# -- streams and events ----------------------------------------------------------------------


def test_stream_events_come_in_order_with_the_text() -> None:
    fake = script(tool_call_reply(("add", {"a": 1, "b": 2}), text="Let me add."), "It is 3.")
    bot = bot_with(fake, [add])
    stream = bot.stream("1+2?", session_id="s")
    events = list(stream.events())
    kinds = [e if isinstance(e, str) else type(e).__name__ for e in events]
    assert kinds == [
        "Let",
        " ",
        "me",
        " ",
        "add.",
        "ToolStarted",
        "ToolFinished",
        "It",
        " ",
        "is",
        " ",
        "3.",
    ]
    started, finished = events[5], events[6]
    assert isinstance(started, ToolStarted) and started.args == {"a": 1, "b": 2}
    assert isinstance(finished, ToolFinished) and finished.call.id == started.id
    assert stream.tool_runs == (finished.call,)
    assert shape(bot.history("s")) == ["human", "ai:add", "tool:success", "ai"]
    assert bot.history("s")[1].content == "Let me add."
    assert bot.history("s")[3].content == "It is 3."


def test_plain_iteration_yields_text_only_and_on_tool_gets_the_events() -> None:
    fake = script(tool_call_reply(("add", {"a": 1, "b": 2})), "three")
    seen: list[Any] = []
    bot = bot_with(fake, [add])
    assert "".join(bot.stream("go", session_id="s", on_tool=seen.append)) == "three"
    assert [type(e) for e in seen] == [ToolStarted, ToolFinished]


def test_chat_and_achat_call_on_tool() -> None:
    seen: list[Any] = []
    fake = script(
        tool_call_reply(("add", {"a": 1, "b": 2})),
        "3",
        tool_call_reply(("add", {"a": 1, "b": 2})),
        "3",
    )
    bot = bot_with(fake, [add])
    bot.chat("go", session_id="s", on_tool=seen.append)
    asyncio.run(bot.achat("go", session_id="t", on_tool=seen.append))
    assert [type(e) for e in seen] == [ToolStarted, ToolFinished] * 2


async def test_astream_events_and_the_saved_exchange() -> None:
    fake = script(tool_call_reply(("add", {"a": 1, "b": 2}), ("add", {"a": 2, "b": 2})), "3 and 4")
    bot = bot_with(fake, [add])
    stream = bot.astream("go", session_id="s")
    events = [e async for e in stream.events()]
    assert [type(e).__name__ for e in events if not isinstance(e, str)] == [
        "ToolStarted",
        "ToolStarted",
        "ToolFinished",
        "ToolFinished",
    ]
    assert "".join(e for e in events if isinstance(e, str)) == "3 and 4"
    assert shape(await bot.store.aload("s")) == [
        "human",
        "ai:add,add",
        "tool:success",
        "tool:success",
        "ai",
    ]
    assert stream.usage is not None and stream.usage.successful_requests == 2


def test_a_stream_stopped_while_tools_run_answers_every_call(release: threading.Event) -> None:
    def slow() -> str:
        """Takes long."""
        release.wait(30)
        return "late"

    fake = script(tool_call_reply(("add", {"a": 1, "b": 2}), ("slow", {})), "never")
    bot = bot_with(fake, [add, slow])
    with bot.stream("go", session_id="s") as stream:
        for event in stream.events():
            if isinstance(event, ToolFinished):  # add ended; slow still runs
                break
    history = bot.history("s")
    assert shape(history) == ["human", "ai:add,slow", "tool:success", "tool:error", "ai"]
    assert answered(history)
    assert "stopped before this tool finished" in str(history[3].content)
    assert history[-1].response_metadata["interrupted"] is True
    assert bot.usage_entries(session_id="s")[0].requests == 1


def test_a_stream_stopped_in_the_final_answer_keeps_the_exchange() -> None:
    fake = script(tool_call_reply(("add", {"a": 1, "b": 2})), "the answer is three")
    bot = bot_with(fake, [add])
    with bot.stream("go", session_id="s") as stream:
        for piece in stream:
            if piece == "answer":
                break
    history = bot.history("s")
    assert shape(history) == ["human", "ai:add", "tool:success", "ai"]
    assert history[-1].content == "the answer"
    assert history[-1].response_metadata["interrupted"] is True


def test_a_stream_that_fails_after_tool_rounds_keeps_them_marked_interrupted() -> None:
    def respond(messages: list[BaseMessage]) -> str:
        raise ConnectionError("the endpoint went away")

    fake = FakeChatModel(replies=[tool_call_reply(("add", {"a": 1, "b": 2}))], respond=respond)
    bot = bot_with(fake, [add])
    with pytest.raises(ConnectionError):
        "".join(bot.stream("go", session_id="s"))
    history = bot.history("s")
    assert shape(history) == ["human", "ai:add", "tool:success", "ai"]
    assert history[-1].response_metadata["interrupted"] is True


# -- the chain and its configuration ---------------------------------------------------------


def test_create_chat_chain_takes_tools() -> None:
    fake = script(tool_call_reply(("add", {"a": 2, "b": 3})), "5")
    chain = create_chat_chain(fake, settings=settings(), tools=[add])
    reply = chain.invoke({"input": "2+3"}, config={"configurable": {"session_id": "c"}})
    assert reply.content == "5"
    assert [t.name for t in chain.tools] == ["add"]
    assert chain.model is fake
    assert (
        "".join(
            str(c.content)
            for c in chain.stream({"input": "hi"}, config={"configurable": {"session_id": "d"}})
        )
        == "Echo: hi"
    )  # chain.stream yields message chunks only


def test_without_tools_nothing_is_bound() -> None:
    fake = FakeChatModel()
    Chatbot(settings(), llm=fake).chat("hi")
    assert fake.tools_of_calls == [[]]


def test_a_function_without_a_docstring_is_refused() -> None:
    def nodoc(a: int) -> int:
        return a

    with pytest.raises(ConfigurationError, match="docstring"):
        Chatbot(settings(), llm=FakeChatModel(), tools=[nodoc])


def test_two_tools_of_one_name_are_refused() -> None:
    @tool("add")
    def other(a: int) -> int:
        """Another add."""
        return a

    with pytest.raises(ConfigurationError, match="Two tools are named 'add'"):
        Chatbot(settings(), llm=FakeChatModel(), tools=[add, other])


def test_a_model_that_cannot_call_tools_is_refused() -> None:
    model = GenericFakeChatModel(messages=iter(["hi"]))
    with pytest.raises(ConfigurationError, match="cannot call tools"):
        Chatbot(settings(), llm=model, tools=[add])


def test_tool_call_records_are_frozen() -> None:
    call = ToolRun("id", "add", {"a": 1}, "2")
    with pytest.raises(AttributeError):
        call.result = "3"  # type: ignore[misc]
    assert call.status == "success" and call.error is None


def test_a_tool_that_handles_its_own_errors_is_reported_as_an_error() -> None:
    def careful(x: int) -> str:
        """Raises a ToolException, which LangChain turns into the result."""
        raise ToolException(f"cannot do {x}")

    handled = StructuredTool.from_function(careful, handle_tool_error=True)
    fake = script(tool_call_reply(("careful", {"x": 7})), "ok")
    reply = bot_with(fake, [handled]).chat("go", session_id="s")
    (call,) = reply.tool_runs
    assert call.status == "error" and call.error == "cannot do 7"


async def test_an_async_stream_stopped_while_tools_run_cancels_them_and_answers_every_call() -> (
    None
):
    cancelled = asyncio.Event()

    async def hang() -> str:
        """Hangs."""
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    fake = script(tool_call_reply(("add", {"a": 1, "b": 2}), ("hang", {})), "never")
    bot = bot_with(fake, [add, hang])
    stream = bot.astream("go", session_id="s")
    async for event in stream.events():
        if isinstance(event, ToolFinished):  # add ended; hang still runs
            break
    await stream.aclose()
    await asyncio.wait_for(cancelled.wait(), 5)
    history = await bot.store.aload("s")
    assert shape(history) == ["human", "ai:add,hang", "tool:success", "tool:error", "ai"]
    assert answered(history)
    assert history[-1].response_metadata["interrupted"] is True


class _Stubborn(FakeChatModel):
    """Asks for a tool on every call, even one sent without tools (as a bad endpoint may)."""

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        super()._generate(messages, *args, **kwargs)  # recorded, like every call
        message = tool_call_reply(("add", {"a": 1, "b": 1}), text="still asking")
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self, messages: list[BaseMessage], *args: Any, **kwargs: Any
    ) -> Iterator[ChatGenerationChunk]:
        (call,) = self._generate(messages, *args, **kwargs).generations[0].message.tool_calls
        piece = tool_call_chunk(name="add", args=json.dumps(call["args"]), id=call["id"], index=0)
        yield ChatGenerationChunk(
            message=AIMessageChunk(content="still asking", tool_call_chunks=[piece])
        )


@pytest.mark.parametrize("mode", ["sync", "stream"])
def test_tool_calls_in_the_last_call_are_dropped_never_left_unanswered(mode: str) -> None:
    fake = _Stubborn()
    bot = bot_with(fake, [add], tool_rounds=1)
    if mode == "sync":
        bot.chat("go", session_id="s")
    else:
        "".join(bot.stream("go", session_id="s"))
    history = bot.history("s")
    assert shape(history) == ["human", "ai:add", "tool:success", "ai"]
    assert history[-1].content == "still asking"
    assert answered(history)


async def test_async_turns_report_raises_unknown_names_and_bad_arguments() -> None:
    fake = script(
        tool_call_reply(
            ("explode", {"reason": "async"}), ("made_up", {}), ("add", {"a": "x", "b": 1})
        ),
        "ok",
    )
    reply = await bot_with(fake, [add, explode]).achat("go", session_id="s")
    raised, made_up, bad = reply.tool_runs
    assert raised.error == "RuntimeError: kaboom: async"
    assert made_up.error is not None and "no tool named 'made_up'" in made_up.error
    assert bad.error is not None and "arguments for 'add' are not valid (a:" in bad.error
    assert {call.status for call in reply.tool_runs} == {"error"}


@pytest.mark.parametrize("window", [{"window_turns": 1}, {"window_tokens": 120}])
def test_windows_over_saved_tool_turns_send_whole_exchanges(window: dict[str, int]) -> None:
    def respond(messages: list[BaseMessage]) -> str | AIMessage:
        if isinstance(messages[-1], ToolMessage):
            return f"The sum is {messages[-1].text}."
        return tool_call_reply(("add", {"a": 20, "b": 22}), ("add", {"a": 1, "b": 1}))

    fake = FakeChatModel(respond=respond)
    bot = Chatbot(settings(**window), llm=fake, tools=[add])
    for n in range(4):
        bot.chat(f"question {n}", session_id="s")
    for sent in fake.calls:
        history = [m for m in sent if m.type != "system"]
        assert history[0].type == "human"  # never opens on a result or a call
        assert answered(history)
        results = [m for m in history if isinstance(m, ToolMessage)]
        calls = {c["id"] for m in history if isinstance(m, AIMessage) for c in m.tool_calls}
        assert {r.tool_call_id for r in results} <= calls  # no result without its call
