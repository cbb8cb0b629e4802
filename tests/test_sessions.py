"""Show, reset, export, import and prune sessions through the Chatbot."""

from __future__ import annotations

import json
import stat
import time
from datetime import timedelta
from pathlib import Path

import pytest

from chatchain import Chatbot, InvalidInputError, Settings
from chatchain.stores import _export
from chatchain.testing import FakeChatModel


@pytest.fixture
def bot(settings: Settings) -> Chatbot:
    return Chatbot(settings, llm=FakeChatModel(), system="S")


def test_export_to_a_private_file_and_import_elsewhere(
    bot: Chatbot, tmp_path: Path, settings: Settings
) -> None:
    bot.chat("Hi! I'm Bob 🙂", session_id="dp123")
    bot.chat("What's my name?", session_id="dp123")
    path = tmp_path / "exports" / "dp123.json"
    data = bot.export_session("dp123", path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text(encoding="utf-8")) == data
    assert [m["data"]["content"] for m in data["messages"]] == [
        "Hi! I'm Bob 🙂",
        "Echo: Hi! I'm Bob 🙂",
        "What's my name?",
        "Echo: What's my name?",
    ]
    other = Chatbot(settings, llm=FakeChatModel(), system="S")
    assert other.import_session(path) == "dp123"
    assert [m.text for m in other.history("dp123")] == [m.text for m in bot.history("dp123")]
    with pytest.raises(InvalidInputError, match="exists already"):
        other.import_session(data)
    assert other.import_session(data, session_id="copy") == "copy"
    assert other.sessions() == ["dp123", "copy"]


def test_import_of_a_bad_file_is_a_clear_error(bot: Chatbot, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="The session export is not JSON"):
        bot.import_session(path)
    with pytest.raises(InvalidInputError, match="Could not read the session export"):
        bot.import_session(tmp_path / "missing.json")
    with pytest.raises(InvalidInputError, match="no session 'ghost' to export"):
        bot.export_session("ghost")


def test_info_delete_and_prune(bot: Chatbot) -> None:
    bot.chat("old", session_id="old")
    time.sleep(0.05)
    bot.chat("new", session_id="new")
    info = bot.session_info("new")
    assert info is not None
    assert info.message_count == 2
    assert bot.prune(timedelta(seconds=0.03)) == ["old"]
    assert bot.sessions() == ["new"]
    assert bot.usage("old").turns == 1  # pruning keeps what the session spent
    bot.delete("new")
    assert bot.sessions() == []
    assert bot.session_info("new") is None


def test_store_is_chosen_by_url_setting(tmp_path: Path) -> None:
    db = tmp_path / "chat.db"
    settings = Settings(
        api_key="sk-test",
        store_url=f"sqlite:///{db}",
        window_turns=None,
        window_tokens=None,
        summarize=False,
    )
    with Chatbot(settings, llm=FakeChatModel(), system="S") as bot:
        bot.chat("persist me", session_id="p")
    with Chatbot(settings, llm=FakeChatModel(), system="S") as again:  # a restart
        assert [m.text for m in again.history("p")] == ["persist me", "Echo: persist me"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "is a JSON list, not a JSON object"),
        ("[" * 100_000, "nests deeper than the 100 levels"),
        ("{}", "not a chatchain session export"),
    ],
)
def test_import_of_a_file_that_is_no_export_changes_nothing(
    bot: Chatbot, tmp_path: Path, text: str, message: str
) -> None:
    bot.chat("keep me", session_id="dp123")
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InvalidInputError, match=message) as refused:
        bot.import_session(path, session_id="dp123", replace=True)
    assert type(refused.value) is InvalidInputError
    assert [m.text for m in bot.history("dp123")] == ["keep me", "Echo: keep me"]


def test_import_refuses_a_file_larger_than_an_export_can_be(
    bot: Chatbot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bot.chat("hi", session_id="dp123")
    path = tmp_path / "dp123.json"
    bot.export_session("dp123", path)
    monkeypatch.setattr(_export, "MAX_EXPORT_BYTES", path.stat().st_size - 1)
    with pytest.raises(InvalidInputError, match="is larger than"):
        bot.import_session(path, session_id="copy")
    assert bot.sessions() == ["dp123"]
