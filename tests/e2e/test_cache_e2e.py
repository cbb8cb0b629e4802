"""The response cache end to end: the real `ChatOpenAI` against the test server.

Two identical turns on two fresh sessions reach the server once; the hit is priced at what it
saved; a different model, temperature or message is a miss; the SQLite cache outlives the
process's objects.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.globals import set_llm_cache
from pydantic import BaseModel

from chatchain import Budget, Chatbot, Settings
from chatchain.testing import OpenAITestServer
from tests.entry_points import LIBRARY, asker, each_library_way

KEY = "sk-e2e-secret-0123456789abcdef"


_chat, _stream, _achat, _astream = (asker(way) for way in LIBRARY)


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAITestServer]:
    with OpenAITestServer() as server:
        yield server


def make_settings(server: OpenAITestServer, cache: str | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_key": KEY,
        "base_url": server.base_url,
        "model": "gpt-4o-mini",
        "max_retries": 0,
        "timeout": 5.0,
        "window_turns": None,
        "window_tokens": None,
        "summarize": False,
        "cache": cache,
    }
    values.update(overrides)
    return Settings(**values)


@each_library_way("way")
def test_two_identical_turns_on_fresh_sessions_send_one_request(
    server: OpenAITestServer, tmp_path: Path, way: str, request: pytest.FixtureRequest
) -> None:
    server.clear()
    ask = asker(way)
    bot = Chatbot(make_settings(server, f"sqlite:///{tmp_path}/cache.db"))
    request.addfinalizer(bot.close)
    first = ask(bot, "Tell me about caches", "a")
    again = ask(bot, "Tell me about caches", "b")
    assert again == first and len(server.requests) == 1

    paid, hit = bot.usage_entries()
    assert (paid.cached, paid.requests) == (False, 1) and paid.price_source == "genai-prices"
    assert (hit.cached, hit.requests, hit.total_tokens, hit.cost_usd) == (True, 0, 0, 0.0)
    assert hit.saved_usd == pytest.approx(paid.cost_usd)
    assert [m.text for m in bot.history("b")] == ["Tell me about caches", first]

    # The hit's session goes on with its history, which the cache has seen in "a" too.
    ask(bot, "And then?", "a")
    ask(bot, "And then?", "b")
    assert len(server.requests) == 2 and bot.usage().cached_turns == 2


def test_a_different_model_temperature_or_message_misses(
    server: OpenAITestServer, tmp_path: Path
) -> None:
    server.clear()
    cache = f"sqlite:///{tmp_path}/cache.db"
    for settings, text in [
        (make_settings(server, cache), "hi"),
        (make_settings(server, cache, temperature=0.2), "hi"),
        (make_settings(server, cache, model="gpt-4.1-nano"), "hi"),
        (make_settings(server, cache), "hello"),
    ]:
        with Chatbot(settings) as bot:
            bot.chat(text, session_id="a" if text == "hi" else "b")
    assert len(server.requests) == 4
    with Chatbot(make_settings(server, cache, temperature=0.2)) as bot:
        assert bot.chat("hi", session_id="c").usage.cached_turns == 1
    assert len(server.requests) == 4


def test_the_sqlite_cache_survives_a_restart(server: OpenAITestServer, tmp_path: Path) -> None:
    server.clear()
    settings = make_settings(
        server, f"sqlite:///{tmp_path}/cache.db", store_url=f"sqlite:///{tmp_path}/chat.db"
    )
    with Chatbot(settings) as bot:
        bot.chat("Remember me", session_id="a")
    with Chatbot(settings.model_copy()) as restarted:  # a new model, cache engine and store
        reply = restarted.chat("Remember me", session_id="b")
        assert len(server.requests) == 1 and reply.usage.cached_turns == 1
        assert restarted.usage().cached_turns == 1


CHILD = """
import sys
from chatchain import Chatbot, Settings
settings = Settings(
    api_key="sk-x", base_url=sys.argv[1], cache=sys.argv[2], store_url=sys.argv[3],
    max_retries=0, timeout=5.0,  # as make_settings: the model's parameters are in the key
)
print(Chatbot(settings).chat("Asked in another process", session_id="a").text)
"""


@pytest.mark.slow  # a Python process of its own
def test_a_reply_cached_by_a_process_that_ended_is_a_hit(
    server: OpenAITestServer, tmp_path: Path
) -> None:
    server.clear()
    cache, store = f"sqlite:///{tmp_path}/cache.db", f"sqlite:///{tmp_path}/chat.db"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, server.base_url, cache, store],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (child.returncode, child.stderr) == (0, "")
    assert len(server.requests) == 1
    with Chatbot(make_settings(server, cache, store_url=store)) as bot:
        reply = bot.chat("Asked in another process", session_id="b")
    assert reply.text == child.stdout.strip() and reply.usage.cached_turns == 1
    assert len(server.requests) == 1


def test_with_a_fallback_model_each_model_has_the_cache(server: OpenAITestServer) -> None:
    server.clear()
    settings = make_settings(server, "memory://", fallback_model="gpt-4.1-nano")
    bot = Chatbot(settings)
    assert _stream(bot, "hi", "a") == _chat(bot, "hi", "b")
    assert len(server.requests) == 1 and bot.usage().cached_turns == 1
    assert bot.usage_entries()[1].model == "gpt-4o-mini"


def test_replies_that_differ_only_in_metadata_never_sent_still_match(
    server: OpenAITestServer,
) -> None:
    # The same first exchange, generated twice: the replies' completion ids differ, but
    # those are not sent, so the second turns are the same request.
    server.clear()
    bot = Chatbot(make_settings(server, "memory://"))
    bot.chat("hi", session_id="a")
    bot.chain.model.bound.cache.clear()  # forget that reply: "b" gets a fresh one
    bot.chat("hi", session_id="b")
    first_a, first_b = bot.history("a")[1], bot.history("b")[1]
    assert first_a.response_metadata["id"] != first_b.response_metadata["id"]
    bot.chat("and then?", session_id="a")
    assert bot.chat("and then?", session_id="b").usage.cached_turns == 1
    assert len(server.requests) == 3


@pytest.mark.parametrize("way", ["chat", "achat"])
def test_langchains_global_cache_is_not_read_without_the_setting(
    server: OpenAITestServer, way: str
) -> None:
    # Each turn reaches the server and is billed; before, the second was a global-cache hit
    # recorded as a paid call (18 tokens, $0.0000059) that sent nothing.
    server.clear()
    bot = Chatbot(make_settings(server, None))  # CHATCHAIN_CACHE unset
    set_llm_cache(InMemoryCache())
    try:
        for session in ("a", "b"):
            asker(way)(bot, "Tell me about caches", session)
    finally:
        set_llm_cache(None)
    entries = bot.usage_entries()
    assert len(server.requests) == len(entries) == 2
    assert [(e.requests, e.cached) for e in entries] == [(1, False), (1, False)]


@each_library_way("way")
def test_under_a_budget_each_hold_sends_another_max_tokens_and_still_hits(
    server: OpenAITestServer, way: str
) -> None:
    # 1,000 tokens in all: each hold's max_tokens is what is left, less each time.
    server.clear()
    bot = Chatbot(make_settings(server, "memory://"), budget=Budget(total_tokens=1_000))
    ask = asker(way)
    replies = {ask(bot, "Tell me about caches", session) for session in ("a", "b", "c")}
    assert len(replies) == 1 and len(server.requests) == 1
    assert bot.usage().cached_turns == 2


class City(BaseModel):
    name: str


def test_a_structured_turn_under_a_budget_is_sent_with_its_holds_max_tokens(
    server: OpenAITestServer,
) -> None:
    # Through the cache's wrapper too: before, it was sent with no max_tokens at all.
    server.clear()
    server.queue_json({"name": "Oslo"})
    bot = Chatbot(make_settings(server, "memory://"), budget=Budget(total_tokens=2_000))
    assert bot.chat("Which city?", session_id="a", schema=City).parsed == City(name="Oslo")
    body = server.requests[-1]["body"]
    assert body.get("max_completion_tokens", body.get("max_tokens")) == 1_000
