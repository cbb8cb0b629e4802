"""``CHATCHAIN_CACHE``: the setting, what a cached row may hold, and a cache that fails.

The turns themselves, on every store and cache backend, are in tests/stores/test_cached_turns.py;
end to end with `ChatOpenAI` in tests/e2e/test_cache_e2e.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.load import dumps
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, LLMResult

from chatchain import Chatbot, ConfigurationError, Settings, UsageEntry
from chatchain._cache import MARK, _revive, open_cache, with_cache
from chatchain._metering import entry_from, new_handler
from chatchain.pricing import Pricer
from chatchain.testing import FakeChatModel


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
