"""``chatchain sessions``: list, show, export, import, delete and prune."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage

from chatchain import Chatbot, Settings
from chatchain.stores._sqlite import _history as sqlite_history
from chatchain.testing import FakeChatModel
from tests.cli.conftest import Chatchain, stable


def test_list_shows_each_session_with_its_counts(chatchain: Chatchain) -> None:
    assert chatchain("sessions", "list").output == "No sessions yet.\n"
    chatchain("ask", "--session", "alpha", "one")
    chatchain("ask", "--session", "beta", "two")
    chatchain("ask", "--session", "alpha", "three")
    result = chatchain("sessions", "list")
    assert result.exit_code == 0
    assert stable(result.output).splitlines() == [
        "session  messages  created           updated",
        "alpha           4  DATE  DATE",
        "beta            2  DATE  DATE",
    ]


def test_show_prints_the_transcript_and_marks_interrupted_replies(chatchain: Chatchain) -> None:
    with Chatbot(Settings(store_url=chatchain.store_url), llm=FakeChatModel()) as bot:
        bot.chat("hello", session_id="s")
        stream = bot.stream("tell me more", session_id="s")
        first = next(stream)
        stream.close()  # as Ctrl-C does in the chat
    result = chatchain("sessions", "show", "s")
    assert result.exit_code == 0
    assert result.output.splitlines() == [
        "you: hello",
        "assistant: Echo: hello",
        "you: tell me more",
        f"assistant: {first} (interrupted)",
    ]


def tool_exchange() -> list[BaseMessage]:
    calls = [
        {"name": "get_weather", "args": {"city": "Oslo"}, "id": "c1", "type": "tool_call"},
        {"name": "get_time", "args": {"zone": "CET"}, "id": "c2", "type": "tool_call"},
    ]
    return [
        HumanMessage("Weather and time in Oslo?"),
        AIMessage("Let me check.", tool_calls=calls),
        ToolMessage("sunny,\n21 C", tool_call_id="c1"),
        ToolMessage("unknown zone", tool_call_id="c2", status="error"),
        AIMessage("", tool_calls=[{**calls[1], "id": "c3", "args": {"zone": "Europe/Oslo"}}]),
        ToolMessage("12:00", tool_call_id="c3", name="get_time"),
        AIMessage("Sunny, 21 C, and it is noon."),
    ]


def test_show_prints_tool_calls_and_results_as_dim_lines(chatchain: Chatchain) -> None:
    with chatchain.store() as store:
        store.append("t", tool_exchange())
    result = chatchain("sessions", "show", "t", env={"FORCE_COLOR": "1", "TERM": "xterm"})
    assert result.exit_code == 0
    plain = chatchain("sessions", "show", "t")
    assert plain.output.splitlines() == [
        "you: Weather and time in Oslo?",
        "assistant: Let me check.",
        "  tool get_weather(city='Oslo')",
        "  tool get_time(zone='CET')",
        "  → get_weather: sunny, 21 C",
        "  → error: unknown zone",
        "  tool get_time(zone='Europe/Oslo')",
        "  → get_time: 12:00",
        "assistant: Sunny, 21 C, and it is noon.",
    ]
    dim = "\x1b[2m"
    colored = result.output.splitlines()
    assert [line.startswith(dim) for line in colored] == [
        False,
        False,
        True,
        True,
        True,
        True,
        True,
        True,
        False,
    ]


def test_show_of_an_unknown_session_is_an_error(chatchain: Chatchain) -> None:
    result = chatchain("sessions", "show", "nope")
    assert result.exit_code == 1
    assert result.stderr == (
        "error: There is no session 'nope': see chatchain sessions list. A session made through "
        "chatchain serve is USER:ID there; or pass --user USER.\n"
    )


def test_export_then_import_under_another_id(chatchain: Chatchain, tmp_path: Path) -> None:
    chatchain("ask", "--session", "s", "hi")
    file = tmp_path / "s.json"
    result = chatchain("sessions", "export", "s", str(file))
    assert result.output == f"Exported session s (2 messages) to {file}.\n"
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert json.loads(file.read_text())["session_id"] == "s"

    assert chatchain("sessions", "import", str(file), "--as", "copy").output == (
        "Imported session copy (2 messages).\n"
    )
    with chatchain.store() as store:
        assert [m.text for m in store.load("copy")] == ["hi", "Echo: hi"]
    refused = chatchain("sessions", "import", str(file), "--as", "copy")
    assert refused.exit_code == 1
    assert refused.stderr == (
        "error: Session 'copy' exists already: add --replace to overwrite it, or --as ID to "
        "import it under another id.\n"
    )
    assert chatchain("sessions", "import", str(file), "--as", "copy", "--replace").exit_code == 0


def test_import_of_the_exported_id_and_of_a_bad_file(chatchain: Chatchain, tmp_path: Path) -> None:
    chatchain("ask", "--session", "s", "hi")
    file = tmp_path / "s.json"
    chatchain("sessions", "export", "s", str(file))
    chatchain("sessions", "delete", "s", "--yes")
    assert chatchain("sessions", "import", str(file)).output == "Imported session s (2 messages).\n"
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    result = chatchain("sessions", "import", str(bad))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: This is not a chatchain session export")


def test_import_of_a_bad_file_with_replace_keeps_the_session(
    chatchain: Chatchain, tmp_path: Path
) -> None:
    chatchain("ask", "--session", "s", "one")
    chatchain("ask", "--session", "s", "two")
    chatchain("ask", "--session", "s", "three")
    file = tmp_path / "s.json"
    chatchain("sessions", "export", "s", str(file))
    data = json.loads(file.read_text())
    data["messages"][3]["data"]["content"] = "\udc00"  # a lone surrogate: no store can keep it
    file.write_text(json.dumps(data))
    result = chatchain("sessions", "import", str(file), "--replace")
    assert result.exit_code == 1
    assert result.stderr == (
        "error: The session export holds a lone surrogate (U+DC00) at "
        "messages[3].data.content, which is not valid Unicode and cannot be stored. Fix the "
        "file, or export the session again.\n"
    )
    with chatchain.store() as store:
        assert store.count("s") == 6


def test_import_keeps_the_exported_times(chatchain: Chatchain, tmp_path: Path) -> None:
    chatchain("ask", "--session", "s", "hi")
    file = tmp_path / "s.json"
    chatchain("sessions", "export", "s", str(file))
    data = json.loads(file.read_text())
    data["created_at"] = "2020-01-01T00:00:00+00:00"
    data["updated_at"] = "2020-01-02T00:00:00+00:00"
    file.write_text(json.dumps(data))
    assert chatchain("sessions", "import", str(file), "--as", "old").exit_code == 0
    assert chatchain("sessions", "prune", "--older-than", "30d").output == (
        "Deleted 1 session: old\n"
    )


def test_export_of_an_unknown_session_is_an_error(chatchain: Chatchain, tmp_path: Path) -> None:
    result = chatchain("sessions", "export", "nope", str(tmp_path / "x.json"))
    assert result.exit_code == 1
    assert result.stderr == "error: There is no session 'nope' to export.\n"
    assert not (tmp_path / "x.json").exists()


def test_delete_asks_first(chatchain: Chatchain) -> None:
    chatchain("ask", "--session", "s", "hi")
    kept = chatchain("sessions", "delete", "s", input="n\n")
    assert kept.exit_code == 1
    assert "Delete session s (2 messages)? [y/N]" in kept.output
    with chatchain.store() as store:
        assert store.sessions() == ["s"]
    deleted = chatchain("sessions", "delete", "s", input="y\n")
    assert deleted.exit_code == 0
    assert deleted.output.endswith("Deleted session s.\n")
    with chatchain.store() as store:
        assert store.sessions() == []


def test_delete_yes_does_not_ask(chatchain: Chatchain) -> None:
    chatchain("ask", "--session", "s", "hi")
    result = chatchain("sessions", "delete", "s", "--yes")
    assert result.output == "Deleted session s.\n"
    with chatchain.store() as store:
        assert store.sessions() == []


def test_delete_of_an_unknown_session_is_an_error(chatchain: Chatchain) -> None:
    result = chatchain("sessions", "delete", "nope", "--yes")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: There is no session 'nope'")


def seed_idle_session(
    chatchain: Chatchain, monkeypatch: pytest.MonkeyPatch, session_id: str, idle: timedelta
) -> None:
    """A session last written ``idle`` ago (the SQLite store's clock is set back for it)."""
    then = datetime.now(UTC) - idle
    with monkeypatch.context() as patch, chatchain.store() as store:
        patch.setattr(sqlite_history, "utcnow", lambda: then)
        store.append(session_id, [HumanMessage("hi"), AIMessage("Echo: hi")])


@pytest.mark.parametrize(
    ("older_than", "deleted"),
    [("30d", True), ("40d", False), ("800h", True), ("1000h", False), ("48000m", True)],
)
def test_prune_deletes_the_sessions_idle_for_longer(
    chatchain: Chatchain, monkeypatch: pytest.MonkeyPatch, older_than: str, deleted: bool
) -> None:
    seed_idle_session(chatchain, monkeypatch, "idle", timedelta(days=35))
    chatchain("ask", "--session", "fresh", "hi")
    result = chatchain("sessions", "prune", "--older-than", older_than)
    assert result.exit_code == 0
    with chatchain.store() as store:
        sessions = store.sessions()
    if deleted:
        assert result.output == "Deleted 1 session: idle\n"
        assert sessions == ["fresh"]
    else:
        assert result.output == "Deleted 0 sessions.\n"
        assert sessions == ["idle", "fresh"]


@pytest.mark.parametrize("older_than", ["30", "3w", "d", "-1d"])
def test_prune_refuses_what_is_not_a_duration(chatchain: Chatchain, older_than: str) -> None:
    result = chatchain("sessions", "prune", "--older-than", older_than)
    assert result.exit_code == 2
    assert "is not a duration like 30d, 12h or 90m" in result.stderr


def test_a_service_users_sessions_are_listed_and_addressed_with_user(
    chatchain: Chatchain, tmp_path: Path
) -> None:
    # As chatchain serve stores them: "USER:ID".
    with Chatbot(Settings(store_url=chatchain.store_url), llm=FakeChatModel()) as bot:
        for full_id in ("ann:jokes", "ann:trip", "bob:jokes"):
            bot.chat(f"hi from {full_id}", session_id=full_id)
    listed = stable(chatchain("sessions", "list").output).splitlines()
    assert [line.split()[0] for line in listed[1:]] == ["ann:jokes", "ann:trip", "bob:jokes"]

    anns = chatchain("sessions", "list", "--user", "ann")
    assert anns.exit_code == 0
    assert [line.split()[0] for line in stable(anns.output).splitlines()[1:]] == ["jokes", "trip"]
    assert (
        chatchain("sessions", "list", "--user", "carol").output == "User carol has no sessions.\n"
    )

    shown = chatchain("sessions", "show", "jokes", "--user", "ann")
    assert shown.exit_code == 0 and "hi from ann:jokes" in shown.output

    unknown = chatchain("sessions", "delete", "jokes", "--yes")  # not a store id: says why
    assert unknown.exit_code == 1
    assert "chatchain serve is USER:ID there; or pass --user USER" in unknown.stderr
    deleted = chatchain("sessions", "delete", "jokes", "--user", "ann", "--yes")
    assert deleted.output == "Deleted session jokes of user ann.\n"
    with chatchain.store() as store:
        assert store.sessions() == ["ann:trip", "bob:jokes"]
    gone = chatchain("sessions", "show", "jokes", "--user", "ann")
    assert gone.stderr == (
        "error: User ann has no session 'jokes': see chatchain sessions list --user ann.\n"
    )

    file = tmp_path / "jokes.json"
    exported = chatchain("sessions", "export", "jokes", str(file), "--user", "bob")
    assert exported.exit_code == 0
    assert json.loads(file.read_text())["messages"][0]["data"]["content"] == "hi from bob:jokes"
    bad = chatchain("sessions", "list", "--user", "no spaces")
    assert bad.exit_code == 1 and "cannot name a user" in bad.stderr
