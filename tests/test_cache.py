"""``CHATCHAIN_CACHE``: the setting, what a cached row may hold, and a cache that fails.

The turns themselves, on every store and cache backend, are in tests/stores/test_cached_turns.py;
end to end with `ChatOpenAI` in tests/e2e/test_cache_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.globals import set_llm_cache
from langchain_core.load import dumps
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.runnables import Runnable
from pydantic import BaseModel

from chatchain import Budget, Chatbot, ConfigurationError, Settings, UsageEntry
from chatchain._cache import MARK, _revive, open_cache, with_cache
from chatchain._metering import entry_from, new_handler
from chatchain.pricing import Pricer
from chatchain.stores import MemoryStore
from chatchain.testing import FakeChatModel
from tests.entry_points import each_library_way, turn


@pytest.mark.parametrize(
    "url", ["ftp://host/cache", "sqlite://cache.db", "sqlite:///", "redis://host:99999/0", "x"]
)
def test_a_bad_url_names_the_variable_and_the_forms(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.load(env_file=None, cache=url)
    message = str(caught.value)
    assert message.startswith("CHATCHAIN_CACHE=")
    assert "memory://, sqlite:///path/to/cache.db or redis://host:6379/0" in message


def test_the_setting_is_read_from_the_environment_and_shown_without_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings.load(env_file=None).cache is None  # off by default
    monkeypatch.setenv("CHATCHAIN_CACHE", "redis://:hunter2@cache.example:6379/1")
    settings = Settings.load(env_file=None)
    assert settings.cache == "redis://:hunter2@cache.example:6379/1"
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())
    assert settings.model_dump()["cache"] == "redis://cache.example:6379/1"


def test_a_cache_file_that_cannot_be_created_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    settings = Settings.load(env_file=None, cache=f"sqlite:///{tmp_path}/file/cache.db")
    with pytest.raises(ConfigurationError, match="could not be created"):
        Chatbot(settings, llm=FakeChatModel())


def test_a_cache_that_fails_is_a_miss_and_the_turn_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    settings = Settings.load(env_file=None, cache="redis://127.0.0.1:1/0")  # nothing listens
    bot = Chatbot(settings, llm=fake)
    with caplog.at_level(logging.ERROR):
        assert bot.chat("hi", session_id="a").text == "Echo: hi"
        assert "".join(bot.stream("hi", session_id="b")) == "Echo: hi"
    assert len(fake.calls) == 2 and bot.usage().cached_turns == 0


def test_a_broken_cache_class_is_logged_and_read_as_a_miss(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(InMemoryCache):
        def lookup(self, prompt: str, llm_string: str) -> None:
            raise OSError("disk I/O error")

    cache = open_cache("memory://")
    cache.inner = Broken()  # type: ignore[attr-defined]
    fake = FakeChatModel()
    model = with_cache(fake, cache)
    assert model.invoke([HumanMessage("hi")]).text == "Echo: hi"
    assert "could not read a reply (OSError: disk I/O error)" in caplog.text


def _row(generation: object) -> str:
    return dumps(generation)


def test_a_cached_row_is_read_back_exactly() -> None:
    message = AIMessage(
        content="x",
        response_metadata={"lc": 1, "model_name": "m"},  # user data that looks serialized
        tool_calls=[{"name": "f", "args": {"a": 1}, "id": "c1"}],
        usage_metadata={"input_tokens": 1, "output_tokens": 1, "total_tokens": 2},
    )
    generation = ChatGeneration(message=message, generation_info={"finish_reason": "stop"})
    assert _revive([_row(generation)]) == [generation]


def test_a_row_of_any_other_class_is_a_miss(caplog: pytest.LogCaptureFixture) -> None:
    other = json.loads(_row(ChatGeneration(message=AIMessage("x"))))
    other["kwargs"]["message"]["id"][-1] = "SystemMessage"
    nested = json.loads(_row(ChatGeneration(message=AIMessage("x"))))
    nested["kwargs"]["message"]["kwargs"]["response_metadata"] = {
        "lc": 1,
        "type": "secret",
        "id": ["OPENAI_API_KEY"],
    }
    for row in (other, nested, {"text": "legacy"}):
        assert _revive([json.dumps(row)]) is None
    assert "could not be read" in caplog.text


def _result(prompt: int, completion: int, *, hit: bool) -> LLMResult:
    usage = {"input_tokens": prompt, "output_tokens": completion}
    message = AIMessage(
        "x",
        response_metadata={"model_name": "gpt-4o-mini"},
        usage_metadata={**usage, "total_tokens": prompt + completion},  # type: ignore[typeddict-item]
    )
    info = {MARK: True} if hit else None
    return LLMResult(generations=[[ChatGeneration(message=message, generation_info=info)]])


def _entry(*results: LLMResult) -> UsageEntry:
    handler = new_handler()
    for result in results:
        handler.on_llm_end(result)
    pricer = Pricer()
    return entry_from(
        handler, session_id="s", user_id=None, model="gpt-4o-mini", pricer=pricer, latency_s=0.1
    )


def test_a_turn_of_several_calls_counts_only_the_calls_that_were_sent() -> None:
    # A turn with tool rounds makes several calls; some may come from the cache.
    paid, hit = _entry(_result(100, 20, hit=False)), _entry(_result(50, 10, hit=True))
    mixed = _entry(_result(100, 20, hit=False), _result(50, 10, hit=True))
    assert (paid.cached, paid.saved_usd, paid.requests) == (False, None, 1)
    assert (hit.cached, hit.total_tokens, hit.requests, hit.cost_usd) == (True, 0, 0, 0.0)
    assert not mixed.cached  # the turn sent a request: not a cached turn...
    assert (mixed.prompt_tokens, mixed.completion_tokens, mixed.requests) == (100, 20, 1)
    assert mixed.cost_usd == pytest.approx(paid.cost_usd)  # ...billed for what it sent,
    assert mixed.saved_usd == pytest.approx(hit.saved_usd)  # and it saved the hit's price
    assert hit.saved_usd is not None and hit.saved_usd > 0
    assert mixed.usage().cached_turns == 0 and mixed.usage().saved_usd == hit.saved_usd


def test_a_stream_keys_the_cache_with_the_arguments_of_bindings_inside_the_wrapper() -> None:
    # As when tools are bound to the cached model (bind_tools keeps the wrapper outside).
    fake = FakeChatModel()
    cached = with_cache(fake, open_cache("memory://"))
    inner = cached.model_copy(update={"bound": cached.bound.bind(temperature=1.0)})  # type: ignore[attr-defined]
    messages = [HumanMessage("hi")]
    assert "".join(chunk.text for chunk in inner.stream(messages)) == "Echo: hi"
    assert inner.invoke(messages).text == "Echo: hi"  # the stream's entry
    assert len(fake.calls) == 1
    assert cached.invoke(messages).text == "Echo: hi"  # other arguments: a miss
    assert len(fake.calls) == 2


# -- the reply cap (max_tokens) and the cache --------------------------------------------------

ASKED = [HumanMessage("Tell me everything about response caches")]
WHOLE = "Echo: Tell me everything about response caches"


def _ask(model: Runnable[Any, Any], cap: int | None, streamed: bool) -> str:
    capped = model if cap is None else model.bind(max_tokens=cap)  # as a budget hold sends it
    if streamed:
        return "".join(chunk.text for chunk in capped.stream(ASKED))
    return str(capped.invoke(ASKED).text)


@pytest.mark.parametrize("streamed", [False, True], ids=["invoke", "stream"])
def test_a_reply_cut_by_its_cap_answers_that_cap_only(streamed: bool) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    model = with_cache(fake, open_cache("memory://"))
    assert _ask(model, 2, streamed) == "Echo: Te"  # cut: finish_reason "length"
    assert _ask(model, 2, streamed) == "Echo: Te" and len(fake.calls) == 1  # the same cap: a hit
    assert _ask(model, 3, streamed) == "Echo: Tell m" and len(fake.calls) == 2  # not cut shorter
    assert _ask(model, 1, streamed) == "Echo" and len(fake.calls) == 3  # not more than held
    assert _ask(model, None, streamed) == WHOLE and len(fake.calls) == 4  # uncut: sent
    assert _ask(model, 2, streamed) == "Echo: Te"  # the cut reply is still there for its cap,
    assert _ask(model, 1000, streamed) == WHOLE and len(fake.calls) == 4  # the whole one too


@pytest.mark.parametrize("streamed", [False, True], ids=["invoke", "stream"])
def test_a_whole_reply_answers_any_cap_it_fits_in(streamed: bool) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    model = with_cache(fake, open_cache("memory://"))
    reply = model.bind(max_tokens=500).invoke(ASKED)
    tokens = reply.usage_metadata["output_tokens"]
    assert reply.response_metadata["finish_reason"] == "stop"
    for cap in (None, 1000, tokens):  # no cap, a larger one, the smallest it fits in
        assert _ask(model, cap, streamed) == WHOLE
    assert len(fake.calls) == 1
    _ask(model, tokens - 1, streamed)  # the reply would not fit: sent
    assert len(fake.calls) == 2


def test_a_whole_reply_without_usage_answers_caps_from_the_one_it_was_made_under() -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    cache = open_cache("memory://")
    model = with_cache(fake, cache)
    reply = ChatGeneration(message=AIMessage(WHOLE, response_metadata={"finish_reason": "stop"}))
    cached = model.bind(max_tokens=50)
    call = cached._call(ASKED, None, {})  # type: ignore[attr-defined]
    call.update([reply])  # as an endpoint that sends no usage leaves it
    for cap in (50, 60, None):  # the cap it was made under, a larger one, none
        assert _ask(model, cap, False) == WHOLE
    assert fake.calls == []
    _ask(model, 49, False)  # it might not have fitted: sent
    assert len(fake.calls) == 1


@each_library_way("way")
def test_under_a_budget_a_repeated_question_is_answered_from_the_cache(way: str) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    settings = Settings.load(env_file=None, api_key="sk-test", cache="memory://")
    bot = Chatbot(settings, llm=fake, budget=Budget(total_tokens=400))
    for session in ("a", "b", "c"):  # each hold leaves less for the reply: another max_tokens
        turn(bot, way, WHOLE.removeprefix("Echo: "), session_id=session)
    assert len(fake.calls) == 1
    assert bot.usage().cached_turns == 2
    assert [m.text for m in bot.history("c")] == [WHOLE.removeprefix("Echo: "), WHOLE]


def test_under_a_tight_budget_a_cut_reply_is_served_to_the_same_cap_only(tmp_path: Path) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    settings = Settings.load(env_file=None, api_key="sk-test", cache=f"sqlite:///{tmp_path}/c.db")
    text = WHOLE.removeprefix("Echo: ")
    tight = Chatbot(settings, llm=fake, budget=Budget(session_tokens=34))
    cut = tight.chat(text, session_id="a")
    assert cut.message.response_metadata["finish_reason"] == "length"
    again = tight.chat(text, session_id="b")  # a new session: the same prompt and hold
    assert again.text == cut.text and len(fake.calls) == 1 and again.usage.cached_turns == 1
    uncut = Chatbot(settings, llm=fake)  # no budget, over the same cache
    assert uncut.chat(text, session_id="c").text == WHOLE  # asked, not served the cut reply
    assert len(fake.calls) == 2
    assert uncut.chat(text, session_id="d").usage.cached_turns == 1  # now the whole reply
    assert tight.chat(text, session_id="e").text == cut.text  # and the cut one for its cap
    assert len(fake.calls) == 2


# -- LangChain's global cache (set_llm_cache) --------------------------------------------------


@pytest.fixture
def global_cache() -> Iterator[InMemoryCache]:
    cache = InMemoryCache()
    set_llm_cache(cache)
    try:
        yield cache
    finally:
        set_llm_cache(None)


@pytest.mark.parametrize("way", ["chat", "achat"])
def test_langchains_global_cache_is_never_read_nor_written(
    global_cache: InMemoryCache, way: str
) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(Settings.load(env_file=None, api_key="sk-test"), llm=fake)  # no CHATCHAIN_CACHE
    for session in ("a", "b"):
        if way == "chat":
            bot.chat("What is a cache?", session_id=session)
        else:
            asyncio.run(bot.achat("What is a cache?", session_id=session))
    assert len(fake.calls) == 2  # each turn sent: its ledger entry is a paid call
    first, second = bot.usage_entries()
    assert (second.requests, second.cached) == (1, False) and second.total_tokens > 0
    assert second.cost_usd == pytest.approx(first.cost_usd)
    assert global_cache._cache == {}  # a cache that knows no users learns nothing either
    assert fake.cache is None  # the caller's model is not changed


def test_a_global_cache_set_after_the_first_turns_is_not_read_either() -> None:
    # With no global cache a call goes to the model itself (no copy); once one is set,
    # each call checks again and goes to a copy with cache=False.
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(Settings.load(env_file=None, api_key="sk-test"), llm=fake)
    bot.chat("What is a cache?", session_id="a")
    cache = InMemoryCache()
    set_llm_cache(cache)
    try:
        bot.chat("What is a cache?", session_id="b")
    finally:
        set_llm_cache(None)
    assert len(fake.calls) == 2 and cache._cache == {}
    assert [(e.requests, e.cached) for e in bot.usage_entries()] == [(1, False), (1, False)]


def test_summary_calls_do_not_read_the_global_cache_either(global_cache: InMemoryCache) -> None:
    settings = Settings.load(
        env_file=None, api_key="sk-test", window_turns=1, window_tokens=None, summarize=True
    )
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(settings, llm=fake, store=MemoryStore())
    calls = []
    for session in ("a", "b"):  # the same six turns: the same summary calls
        for n in range(6):
            bot.chat(f"turn {n}", session_id=session)
        calls.append(len(fake.calls))
    assert calls[0] > 6  # six turns and their summaries
    assert calls[1] == 2 * calls[0]  # all of them sent again
    summaries = [e for e in bot.usage_entries() if e.summary]
    assert summaries and all(e.requests == 1 and not e.cached for e in summaries)
    assert global_cache._cache == {}


def test_a_callers_own_cache_on_the_model_is_kept() -> None:
    own = InMemoryCache()
    fake = FakeChatModel(model_name="gpt-4o-mini", cache=own)
    bot = Chatbot(Settings.load(env_file=None, api_key="sk-test"), llm=fake)
    bot.chat("hi", session_id="a")
    assert own._cache != {}  # their explicit choice (see the settings' docstring)


class City(BaseModel):
    name: str


@pytest.mark.parametrize("cache", [None, "memory://"], ids=["global-cache", "chatchain-cache"])
def test_a_structured_turn_is_never_answered_with_another_users_reply(
    global_cache: InMemoryCache, cache: str | None
) -> None:
    # Structured turns call LangChain's `with_structured_output`, not chatchain's wrapper.
    replies = ['{"name": "Oslo"}', '{"name": "Bergen"}']
    fake = FakeChatModel(model_name="gpt-4o-mini", replies=replies)
    bot = Chatbot(Settings.load(env_file=None, api_key="sk-test", cache=cache), llm=fake)
    ann = bot.chat("Which city?", session_id="a", user_id="ann", schema=City)
    bob = bot.chat("Which city?", session_id="b", user_id="bob", schema=City)
    assert (ann.parsed, bob.parsed) == (City(name="Oslo"), City(name="Bergen"))
    assert len(fake.calls) == 2 and global_cache._cache == {}
    assert [(e.requests, e.cached) for e in bot.usage_entries()] == [(1, False), (1, False)]
