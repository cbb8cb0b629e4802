"""``chatchain chat`` fed line by line (stdin is no terminal, so lines are read plainly)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from chatchain.testing import Fault, OpenAITestServer
from tests.cli.conftest import KEY, Chatchain, stable


def lines(*texts: str) -> str:
    return "".join(f"{text}\n" for text in texts)


def test_a_chat_with_every_slash_command(
    chatchain: Chatchain, server: OpenAITestServer, tmp_path: Path
) -> None:
    saved = tmp_path / "other.json"
    result = chatchain(
        "chat",
        "--session",
        "first",
        input=lines(
            "Hi! I'm Bob",
            "/history",
            "/usage",
            "/sessions",
            "/switch other",
            "hello other",
            "/system Be terse.",
            "again",
            f"/save {saved}",
            "/delete",
            "/history",
            "/frobnicate",
            "/switch",
            "/help",
            "/exit",
            "never sent",
        ),
    )
    assert result.exit_code == 0
    assert result.stderr == ""
    assert stable(result.output) == "\n".join(
        [
            "chatchain, model gpt-4o-mini, session first (new)",
            "/help lists the commands; Ctrl-C stops a reply; Ctrl-D leaves.",
            "Echo: Hi! I'm Bob",
            "27 tokens (21 prompt + 6 completion), $0.0000067, T s, first token T s",
            "you: Hi! I'm Bob",
            "assistant: Echo: Hi! I'm Bob",
            "session first, 1 turn: 27 tokens (21 prompt + 6 completion), $0.0000067, T s",
            "session  messages  created           updated",
            "first *         2  DATE  DATE",
            "Now on session other (new).",
            "Echo: hello other",
            "23 tokens (19 prompt + 4 completion), $0.0000052, T s, first token T s",
            "The system prompt is changed for the rest of this chat.",
            "Echo: again",
            "32 tokens (29 prompt + 3 completion), $0.0000062, T s, first token T s",
            f"Saved session other to {saved}.",
            "Session other is deleted; what it spent stays in the ledger.",
            "Session other has no messages yet.",
            "Unknown command /frobnicate: /help lists them.",
            "usage: /switch ID",
            "/help         this list",
            "/history      the session's transcript",
            "/usage        what the session has spent",
            "/sessions     the sessions in the store (* marks this one)",
            "/switch ID    go to session ID (a new one if it has no messages)",
            "/system TEXT  use TEXT as the system prompt for the rest of this chat",
            "/save FILE    export the session to FILE (readable by you only)",
            "/delete       forget the session entirely (what it spent stays in the ledger)",
            "/exit         leave (as Ctrl-D does)",
        ]
    )
    # What was sent: replies streamed, the new system prompt used after /system, nothing
    # after /exit.
    bodies = [request["body"] for request in server.requests]
    assert all(body["stream"] is True for body in bodies)
    assert [body["messages"][0]["content"] for body in bodies] == [
        "You are a helpful assistant.",
        "You are a helpful assistant.",
        "Be terse.",
    ]
    assert [body["messages"][-1]["content"] for body in bodies] == [
        "Hi! I'm Bob",
        "hello other",
        "again",
    ]
    # What was stored: /delete emptied "other", after /save had written it, owner-only.
    with chatchain.store() as store:
        assert [m.text for m in store.load("first")] == ["Hi! I'm Bob", "Echo: Hi! I'm Bob"]
        assert store.sessions() == ["first"]
        assert store.usage_total("session", "other").turns == 2  # deleting refunds nothing
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    export = json.loads(saved.read_text())
    assert [m["data"]["content"] for m in export["messages"]] == [
        "hello other",
        "Echo: hello other",
        "again",
        "Echo: again",
    ]


def test_reset_is_still_understood_as_delete(chatchain: Chatchain) -> None:
    result = chatchain("chat", "--session", "s", input=lines("hello", "/reset"))
    assert result.output.splitlines()[-2:] == [
        "/reset is now /delete.",
        "Session s is deleted; what it spent stays in the ledger.",
    ]
    with chatchain.store() as store:
        assert store.sessions() == []


def test_chat_goes_on_in_the_latest_session(chatchain: Chatchain, server: OpenAITestServer) -> None:
    chatchain("ask", "--session", "older", "one")
    chatchain("ask", "--session", "latest", "two")
    chatchain("ask", "--session", "older", "three")  # now "older" was written last
    result = chatchain("chat", input=lines("four"))
    assert (
        result.output.splitlines()[0] == "chatchain, model gpt-4o-mini, session older (4 messages)"
    )
    assert len(server.requests[-1]["body"]["messages"]) == 6  # system, 4 earlier, the input
    with chatchain.store() as store:
        assert [m.text for m in store.load("older")][-2:] == ["four", "Echo: four"]


def test_new_starts_a_new_session(chatchain: Chatchain) -> None:
    chatchain("ask", "--session", "old", "one")
    result = chatchain("chat", "--new", input=lines("two"))
    banner = result.output.splitlines()[0]
    assert banner.startswith("chatchain, model gpt-4o-mini, session ")
    assert banner.endswith(" (new)")
    new_id = banner.split("session ")[1].split(" ")[0]
    with chatchain.store() as store:
        assert store.sessions() == ["old", new_id]
        assert store.count(new_id) == 2


def test_an_empty_store_starts_a_new_session(chatchain: Chatchain) -> None:
    result = chatchain("chat", input=lines("hi"))
    assert result.output.splitlines()[0].endswith(" (new)")
    with chatchain.store() as store:
        assert len(store.sessions()) == 1


def test_the_end_of_input_leaves_like_ctrl_d(chatchain: Chatchain) -> None:
    result = chatchain("chat", "--session", "s", input=lines("hi"))
    assert result.exit_code == 0
    assert stable(result.output).splitlines()[2:] == [
        "Echo: hi",
        "21 tokens (18 prompt + 3 completion), $0.0000045, T s, first token T s",
    ]


def test_an_error_is_one_line_and_the_chat_goes_on(
    chatchain: Chatchain, server: OpenAITestServer
) -> None:
    server.add_fault(Fault(status=503))
    result = chatchain("chat", "--session", "s", input=lines("first", "second"))
    assert result.exit_code == 0
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    assert "Echo: second" in result.stdout
    with chatchain.store() as store:
        assert [m.text for m in store.load("s")] == ["second", "Echo: second"]


def test_debug_shows_the_traceback_in_the_chat(
    chatchain: Chatchain, server: OpenAITestServer
) -> None:
    server.add_fault(Fault(status=401, message=f"Incorrect API key provided: {KEY}."))
    result = chatchain("chat", "--debug", input=lines("hi"))
    assert result.exit_code == 0
    assert "Traceback (most recent call last)" in result.stderr
    assert KEY not in result.output


def test_a_budget_refusal_is_one_line_in_the_chat(
    chatchain: Chatchain, server: OpenAITestServer
) -> None:
    result = chatchain(
        "chat", input=lines("hi", "/exit"), env={"CHATCHAIN_BUDGET_TOTAL_TOKENS": "5"}
    )
    assert result.exit_code == 0
    assert result.stderr.startswith("error: ")
    assert "CHATCHAIN_BUDGET_TOTAL_TOKENS" in result.stderr
    assert result.stderr.count("\n") == 1
    assert server.requests == []


def test_chat_without_key_says_what_to_set(chatchain: Chatchain) -> None:
    result = chatchain(
        "chat", input=lines("hi"), env={"OPENAI_API_KEY": None, "OPENAI_BASE_URL": None}
    )
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: No model endpoint is configured")
    assert "--offline" in result.stderr


def test_chat_offline(chatchain: Chatchain, server: OpenAITestServer) -> None:
    result = chatchain(
        "chat",
        "--offline",
        input=lines("Hi! I'm Bob", "What's my name?"),
        env={"OPENAI_API_KEY": None, "OPENAI_BASE_URL": None},
    )
    assert result.exit_code == 0
    output = result.output.splitlines()
    assert output[0] == "OFFLINE: replies are echoes from chatchain's test server on 127.0.0.1."
    # As in the demo, the echo shows the memory at work: how many earlier messages were sent.
    assert "(echo; I was sent 0 earlier messages) Hi! I'm Bob" in output
    assert "(echo; I was sent 2 earlier messages) What's my name?" in output
    assert server.requests == []


def test_the_default_store_is_in_the_data_folder(chatchain: Chatchain) -> None:
    result = chatchain("chat", "--session", "s", input=lines("hi"), env={"CHATCHAIN_STORE": None})
    assert result.exit_code == 0
    database = chatchain.data_dir / "chat.db"
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    assert stat.S_IMODE(chatchain.data_dir.stat().st_mode) == 0o700
    shown = chatchain("sessions", "show", "s", env={"CHATCHAIN_STORE": None})
    assert shown.output == "you: hi\nassistant: Echo: hi\n"
    assert not Path(chatchain.store_url.removeprefix("sqlite:///")).exists()


def test_the_store_option_wins_over_chatchain_store(chatchain: Chatchain, tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    chatchain("chat", "--store", f"sqlite:///{other}", "--session", "s", input=lines("hi"))
    assert other.exists()
    assert not Path(chatchain.store_url.removeprefix("sqlite:///")).exists()


def test_session_and_new_cannot_go_together(chatchain: Chatchain) -> None:
    result = chatchain("chat", "--session", "s", "--new")
    assert result.exit_code == 2
    assert "--session and --new cannot be used together" in result.stderr


def test_history_shows_the_tool_calls_and_results_of_the_session(chatchain: Chatchain) -> None:
    from tests.cli.test_sessions import tool_exchange

    with chatchain.store() as store:
        store.append("t", tool_exchange())
    result = chatchain("chat", "--session", "t", input=lines("/history", "/exit"))
    assert result.exit_code == 0
    shown = stable(result.output).splitlines()
    start = shown.index("you: Weather and time in Oslo?")
    assert shown[start : start + 9] == [
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
