"""The response cache (``CHATCHAIN_CACHE``) on every store: a hit sends nothing, costs 0, is
recorded as a cached turn with what it saved, and is saved to the history like any turn.

The cache backends (memory, SQLite, Redis) each run the same scenario on the memory store;
every store runs it with the memory cache. Sync, streamed and async turns alike.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from langchain_core.messages import AIMessage, BaseMessage

from chatchain import Budget, Chatbot, ConfigurationError, Settings
from chatchain.budgets import BudgetHold, BudgetLimit
from chatchain.stores import HistoryStore, MemoryStore
from chatchain.testing import FakeChatModel, tool_call_reply
from tests.entry_points import LIBRARY, asker, each_library_way

Ask = Callable[..., str]


_chat, _stream, _achat, _astream = (asker(way) for way in LIBRARY)


def settings(cache: str, **overrides: object) -> Settings:
    return Settings.load(
        env_file=None,
        api_key="sk-test",
        model="gpt-4o-mini",
        cache=cache,
        window_turns=None,
        window_tokens=None,
        summarize=False,
        **overrides,
    )


def _hit_and_miss(store: HistoryStore, cache: str, ask: Ask) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(settings(cache), llm=fake, store=store)
    first = ask(bot, "What is a cache?", "a")
    again = ask(bot, "What is a cache?", "b")  # a fresh session: the same prompt
    assert again == first == "Echo: What is a cache?"
    assert len(fake.calls) == 1  # the model answered once

    paid, hit = store.usage_entries(session_id="a")[0], store.usage_entries(session_id="b")[0]
    assert not paid.cached and paid.requests == 1 and paid.total_tokens > 0
    assert paid.cost_usd is not None and paid.cost_usd > 0
    assert hit.cached and hit.requests == 0 and hit.total_tokens == 0 and hit.cost_usd == 0.0
    assert hit.saved_usd == pytest.approx(paid.cost_usd)
    assert hit.model == "gpt-4o-mini"
    total = bot.usage()
    assert (total.turns, total.cached_turns, total.successful_requests) == (2, 1, 1)
    assert total.saved_usd == pytest.approx(paid.cost_usd)
    assert total.cost_usd == pytest.approx(paid.cost_usd)

    # The hit's turn is in its session's history, as the cached reply (mark taken off).
    history = bot.history("b")
    assert [m.type for m in history] == ["human", "ai"]
    assert history[1].text == first
    assert "chatchain_cached" not in history[1].response_metadata
    assert history[1].response_metadata == bot.history("a")[1].response_metadata

    # The next turn of the hit's session sends its history, which the cache has seen too.
    ask(bot, "And a second one?", "a")
    ask(bot, "And a second one?", "b")
    assert len(fake.calls) == 2
    assert bot.usage("b").cached_turns == 2

    ask(bot, "Something else", "b")  # another message: a miss
    assert len(fake.calls) == 3
    assert bot.usage().cached_turns == 2
    bot.chain.close()  # the cache's file or client; the store is the caller's


@each_library_way("way")
def test_a_hit_sends_nothing_and_is_recorded_as_cached_on_every_store(
    store: HistoryStore, way: str
) -> None:
    _hit_and_miss(store, "memory://", asker(way))


@pytest.fixture(params=["memory", "sqlite", "redis"])
def cache_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/cache.db"
    url: str = request.getfixturevalue("redis_url")
    with redis.Redis.from_url(url) as client:  # the run's server: no other test's replies
        client.flushdb()
    return url


@each_library_way("way")
def test_every_cache_backend(cache_url: str, way: str) -> None:
    _hit_and_miss(MemoryStore(), cache_url, asker(way))


SECRET = "Ann, your test results are back: positive."  # a sampled reply that tells a lot


@each_library_way("way")
def test_a_users_cached_reply_is_never_served_to_another_user(cache_url: str, way: str) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini", replies=[SECRET])
    store = MemoryStore()
    bot = Chatbot(settings(cache_url), llm=fake, store=store)
    ask = asker(way)
    assert ask(bot, "What did the lab say?", "a1", "ann") == SECRET
    # Bob sends Ann's exact first message: he is answered by the model, not with her reply.
    assert ask(bot, "What did the lab say?", "b1", "bob") == "Echo: What did the lab say?"
    assert ask(bot, "What did the lab say?", "n1") == "Echo: What did the lab say?"  # no user
    assert len(fake.calls) == 3
    assert [e.cached for e in store.usage_entries()] == [False, False, False]
    # Each is served their own reply from the cache, on a new session.
    assert ask(bot, "What did the lab say?", "a2", "ann") == SECRET
    assert ask(bot, "What did the lab say?", "b2", "bob") == "Echo: What did the lab say?"
    assert ask(bot, "What did the lab say?", "n2") == "Echo: What did the lab say?"
    assert len(fake.calls) == 3 and bot.usage().cached_turns == 3
    assert bot.usage(user_id="bob").cached_turns == 1


@each_library_way("way")
def test_with_the_shared_scope_every_user_is_served_the_same_reply(
    cache_url: str, way: str
) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini", replies=[SECRET])
    bot = Chatbot(settings(cache_url, cache_scope="shared"), llm=fake)
    ask = asker(way)
    assert ask(bot, "What did the lab say?", "a1", "ann") == SECRET
    assert ask(bot, "What did the lab say?", "b1", "bob") == SECRET  # the operator's choice
    assert ask(bot, "What did the lab say?", "n1") == SECRET
    assert len(fake.calls) == 1 and bot.usage().cached_turns == 2


def test_the_system_prompt_and_its_variables_are_part_of_the_key() -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(settings("memory://"), llm=fake, system="Answer in {language}.")
    french = Chatbot(settings("memory://"), llm=fake, system="Réponds en {language}.")
    bot.chat("hi", session_id="a", user_id="ann", language="English")
    bot.chat("hi", session_id="b", user_id="ann", language="French")  # another variable
    french.chat("hi", session_id="c", user_id="ann", language="English")  # another prompt
    assert len(fake.calls) == 3
    assert fake.calls[1][0].text == "Answer in French."
    reply = bot.chat("hi", session_id="d", user_id="ann", language="French")
    assert len(fake.calls) == 3 and reply.usage.cached_turns == 1


def test_the_scope_is_read_from_the_environment_and_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings.load(env_file=None).cache_scope == "user"
    monkeypatch.setenv("CHATCHAIN_CACHE_SCOPE", "shared")
    assert Settings.load(env_file=None).cache_scope == "shared"
    monkeypatch.setenv("CHATCHAIN_CACHE_SCOPE", "everyone")
    with pytest.raises(ConfigurationError, match="CHATCHAIN_CACHE_SCOPE"):
        Settings.load(env_file=None)


def test_a_streamed_reply_is_cached_for_plain_turns_and_the_other_way_round() -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(settings("memory://"), llm=fake)
    assert _stream(bot, "one", "a") == _chat(bot, "one", "b")
    assert _chat(bot, "two", "c") == _astream(bot, "two", "d")
    assert len(fake.calls) == 2 and bot.usage().cached_turns == 2


def test_a_stream_stopped_early_is_not_cached() -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini", replies=["one two three four"])
    bot = Chatbot(settings("memory://"), llm=fake)
    with bot.stream("hi", session_id="a") as stream:
        next(stream)
    assert bot.history("a")[1].response_metadata.get("interrupted")
    assert _chat(bot, "hi", "b") == "Echo: hi"  # asked again, not served half a reply
    assert len(fake.calls) == 2 and bot.usage().cached_turns == 0


def test_different_parameters_or_models_miss(tmp_path: Path) -> None:
    cache = f"sqlite:///{tmp_path}/cache.db"
    fake = FakeChatModel(model_name="gpt-4o-mini")
    other = FakeChatModel(model_name="gpt-4.1-nano")
    for llm, session in [
        (fake.bind(temperature=0.0), "a"),
        (fake.bind(temperature=1.0), "a"),
        (other, "a"),
        (fake.bind(temperature=1.0), "b"),  # the same model and parameters: a hit
    ]:
        with Chatbot(settings(cache), llm=llm) as bot:
            bot.chat("hi", session_id=session)
    assert (len(fake.calls), len(other.calls)) == (2, 1)


def test_the_sqlite_cache_survives_a_restart(tmp_path: Path) -> None:
    cache = f"sqlite:///{tmp_path}/cache.db"
    store = f"sqlite:///{tmp_path}/chat.db"
    first = FakeChatModel(model_name="gpt-4o-mini")
    with Chatbot(settings(cache, store_url=store), llm=first) as bot:
        bot.chat("hi", session_id="a")
    assert (tmp_path / "cache.db").stat().st_mode & 0o077 == 0  # conversations: owner only

    fresh = FakeChatModel(model_name="gpt-4o-mini")  # a new process would build all anew
    with Chatbot(settings(cache, store_url=store), llm=fresh) as bot:
        assert bot.chat("hi", session_id="b").usage.cached_turns == 1
        assert fresh.calls == []
        assert bot.usage().cached_turns == 1 and bot.usage().turns == 2


def test_without_the_setting_nothing_is_cached() -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(settings("memory://").model_copy(update={"cache": None}), llm=fake)
    _chat(bot, "hi", "a")
    _stream(bot, "hi", "b")
    assert len(fake.calls) == 2 and bot.usage().cached_turns == 0
    assert fake.cache is None  # the caller's model is never changed


def test_a_hit_under_a_budget_costs_nothing_and_gives_its_hold_back(store: HistoryStore) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    budget = Budget(total_tokens=5_000)
    bot = Chatbot(settings("memory://"), llm=fake, store=store, budget=budget)
    _chat(bot, "hi", "a")
    spent = bot.usage().total_tokens
    for session in ("b", "c", "d"):
        assert bot.chat("hi", session_id=session).usage.cached_turns == 1
    assert len(fake.calls) == 1 and bot.usage().total_tokens == spent
    # No hold was left behind: what remains of the cap can be held whole.
    rest = BudgetHold("x", 5_000 - spent, 0.0, datetime.now(UTC) + timedelta(minutes=1))
    assert store.hold_budget(rest, [BudgetLimit("all", "", max_tokens=5_000)]) is None


def test_concurrent_hits_each_save_their_turn(store: HistoryStore) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(settings("memory://"), llm=fake, store=store)
    _chat(bot, "hi", "first")
    threads = [threading.Thread(target=_chat, args=(bot, "hi", f"s{n % 4}")) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fake.calls) == 1
    for n in range(4):
        assert [m.text for m in bot.history(f"s{n}")] == ["hi", "Echo: hi"]
    assert bot.usage().cached_turns == 4


def test_the_redis_cache_keeps_its_keys_under_a_prefix(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()
        bot = Chatbot(settings(redis_url), llm=FakeChatModel(model_name="gpt-4o-mini"))
        bot.chat("hi", session_id="a")
        keys = [key.decode() for key in client.keys("*")]
        client.flushdb()
    [key] = keys  # the store is in memory here: the one key is the cached reply
    assert key.startswith("chatchain:llm-cache:") and len(key) == len("chatchain:llm-cache:") + 64


def test_clearing_the_redis_cache_leaves_the_rest_of_the_database(
    redis_store: HistoryStore, redis_url: str
) -> None:
    bot = Chatbot(
        settings(redis_url), llm=FakeChatModel(model_name="gpt-4o-mini"), store=redis_store
    )
    bot.chat("hi", session_id="a")
    model = bot.chain.model
    model.bound.cache.clear()  # the cache the chain's model holds
    assert [m.text for m in bot.history("a")] == ["hi", "Echo: hi"]  # the store's keys stay
    assert bot.chat("hi", session_id="b").usage.cached_turns == 0  # the reply was cleared


def _adds(messages: list[BaseMessage]) -> str | AIMessage:
    if messages[-1].type == "tool":
        return f"The sum is {messages[-1].text}."
    return tool_call_reply(("add", {"a": 2, "b": 3}))


@each_library_way("way")
def test_a_tool_turn_replayed_is_served_whole_from_the_cache(store: HistoryStore, way: str) -> None:
    calls: list[tuple[int, int]] = []

    def add(a: int, b: int) -> int:
        """Add two numbers."""
        calls.append((a, b))
        return a + b

    fake = FakeChatModel(model_name="gpt-4o-mini", respond=_adds)
    bot = Chatbot(settings("memory://"), llm=fake, store=store, tools=[add])
    ask = asker(way)
    assert ask(bot, "What is 2 + 3?", "a") == ask(bot, "What is 2 + 3?", "b") == "The sum is 5."
    assert len(fake.calls) == 2  # the tool call and the answer, asked once each
    assert calls == [(2, 3), (2, 3)]  # tools still run: their results are part of the prompt
    assert [m.type for m in bot.history("b")] == ["human", "ai", "tool", "ai"]
    paid, hit = store.usage_entries(session_id="a")[0], store.usage_entries(session_id="b")[0]
    assert (paid.requests, paid.cached) == (2, False)
    assert (hit.requests, hit.cached, hit.total_tokens, hit.cost_usd) == (0, True, 0, 0.0)
    assert hit.saved_usd == pytest.approx(paid.cost_usd)
