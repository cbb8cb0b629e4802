"""Renamed public names: the new name works, the old one still works and warns with the new.

Each word of the API means one thing (README, "Words"); a name that meant another thing was
renamed, and its old spelling is an alias that raises a `DeprecationWarning` naming the new one.
"""

from __future__ import annotations

import pytest

import chatchain
from chatchain import Chatbot, Settings, ToolRun, TurnHooks
from chatchain.hooks import TurnEnded
from chatchain.testing import FakeChatModel, tool_call_reply


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def _tool_bot(hooks: TurnHooks | None = None) -> Chatbot:
    fake = FakeChatModel(replies=[tool_call_reply(("add", {"a": 1, "b": 2})), "3"])
    return Chatbot(llm=fake, tools=[add], hooks=hooks)


def test_tool_call_is_now_tool_run() -> None:
    with pytest.warns(DeprecationWarning, match=r"chatchain\.ToolCall .*chatchain\.ToolRun"):
        from chatchain import ToolCall
    assert ToolCall is ToolRun
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        chatchain.NoSuchName  # type: ignore[attr-defined]  # noqa: B018


def test_reply_tool_calls_is_now_tool_runs() -> None:
    reply = _tool_bot().chat("1+2?")
    (run,) = reply.tool_runs
    assert (run.name, run.args, run.result) == ("add", {"a": 1, "b": 2}, "3")
    with pytest.warns(DeprecationWarning, match=r"Reply\.tool_calls .*Reply\.tool_runs"):
        assert reply.tool_calls == reply.tool_runs


def test_stream_tool_calls_is_now_tool_runs() -> None:
    with _tool_bot().stream("1+2?") as stream:
        assert "".join(stream) == "3"
    assert [run.name for run in stream.tool_runs] == ["add"]
    with pytest.warns(DeprecationWarning, match=r"ReplyStream\.tool_calls .*\.tool_runs"):
        assert stream.tool_calls == stream.tool_runs


def test_turn_ended_tool_calls_is_now_tool_runs() -> None:
    ended: list[TurnEnded] = []

    class Keep(TurnHooks):
        def on_turn_end(self, event: TurnEnded) -> None:
            ended.append(event)

    _tool_bot(Keep()).chat("1+2?")
    assert [run.name for run in ended[0].tool_runs] == ["add"]
    with pytest.warns(DeprecationWarning, match=r"TurnEnded\.tool_calls .*TurnEnded\.tool_runs"):
        assert ended[0].tool_calls == ended[0].tool_runs


def test_settings_store_is_now_store_url() -> None:
    url = "sqlite:///chat.db"
    assert Settings(store_url=url).store_url == url
    with pytest.warns(DeprecationWarning, match=r"Settings\(store=\.\.\.\) .*store_url=\.\.\."):
        settings = Settings(store=url)
    assert settings.store_url == url
    with pytest.warns(DeprecationWarning, match=r"Settings\.store .*Settings\.store_url"):
        assert settings.store == url
    with pytest.warns(DeprecationWarning, match=r"Settings\.load\(store=\.\.\.\) .*store_url"):
        assert Settings.load(env_file=None, store=url).store_url == url


def test_the_store_variable_and_option_keep_their_names(monkeypatch: pytest.MonkeyPatch) -> None:
    # What users type stays: CHATCHAIN_STORE (and `--store`, tests/cli) set `store_url`.
    monkeypatch.setenv("CHATCHAIN_STORE", "sqlite:///env.db")
    assert Settings.load(env_file=None).store_url == "sqlite:///env.db"


def test_delete_forgets_the_whole_session_and_reset_is_its_old_name() -> None:
    bot = Chatbot(llm=FakeChatModel())
    for session in ("gone", "reset"):
        bot.chat("hello", session_id=session)
        bot.store.set_title(session, "A trip")
    bot.delete("gone")
    assert bot.history("gone") == [] and bot.summary("gone") is None
    assert bot.store.titles(["gone"]) == {}  # a later session of that id starts afresh
    assert bot.usage("gone").turns == 1  # what it spent stays in the ledger
    with pytest.warns(DeprecationWarning, match=r"Chatbot\.reset .*Chatbot\.delete"):
        bot.reset("reset")
    assert bot.history("reset") == [] and bot.store.titles(["reset"]) == {}
