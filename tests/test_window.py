"""Bounded prompts: windows by turns and tokens, running summaries, tighter retries."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage

from chatchain import (
    Chatbot,
    ConfigurationError,
    InvalidInputError,
    MemoryStore,
    Settings,
    create_chat_chain,
)
from chatchain._tokens import choose_counter
from chatchain.stores import Summary
from chatchain.testing import FakeChatModel
from chatchain.window import (
    SUMMARY_HEADER,
    SUMMARY_REQUEST_MARK,
    HistoryWindow,
    halved,
    summary_message,
)
from tests.entry_points import each_library_way, turn


def make_settings(**values: Any) -> Settings:
    return Settings(api_key="sk-test", model="gpt-4o-mini", **values)


class Summarizing:
    """A reply function: numbered summaries for summary requests, echoes otherwise."""

    def __init__(self) -> None:
        self.requests: list[str] = []

    def __call__(self, messages: list[BaseMessage]) -> str:
        last = messages[-1].text
        if last.startswith(SUMMARY_REQUEST_MARK):
            self.requests.append(last)
            return f"summary #{len(self.requests)}"
        return f"Echo: {last}"


def sent(fake: FakeChatModel, index: int = -1) -> list[str]:
    """What the model was sent on a (non-summary) call, as 'type:text'."""
    calls = [c for c in fake.calls if not c[-1].text.startswith(SUMMARY_REQUEST_MARK)]
    return [f"{m.type}:{m.text}" for m in calls[index]]


def test_window_by_turns_sends_the_last_k_exchanges_and_keeps_everything() -> None:
    fake = FakeChatModel()
    bot = Chatbot(
        make_settings(window_turns=2, window_tokens=None, summarize=False),
        llm=fake,
        system="Be brief.",
    )
    for i in range(5):
        bot.chat(f"q{i}", session_id="s")
    assert sent(fake) == [
        "system:Be brief.",
        "human:q2",
        "ai:Echo: q2",
        "human:q3",
        "ai:Echo: q3",
        "human:q4",
    ]
    assert len(bot.history("s")) == 10  # the full transcript stays in storage


def test_window_by_tokens_drops_the_oldest_and_starts_on_a_question() -> None:
    fake = FakeChatModel()
    window = HistoryWindow(max_turns=None, max_tokens=60, summarize=False)
    chain = create_chat_chain(
        fake, settings=make_settings(), system="S", get_session_history=MemoryStore(), window=window
    )
    config = {"configurable": {"session_id": "s"}}
    for i in range(8):
        chain.invoke({"input": f"question number {i} " + "pad " * 5}, config=config)
    history = fake.calls[-1][1:-1]
    counter = choose_counter(fake)
    assert counter.name == "approximate"
    assert history[0].type == "human"
    assert counter(history + fake.calls[-1][-1:]) <= 60
    assert 0 < len(history) < 14
    assert history[-1].text == "Echo: question number 6 " + "pad " * 5


def test_an_input_alone_over_the_budget_is_refused_before_sending() -> None:
    fake = FakeChatModel()
    bot = Chatbot(
        make_settings(window_turns=4, window_tokens=50, summarize=False), llm=fake, system="S"
    )
    bot.chat("hello", session_id="s")
    with pytest.raises(
        InvalidInputError, match=r"limit for one turn is 50 \(CHATCHAIN_WINDOW_TOKENS\)"
    ):
        bot.chat("word " * 200, session_id="s")
    assert len(fake.calls) == 1
    assert len(bot.history("s")) == 2


def test_a_window_never_starts_on_an_orphan_reply() -> None:
    store = MemoryStore()
    store.append(
        "s",
        [
            AIMessage("orphan reply"),
            HumanMessage("q1"),
            AIMessage("a1"),
            AIMessage("second orphan"),
            HumanMessage("q2"),
            AIMessage("a2"),
        ],
    )
    fake = FakeChatModel()
    chain = create_chat_chain(
        fake,
        settings=make_settings(),
        system="S",
        get_session_history=store,
        window=HistoryWindow(max_turns=2, max_tokens=None, summarize=False),
    )
    chain.invoke({"input": "q3"}, config={"configurable": {"session_id": "s"}})
    assert [m.text for m in fake.calls[-1]] == ["S", "q2", "a2", "q3"]


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.loaded: list[int] = []

    def load(self, session_id: str, start: int = 0, stop: int | None = None) -> list[BaseMessage]:
        messages = super().load(session_id, start, stop)
        self.loaded.append(len(messages))
        return messages


def test_a_turn_reads_only_the_window_from_the_store() -> None:
    store = CountingStore()
    store.append(
        "s", [HumanMessage(f"m{i}") if i % 2 == 0 else AIMessage(f"m{i}") for i in range(1000)]
    )
    bot = Chatbot(
        make_settings(window_turns=3, window_tokens=None, summarize=False),
        store=store,
        llm=FakeChatModel(),
        system="S",
    )
    bot.chat("next", session_id="s")
    assert store.loaded == [6]


def test_running_summary_is_incremental_metered_and_stored() -> None:
    replies = Summarizing()
    fake = FakeChatModel(respond=replies, model_name="gpt-4o-mini")
    bot = Chatbot(
        make_settings(window_turns=2, window_tokens=None, summarize=True), llm=fake, system="S"
    )
    # window 4 messages + batch 2: a summary is due once more than 6 messages are unsummarised.
    for i in range(12):
        bot.chat(f"turn {i}", session_id="s")
    assert len(replies.requests) >= 2
    first, second = replies.requests[0], replies.requests[1]
    assert "Existing summary:\n(none yet)" in first
    assert "turn 0" in first
    assert "Existing summary:\nsummary #1" in second  # incremental: builds on the last one
    assert "turn 0" not in second  # ...and does not start over
    assert bot.summary("s") == f"summary #{len(replies.requests)}"
    prompt = sent(fake)
    assert prompt[0] == "system:S"
    assert prompt[1] == f"system:{SUMMARY_HEADER}summary #{len(replies.requests)}"
    assert prompt[-1] == "human:turn 11"
    assert len(prompt) - 3 <= 4 + 2
    assert len(bot.history("s")) == 24
    usage = bot.usage("s")
    assert usage.summaries == len(replies.requests)
    assert usage.turns == 12
    assert usage.successful_requests == 12 + len(replies.requests)


def test_async_turns_summarise_too() -> None:
    replies = Summarizing()
    bot = Chatbot(
        make_settings(window_turns=1, window_tokens=None),
        llm=FakeChatModel(respond=replies),
        system="S",
    )

    async def run() -> None:
        for i in range(6):
            await bot.achat(f"turn {i}", session_id="s")
        [p async for p in bot.astream("streamed", session_id="s")]

    asyncio.run(run())
    assert replies.requests
    assert bot.summary("s") is not None
    assert bot.usage("s").summaries == len(replies.requests)


def test_a_failed_summary_does_not_fail_the_turn() -> None:
    def respond(messages: list[BaseMessage]) -> str:
        if messages[-1].text.startswith(SUMMARY_REQUEST_MARK):
            raise openai.InternalServerError(
                "down",
                response=httpx.Response(500, request=httpx.Request("POST", "http://x")),
                body=None,
            )
        return "ok"

    bot = Chatbot(
        make_settings(window_turns=1, window_tokens=None),
        llm=FakeChatModel(respond=respond),
        system="S",
    )
    replies = [bot.chat(f"turn {i}", session_id="s") for i in range(5)]
    assert all(r.text == "ok" for r in replies)
    assert any("summary could not be updated" in n for r in replies for n in r.notices)
    assert bot.summary("s") is None
    assert len(bot.history("s")) == 10


def context_error() -> openai.BadRequestError:
    return openai.BadRequestError(
        "context too long",
        response=httpx.Response(400, request=httpx.Request("POST", "http://x")),
        body={"message": "maximum context length exceeded", "code": "context_length_exceeded"},
    )


@each_library_way()
def test_context_exceeded_is_retried_with_half_of_what_was_sent(mode: str) -> None:
    fake = FakeChatModel()
    bot = Chatbot(
        make_settings(window_turns=4, window_tokens=None, summarize=False), llm=fake, system="S"
    )
    for i in range(4):
        bot.chat(f"q{i}", session_id="s")
    fake._errors.append(context_error())
    done = turn(bot, mode, "last")
    text, notices = done.text, done.notices
    assert text == "Echo: last"
    assert len(notices) == 1
    assert "retried with the newest 4 of the 8 earlier messages sent" in notices[0]
    first_try, retry = fake.calls[-2], fake.calls[-1]
    assert len(first_try) == 1 + 8 + 1
    assert len(retry) == 1 + 4 + 1
    assert len(bot.history("s")) == 10  # saved once


def test_token_counter_choice_is_visible_and_offline() -> None:
    chain = create_chat_chain(settings=make_settings(), get_session_history=MemoryStore())
    assert chain.token_counter == "o200k_base"  # gpt-4o-mini's encoding, with no network
    local = make_settings().model_copy(update={"model": "qwen2.5:7b"})  # tokenizer unknown
    assert create_chat_chain(settings=local).token_counter == "utf8-bytes"
    bound = make_settings(token_counter="utf8-bytes")
    assert create_chat_chain(settings=bound).token_counter == "utf8-bytes"
    for exact in ("exact", "tiktoken"):  # tiktoken: 0.1.0's name
        with pytest.raises(ConfigurationError, match="CHATCHAIN_TOKEN_COUNTER=auto"):
            create_chat_chain(settings=local.model_copy(update={"token_counter": exact}))


def test_defaults_keep_a_long_conversation_bounded() -> None:
    fake = FakeChatModel(respond=Summarizing())
    bot = Chatbot(make_settings(), llm=fake, system="S")  # the default window and summary
    for i in range(60):
        bot.chat(f"turn {i} " + "words " * 20, session_id="s")
    sizes = [len(call) for call in fake.calls if not call[-1].text.startswith(SUMMARY_REQUEST_MARK)]
    assert max(sizes) <= 1 + 1 + 2 * 6 + 6 + 1  # system, summary, window + batch, input
    assert len(bot.history("s")) == 120


def test_plain_callable_history_is_windowed_without_summary() -> None:
    histories: dict[str, Any] = {}

    def get_history(session_id: str) -> Any:
        return histories.setdefault(session_id, MemoryStore()(session_id))

    fake = FakeChatModel()
    chain = create_chat_chain(
        fake,
        settings=make_settings(window_turns=1, window_tokens=None),
        get_session_history=get_history,
    )
    for i in range(3):
        chain.invoke({"input": f"q{i}"}, config={"configurable": {"session_id": "s"}})
    assert [m.text for m in fake.calls[-1][1:]] == ["q1", "Echo: q1", "q2"]
    assert len(histories["s"].messages) == 6


def test_a_huge_unsummarised_backlog_is_summarised_from_a_bounded_slice() -> None:
    store = CountingStore()
    store.append(
        "s", [HumanMessage(f"m{i}") if i % 2 == 0 else AIMessage(f"m{i}") for i in range(2000)]
    )
    replies = Summarizing()
    bot = Chatbot(
        make_settings(window_turns=2, window_tokens=None),
        store=store,
        llm=FakeChatModel(respond=replies),
        system="S",
    )
    bot.chat("next", session_id="s")
    assert len(replies.requests) == 1
    assert max(store.loaded) <= 4 * 4 + 4 + 2  # never the whole session
    assert "m1995" in replies.requests[0]
    assert "m10 " not in replies.requests[0]
    summary = store.get_summary("s")
    assert summary is not None
    assert summary.covers == 2000 - 4


def summary_calls(fake: FakeChatModel) -> list[list[BaseMessage]]:
    return [c for c in fake.calls if c[-1].text.startswith(SUMMARY_REQUEST_MARK)]


def turn_calls(fake: FakeChatModel) -> list[list[BaseMessage]]:
    return [c for c in fake.calls if not c[-1].text.startswith(SUMMARY_REQUEST_MARK)]


@pytest.mark.parametrize("mode", ["chat", "achat"])
def test_a_verbose_summarizer_cannot_grow_the_summary_or_the_prompt(mode: str) -> None:
    # The echo answers a summary request with the whole request: the old summary plus the
    # new lines, so unbounded it grows every time (issue 10: ~116,000 characters in 200 turns).
    fake = FakeChatModel()
    bot = Chatbot(make_settings(), llm=fake, system="S")  # the defaults: 6 turns, 3000 + 500
    window = bot.chain.window
    assert window is not None and window.summary_tokens == 500
    counter = choose_counter(fake)

    async def achat_all() -> None:
        for i in range(120):
            await bot.achat(f"turn {i} " + "words " * 30, session_id="s")

    if mode == "chat":
        for i in range(120):
            bot.chat(f"turn {i} " + "words " * 30, session_id="s")
    else:
        asyncio.run(achat_all())
    summary = bot.summary("s")
    assert summary is not None and summary.startswith("Echo: ")
    assert counter([summary_message(summary)]) <= 500
    assert len(summary_calls(fake)) > 20
    limit = window.prompt_limit(counter([fake.calls[0][0]]))
    assert limit == counter([fake.calls[0][0]]) + 500 + 3000
    assert max(counter(call) for call in turn_calls(fake)) <= limit
    # The summary requests stay bounded too: instructions, a summary in budget, a batch of lines.
    assert max(counter(call) for call in summary_calls(fake)[2:]) < 1500
    assert len(bot.history("s")) == 240


def test_the_summary_call_is_capped_and_a_cut_sentence_is_dropped() -> None:
    fake = FakeChatModel(respond=lambda messages: "Bob likes tea. " * 400)
    bot = Chatbot(
        make_settings(window_turns=1, window_tokens=None, summary_max_tokens=20),
        llm=fake,
        system="S",
    )
    for i in range(4):
        bot.chat(f"turn {i}", session_id="s")
    # 4 * 20 characters arrived ("finish_reason": "length"); the half sentence is gone.
    assert bot.summary("s") == "Bob likes tea. " * 4 + "Bob likes tea."
    assert bot.usage("s").summaries >= 1


def test_a_stored_summary_over_budget_is_cut_at_a_sentence_where_it_is_sent() -> None:
    store = MemoryStore()
    store.append("s", [HumanMessage("q0"), AIMessage("a0")])
    store.set_summary("s", Summary("Ann lives in Oslo. " * 2000, covers=0))  # kept from before
    fake = FakeChatModel(respond=Summarizing())
    bot = Chatbot(
        make_settings(window_turns=1, window_tokens=None, summary_tokens=100),
        store=store,
        llm=fake,
        system="S",
    )
    counter = choose_counter(fake)
    bot.chat("q1", session_id="s")
    (head,) = [m for m in fake.calls[-1] if m.text.startswith(SUMMARY_HEADER)]
    assert head.text.endswith("Ann lives in Oslo.")
    assert 90 < counter([head]) <= 100
    for text in ("q2", "q3"):  # then a summary is due: it starts from the cut summary
        bot.chat(text, session_id="s")
    (request,) = summary_calls(fake)
    assert request[-1].text.count("Ann lives in Oslo.") == head.text.count("Ann lives in Oslo.")
    assert "at most 40 words" in request[0].text


def test_a_context_retry_halves_what_was_sent_and_drops_the_summary_last() -> None:
    call = {"name": "weather", "args": {}, "id": "c1"}
    summary = summary_message("Ann lives in Oslo.")
    turns = [
        HumanMessage("q1"),
        AIMessage("a1"),
        HumanMessage("q2"),
        AIMessage("", tool_calls=[call]),
    ]
    turns += [ToolMessage("sunny", tool_call_id="c1"), AIMessage("a2"), HumanMessage("q3")]
    turns += [AIMessage("a3")]
    # 8 messages: the newest 4 start inside the tool exchange, which goes whole or not at all.
    assert [m.text for m in halved([summary, *turns])] == [summary.text, "q3", "a3"]
    assert halved([summary, HumanMessage("q3")]) == [summary]
    assert halved([summary]) == []
    assert halved([]) is None
    assert HistoryWindow(summary_tokens=None).prompt_limit(10) is None
    assert HistoryWindow(summarize=False, summary_tokens=None).prompt_limit(10) == 3010
    with pytest.raises(ConfigurationError, match="summary_tokens"):
        HistoryWindow(summary_tokens=0)
