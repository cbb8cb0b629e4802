"""The demo (``chatchain demo``, ``make demo``): what it does, not how it words it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from chatchain import Chatbot, Settings
from chatchain._demo import SESSION, main
from chatchain.cli._commands import cli

QUESTIONS = ["Hi! I'm Bob", "What's my name?", "Tell me a short joke about programmers."]


def _store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    monkeypatch.setenv("CHATCHAIN_STORE", url)  # to look at what the demo kept afterwards
    return url


def test_demo_keeps_the_conversation_and_meters_every_turn(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _store(monkeypatch, tmp_path)
    assert main() == 0
    out = capsys.readouterr().out
    assert "OFFLINE" in out.splitlines()[0]  # no key: it says it talks to the echo server
    with Chatbot(Settings(store_url=store)) as bot:
        history = bot.history(SESSION)
        assert [m.type for m in history] == ["human", "ai"] * 4
        assert [m.text for m in history[0:6:2]] == QUESTIONS
        # Every turn was sent the whole conversation so far (the echo says how much).
        sent = [re.search(r"sent (\d+) earlier", m.text) for m in history[1::2]]
        assert [int(match[1]) if match else None for match in sent] == [0, 2, 4, 6]
        entries = bot.usage_entries(session_id=SESSION)
        assert len(entries) == 4
        assert all(e.prompt_tokens > 0 and e.completion_tokens > 0 for e in entries)
        assert entries[2].first_token_s is not None  # the streamed turn
        total = bot.usage(SESSION)
        assert total.turns == 4 and total.cost_usd is not None and total.cost_usd > 0
    assert SESSION in out.split(QUESTIONS[-1])[-1]  # the ledger's report comes last


def test_chatchain_demo_runs_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    store = _store(monkeypatch, tmp_path)
    result = CliRunner().invoke(cli, ["demo"], catch_exceptions=False)
    assert result.exit_code == 0
    with Chatbot(Settings(store_url=store)) as bot:
        assert bot.sessions() == [SESSION] and bot.usage(SESSION).turns == 4


def test_python_m_chatchain_is_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "chatchain", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    commands = done.stdout.split("Commands:")[1].split()
    assert {"chat", "ask", "sessions", "usage", "demo"} <= set(commands)


def test_demo_reports_a_configuration_error_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CHATCHAIN_TEMPERATURE", "hot")
    assert main() == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "CHATCHAIN_TEMPERATURE" in err
    assert err.count("\n") == 1


def test_make_demo_says_what_it_does_before_each_silent_install() -> None:
    # A dry run (-n) of the setup step, forced (-B): the commands make would run, in order.
    root = Path(__file__).resolve().parent.parent
    steps = subprocess.run(
        ["make", "-n", "-B", "-C", str(root), ".venv/.demo"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    installs = [i for i, step in enumerate(steps) if "pip install --quiet" in step]
    assert installs
    for index in installs:  # each quiet step is announced by the echo just before it
        said = [s for s in steps[:index] if s.startswith("echo ")]
        assert said and "make demo: " in said[-1]
    ready = [
        i for i, step in enumerate(steps) if step.startswith('echo "make demo: .venv is ready')
    ]
    assert ready and ready[0] > installs[-1]
