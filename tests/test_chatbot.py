"""The Chatbot facade: Bob's two-turn chat (his name, then asking it back) on every entry point."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
from langchain_core.prompts import ChatPromptTemplate

from chatchain import Chatbot, ConfigurationError, MissingAPIKeyError, Reply, Settings
from chatchain.testing import FakeChatModel


def test_seed_scenario(bot: Chatbot, fake: FakeChatModel) -> None:
    fake.queue("Hello Bob! How can I help?", "Your name is Bob.")
    first = bot.chat("Hi! I'm Bob", session_id="dp123")
    second = bot.chat("What's my name?", session_id="dp123")
    assert isinstance(first, Reply)
    assert second.text == "Your name is Bob." == str(second)
    assert [m.text for m in bot.history("dp123")] == [
        "Hi! I'm Bob",
        "Hello Bob! How can I help?",
        "What's my name?",
        "Your name is Bob.",
    ]
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the history was sent
    assert bot.usage("dp123") == replace(first.usage + second.usage, model=None)


def test_prompt_variables_per_call(bot: Chatbot, fake: FakeChatModel) -> None:
    bot.chat("Bonjour", session_id="fr", language="French")
    assert fake.calls[-1][0].content == "You are a helpful assistant. Answer in French."


def test_stream_yields_text_and_sets_usage_at_the_end(bot: Chatbot) -> None:
    stream = bot.stream("tell me a joke", session_id="s")
    assert stream.usage is None
    pieces = list(stream)
    assert "".join(pieces) == "Echo: tell me a joke" == stream.text
    assert stream.usage is not None and stream.usage.completion_tokens > 0
    assert stream.usage.first_token_s is not None
    assert bot.usage("s").total_tokens == stream.usage.total_tokens
    assert bot.usage("s").first_token_s is None  # a total has no single first token


def test_async_entry_points(bot: Chatbot) -> None:
    async def run() -> tuple[Reply, str, list[Reply]]:
        reply = await bot.achat("async hello", session_id="a")
        streamed = "".join([p async for p in bot.astream("async stream", session_id="a")])
        many = await bot.achat_many([("x", "one"), ("y", "two"), ("x", "three")])
        return reply, streamed, many

    reply, streamed, many = asyncio.run(run())
    assert reply.text == "Echo: async hello"
    assert streamed == "Echo: async stream"
    assert [r.text for r in many] == ["Echo: one", "Echo: two", "Echo: three"]
    assert [r.session_id for r in many] == ["x", "y", "x"]
    assert len(bot.history("x")) == 4
    assert bot.usage().turns == 5


def test_sessions_delete_and_usage(bot: Chatbot) -> None:
    bot.chat("one", session_id="a")
    bot.chat("two", session_id="b")
    assert sorted(bot.sessions()) == ["a", "b"]
    total = bot.usage()
    assert total.turns == 2
    assert total.cost_usd is not None and total.cost_usd > 0
    bot.delete("a")
    assert bot.sessions() == ["b"]
    assert bot.history("a") == []
    assert bot.usage("a").turns == 1  # deleting forgets the words, not the spending
    assert bot.usage().turns == 2


def test_two_bots_do_not_share_sessions(settings: Settings) -> None:
    a = Chatbot(settings, llm=FakeChatModel(), system="A")
    b = Chatbot(settings, llm=FakeChatModel(), system="B")
    a.chat("only in a", session_id="s")
    assert b.history("s") == []


def test_sessions_and_usage_need_no_key_until_the_first_turn(
    settings: Settings, fake: FakeChatModel, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'chat.db'}"
    with Chatbot(settings.model_copy(update={"store_url": store}), llm=fake) as writer:
        writer.chat("Hi! I'm Bob", session_id="dp123")
    keyless = Settings(store_url=store)  # no OPENAI_API_KEY and no OPENAI_BASE_URL
    with Chatbot(keyless) as bot:
        assert bot.sessions() == ["dp123"]
        assert [m.text for m in bot.history("dp123")] == ["Hi! I'm Bob", "Echo: Hi! I'm Bob"]
        assert bot.usage("dp123").turns == 1
        assert [row["session"] for row in bot.usage_report(by=["session"]).rows] == ["dp123"]
        exported = bot.export_session("dp123", tmp_path / "dp123.json")
        assert bot.import_session(exported, session_id="copy") == "copy"
        with pytest.raises(MissingAPIKeyError, match="OPENAI_API_KEY"):
            bot.chat("What's my name?", session_id="dp123")
        with pytest.raises(MissingAPIKeyError):
            asyncio.run(bot.achat("What's my name?", session_id="dp123"))
        with pytest.raises(MissingAPIKeyError):
            bot.stream("What's my name?", session_id="dp123")
        assert len(bot.history("dp123")) == 2 and bot.usage().turns == 1


def test_a_bad_template_or_a_chain_as_llm_fails_at_construction(fake: FakeChatModel) -> None:
    with pytest.raises(ConfigurationError):
        Chatbot(Settings(), system="Answer in {language")  # no key needed to say so
    with pytest.raises(ConfigurationError, match="chat model itself"):
        Chatbot(Settings(), llm=ChatPromptTemplate.from_messages([("human", "{input}")]) | fake)
