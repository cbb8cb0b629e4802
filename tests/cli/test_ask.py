"""``chatchain ask``: one turn for scripts and pipes; errors as one line and exit codes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chatchain._money import format_usd
from chatchain.cli._setup import load_settings
from chatchain.testing import Fault, OpenAITestServer
from tests.cli.conftest import KEY, Chatchain

USAGE_LINE = re.compile(
    r"session (\w+), (\d+) tokens \((\d+) prompt \+ (\d+) completion\), "
    r"(\$\d+\.\d+|cost unknown), \d+\.\d\d s\n"
)


def test_ask_prints_the_whole_reply_to_a_pipe_and_stores_the_turn(
    chatchain: Chatchain, server: OpenAITestServer
) -> None:
    result = chatchain("ask", "Hi! I'm Bob")
    assert result.exit_code == 0
    assert result.stdout == "Echo: Hi! I'm Bob\n"
    assert server.requests[0]["body"].get("stream") is not True  # stdout is no terminal
    line = USAGE_LINE.fullmatch(result.stderr)
    assert line is not None, result.stderr
    session, total, prompt, completion, cost = line.groups()
    with chatchain.store() as store:
        assert store.sessions() == [session]
        assert [(m.type, m.text) for m in store.load(session)] == [
            ("human", "Hi! I'm Bob"),
            ("ai", "Echo: Hi! I'm Bob"),
        ]
        [entry] = store.usage_entries(session_id=session)
    assert (entry.prompt_tokens, entry.completion_tokens, entry.total_tokens) == (
        int(prompt),
        int(completion),
        int(total),
    )
    assert entry.cost_usd is not None and cost == format_usd(entry.cost_usd)


def test_ask_reads_the_question_from_stdin(chatchain: Chatchain) -> None:
    result = chatchain("ask", "-", input="What is 2+2?\n")
    assert result.exit_code == 0
    assert result.stdout == "Echo: What is 2+2?\n"


def test_each_ask_is_a_new_session_unless_one_is_given(
    chatchain: Chatchain, server: OpenAITestServer
) -> None:
    chatchain("ask", "one")
    chatchain("ask", "two")
    chatchain("ask", "--session", "s1", "three")
    assert chatchain("ask", "--session", "s1", "four").stdout == "Echo: four\n"
    assert [len(r["body"]["messages"]) for r in server.requests] == [2, 2, 2, 4]
    with chatchain.store() as store:
        assert len(store.sessions()) == 3
        assert [m.text for m in store.load("s1")] == ["three", "Echo: three", "four", "Echo: four"]


def test_continue_asks_in_the_latest_session(
    chatchain: Chatchain, server: OpenAITestServer
) -> None:
    first = chatchain("ask", "--continue", "Hi! I'm Bob")  # no session yet: a new one
    second = chatchain("ask", "-c", "What's my name?")
    assert (first.exit_code, second.exit_code) == (0, 0)
    session = USAGE_LINE.fullmatch(first.stderr)
    assert session is not None
    assert f"session {session[1]}," in second.stderr
    assert [len(r["body"]["messages"]) for r in server.requests] == [2, 4]
    chatchain("ask", "--session", "other", "elsewhere")
    assert chatchain("ask", "-c", "again").exit_code == 0  # "other" is now the latest
    with chatchain.store() as store:
        assert sorted(store.sessions()) == sorted([session[1], "other"])
        assert [m.text for m in store.load("other")][::2] == ["elsewhere", "again"]
        assert [m.text for m in store.load(session[1])][::2] == ["Hi! I'm Bob", "What's my name?"]


def test_continue_and_session_together_is_a_usage_error(chatchain: Chatchain) -> None:
    result = chatchain("ask", "-c", "--session", "s1", "hi")
    assert result.exit_code == 2
    assert "--session and --continue cannot be used together" in result.stderr


def test_offline_echo_shows_the_memory(chatchain: Chatchain) -> None:
    offline = {"OPENAI_API_KEY": None, "OPENAI_BASE_URL": None}
    chatchain("ask", "--offline", "--session", "s", "Hi! I'm Bob", env=offline)
    result = chatchain("ask", "--offline", "--session", "s", "What's my name?", env=offline)
    assert result.stdout == "(echo; I was sent 2 earlier messages) What's my name?\n"


def test_options_reach_the_request_and_the_ledger(
    chatchain: Chatchain, server: OpenAITestServer
) -> None:
    result = chatchain(
        "ask",
        "bonjour",
        "--model",
        "my-local-model",
        "--system",
        "Answer in {language}.",
        "--var",
        "language=French",
        "--temperature",
        "0.2",
        "--user",
        "bob",
    )
    assert result.exit_code == 0, result.output
    body = server.requests[0]["body"]
    assert (body["model"], body["temperature"]) == ("my-local-model", 0.2)
    assert body["messages"][0] == {"role": "system", "content": "Answer in French."}
    assert "cost unknown" in result.stderr  # a model without a price is never $0
    with chatchain.store() as store:
        [entry] = store.usage_entries(user_id="bob")
    assert (entry.model, entry.cost_usd) == ("my-local-model", None)


def test_env_file_is_read(chatchain: Chatchain, server: OpenAITestServer, tmp_path: Path) -> None:
    env_file = tmp_path / "local.env"
    env_file.write_text("OPENAI_MODEL=model-from-env-file\n")
    assert chatchain("ask", "hi", "--env-file", str(env_file)).exit_code == 0
    assert server.requests[0]["body"]["model"] == "model-from-env-file"


def test_a_missing_prompt_variable_is_one_line(
    chatchain: Chatchain, server: OpenAITestServer
) -> None:
    result = chatchain("ask", "hi", "--system", "Answer in {language}.")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1
    assert "language" in result.stderr
    assert server.requests == []


def test_an_endpoint_error_is_one_line_and_exit_1(
    chatchain: Chatchain, server: OpenAITestServer
) -> None:
    server.add_fault(Fault(status=401, message=f"Incorrect API key provided: {KEY}."))
    result = chatchain("ask", "hi")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1
    assert "OPENAI_API_KEY" in result.stderr  # the library's advice
    assert KEY not in result.output
    with chatchain.store() as store:
        assert store.sessions() == []  # a failed turn stores nothing


def test_a_gateways_message_of_several_lines_is_still_one_line(
    chatchain: Chatchain, server: OpenAITestServer
) -> None:
    message = "upstream connect error\n  reset reason: overflow\r\n\n<html>Bad gateway</html>\n"
    server.add_fault(Fault(status=502, message=message))
    result = chatchain("ask", "hi")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1
    assert "upstream connect error reset reason: overflow <html>Bad gateway</html>. Try" in (
        result.stderr
    )


def test_a_misspelt_variable_is_refused_in_one_line(
    chatchain: Chatchain, server: OpenAITestServer
) -> None:
    result = chatchain("ask", "hi", env={"CHATCHAIN_BUDGET_SESION_USD": "0.0000001"})
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert "CHATCHAIN_BUDGET_SESION_USD" in result.stderr
    assert "Did you mean CHATCHAIN_BUDGET_SESSION_USD?" in result.stderr
    assert server.requests == []  # refused before anything was sent


def test_options_keep_the_stores_real_url(monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings dumps show the store without its password; the options must not lose it.
    url = "postgresql://att:pgS3cretPW@db.example/chat"
    monkeypatch.setenv("CHATCHAIN_STORE", url)
    settings = load_settings(None, {"model": "gpt-4o", "temperature": 0.1})
    assert (settings.store_url, settings.model) == (url, "gpt-4o")
    assert "pgS3cretPW" not in repr(settings)


def test_debug_shows_the_traceback_but_never_the_key(
    chatchain: Chatchain, server: OpenAITestServer
) -> None:
    server.add_fault(Fault(status=401, message=f"Incorrect API key provided: {KEY}."))
    result = chatchain("ask", "hi", "--debug")
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "chatchain.errors.AuthenticationError" in result.stderr
    assert "openai.AuthenticationError" in result.stderr  # the cause, whose text held the key
    assert KEY not in result.output


def test_without_key_or_base_url_it_says_what_to_set(chatchain: Chatchain) -> None:
    result = chatchain("ask", "hi", env={"OPENAI_API_KEY": None, "OPENAI_BASE_URL": None})
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    for advice in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "--offline"):
        assert advice in result.stderr


def test_offline_talks_to_the_echo_server_and_says_so(
    chatchain: Chatchain, server: OpenAITestServer
) -> None:
    result = chatchain(
        "ask", "--offline", "hi", env={"OPENAI_API_KEY": None, "OPENAI_BASE_URL": None}
    )
    assert result.exit_code == 0
    assert result.stdout == "(echo; I was sent 0 earlier messages) hi\n"
    assert result.stderr.startswith("OFFLINE: replies are echoes from chatchain's test server")
    assert server.requests == []


def test_offline_ignores_the_configured_endpoint(
    chatchain: Chatchain, server: OpenAITestServer
) -> None:
    result = chatchain("ask", "--offline", "hi")
    assert result.stdout == "(echo; I was sent 0 earlier messages) hi\n"
    assert server.requests == []


def test_a_budget_refusal_is_shown_as_its_message(
    chatchain: Chatchain, server: OpenAITestServer
) -> None:
    result = chatchain("ask", "hi", env={"CHATCHAIN_BUDGET_SESSION_TOKENS": "5"})
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1
    assert "CHATCHAIN_BUDGET_SESSION_TOKENS" in result.stderr
    assert server.requests == []  # refused before anything was sent


def test_a_bad_option_value_is_a_configuration_error(
    chatchain: Chatchain, server: OpenAITestServer
) -> None:
    result = chatchain("ask", "hi", "--temperature", "5")
    assert result.exit_code == 1
    assert result.stderr == (
        "error: Invalid option --temperature: Input should be less than or equal to 2.\n"
    )
    assert server.requests == []


@pytest.mark.parametrize(
    "args",
    [
        ["ask"],
        ["ask", "hi", "--var", "language"],
        ["ask", "hi", "--temperature", "warm"],
        ["ask", "hi", "--env-file", "missing.env"],
    ],
)
def test_usage_errors_exit_2(chatchain: Chatchain, args: list[str]) -> None:
    result = chatchain(*args)
    assert result.exit_code == 2
    assert "Usage: " in result.stderr


@pytest.mark.slow  # runs the installed script
def test_the_installed_script_reports_an_error_in_exactly_one_line(
    chatchain: Chatchain, server: OpenAITestServer
) -> None:
    # In a process of its own, where no test harness catches the library's log records.
    server.add_fault(Fault(status=401))
    env = {**os.environ, **{k: v for k, v in chatchain.env.items() if v is not None}}
    script = Path(sys.executable).with_name("chatchain")
    result = subprocess.run(
        [script, "ask", "hi"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("error: The endpoint refused the API key")
    assert result.stderr.count("\n") == 1
