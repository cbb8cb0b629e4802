"""The API key never shows, and what chatchain writes is private.

A distinctive fake key goes through the real `ChatOpenAI` to the test server, through every
kind of endpoint failure (including a server that echoes the key back in its error, as some
OpenAI-compatible servers do), and must not appear in: the logs of chatchain, openai, httpx
and langchain at DEBUG; the repr or str of the settings, the bot, the chain, the model, the
stores and the ledger; the errors, their chained causes and their tracebacks; exported
sessions; the test server's request log; the usage ledger and report; the CLI's output. The
files chatchain creates (the SQLite database, its -wal and -shm, exports) are 0600 even
under a umask of 0.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatchain import (
    AuthenticationError,
    BadRequestError,
    Chatbot,
    ChatChainError,
    ConfigurationError,
    ContextTooLongError,
    EndpointConnectionError,
    EndpointTimeoutError,
    RateLimitError,
    ServerError,
    Settings,
)
from chatchain.testing import Fault, OpenAITestServer

KEY = "sk-LEAKCHECK-secrets-7f3a9c0b1d2e4f5a6b7c8d9e"
ECHOED = f"Incorrect API key provided: {KEY}. You can find your API key in your settings."
LOGGERS = ["chatchain", "openai", "httpx", "httpx2", "httpcore", "httpcore2", "langchain"]


@pytest.fixture
def server() -> Iterator[OpenAITestServer]:
    with OpenAITestServer() as server:
        yield server


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)  # the root: every library's logger
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def make_settings(base_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_key": KEY,
        "base_url": base_url,
        "model": "gpt-4o-mini",
        "max_retries": 1,
        "timeout": 0.5,
        "store_url": f"sqlite:///{tmp_path / 'chat.db'}",
        "window_turns": 4,
        "window_tokens": 3000,
        "budget_session_tokens": 10**9,
    }
    values.update(overrides)
    return Settings(**values)


def texts_of(error: BaseException) -> str:
    """Everything an error shows: its str and repr, its causes', and the printed traceback."""
    parts = ["".join(traceback.format_exception(error))]
    link: BaseException | None = error
    while link is not None:
        parts += [str(link), repr(link), str(getattr(link, "body", ""))]
        link = link.__cause__ or link.__context__
    return "\n".join(parts)


def assert_no_key(*texts: object) -> None:
    for text in texts:
        assert KEY not in str(text)
        assert KEY[3:] not in str(text)  # not even without its prefix


FAULTS = [
    pytest.param(Fault(status=401), AuthenticationError, id="401"),
    pytest.param(Fault(status=401, message=ECHOED), AuthenticationError, id="401-echoing-the-key"),
    pytest.param(Fault(status=403, message=ECHOED), AuthenticationError, id="403-echoing-the-key"),
    pytest.param(
        Fault(status=400, message=f"Bad request from key {KEY}"),
        BadRequestError,
        id="400-echoing-the-key",
    ),
    pytest.param(
        Fault(status=429, retry_after=0.01, message=ECHOED, times=2),
        RateLimitError,
        id="429-echoing-the-key",
    ),
    pytest.param(
        Fault(status=500, retry_after=0.01, message=ECHOED, times=2), ServerError, id="500"
    ),
    pytest.param(
        Fault(status=400, code="context_length_exceeded", message=ECHOED, times=2),
        ContextTooLongError,
        id="context-length",
    ),
    pytest.param(Fault(delay=2.0, times=2), EndpointTimeoutError, id="timeout"),
    pytest.param(Fault(malformed=True), ServerError, id="malformed"),
]
CASES = [
    *(
        pytest.param(*case.values, stream, id=f"{case.id}-{mode}")
        for case in FAULTS
        for stream, mode in ((False, "chat"), (True, "stream"))
    ),
    pytest.param(Fault(cut_after=2), EndpointConnectionError, True, id="cut-stream"),
]


@pytest.mark.parametrize(("fault", "error", "stream"), CASES)
def test_no_error_of_any_fault_shows_the_key(
    server: OpenAITestServer,
    tmp_path: Path,
    debug_logs: pytest.LogCaptureFixture,
    fault: Fault,
    error: type[ChatChainError],
    stream: bool,
) -> None:
    with Chatbot(make_settings(server.base_url, tmp_path)) as bot:
        server.add_fault(fault)
        with pytest.raises(error) as caught:
            if stream:
                "".join(bot.stream("one two three four five", session_id="s"))
            else:
                bot.chat("one two three four five", session_id="s")
        assert_no_key(texts_of(caught.value), debug_logs.text)
        for record in debug_logs.records:
            assert_no_key(record.getMessage(), record.exc_text or "")


def test_connection_refused_does_not_show_the_key(
    tmp_path: Path, debug_logs: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = make_settings(f"http://127.0.0.1:{port}/v1", tmp_path, max_retries=0)
    with Chatbot(settings) as bot, pytest.raises(EndpointConnectionError) as caught:
        bot.chat("hi", session_id="s")
    assert_no_key(texts_of(caught.value), debug_logs.text)


def test_a_working_bot_shows_the_key_nowhere(
    server: OpenAITestServer, tmp_path: Path, debug_logs: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(server.base_url, tmp_path)
    with Chatbot(settings) as bot:
        reply = bot.chat("hello", session_id="s", user_id="ann")
        streamed = bot.stream("and again", session_id="s", user_id="ann")
        "".join(streamed)
        export = tmp_path / "s.json"
        bot.export_session("s", export)
        report = bot.usage_report(by=["session", "user", "model", "day"])
        shown = [
            repr(settings),
            str(settings),
            settings.model_dump(),
            settings.model_dump_json(),
            repr(bot),
            repr(bot.chain),
            str(bot.chain),
            repr(bot.chain.model),
            bot.chain.model.model_dump(),  # type: ignore[attr-defined]
            repr(bot.store),
            repr(bot.ledger),
            repr(reply),
            reply.message.model_dump_json(),
            repr(streamed.usage),
            bot.usage_entries(),
            str(report),
            report.rows,
            bot.usage(),
            bot.history("s"),
            export.read_text(encoding="utf-8"),
            debug_logs.text,
        ]
        assert_no_key(*shown)
    # The key was sent, and the test server's log keeps it redacted.
    assert len(server.requests) == 2
    for request in server.requests:
        assert request["headers"]["authorization"] == "<redacted>"
    assert_no_key(json.dumps(server.requests))
    # Nor is it written into the store's files.
    for path in tmp_path.iterdir():
        assert KEY.encode() not in path.read_bytes(), path


def test_a_bad_setting_beside_the_key_does_not_show_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("CHATCHAIN_TEMPERATURE", "hot")
    with pytest.raises(ConfigurationError, match="CHATCHAIN_TEMPERATURE") as caught:
        Settings.load(env_file=None)
    assert_no_key(texts_of(caught.value))


# -- the files chatchain writes -------------------------------------------------------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_are_private_even_under_a_permissive_umask(
    server: OpenAITestServer, tmp_path: Path
) -> None:
    old = os.umask(0)
    try:
        db = tmp_path / "new-folder" / "chat.db"
        settings = make_settings(server.base_url, tmp_path, store_url=f"sqlite:///{db}")
        with Chatbot(settings) as bot:
            bot.chat("my secret plans", session_id="s")
            for name in ("chat.db", "chat.db-wal", "chat.db-shm"):
                assert mode_of(db.parent / name) & 0o077 == 0, name
            export = tmp_path / "export.json"
            bot.export_session("s", export)
            assert mode_of(export) & 0o077 == 0
            existing = tmp_path / "existing.json"
            existing.write_text("{}")
            existing.chmod(0o644)
            bot.export_session("s", existing)  # overwritten, and made private
            assert mode_of(existing) & 0o077 == 0
    finally:
        os.umask(old)


# -- the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def cli_env(server: OpenAITestServer, tmp_path: Path) -> dict[str, str]:
    pytest.importorskip("chatchain.cli")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CHATCHAIN_"))}
    env.update(
        OPENAI_API_KEY=KEY,
        OPENAI_BASE_URL=server.base_url,
        CHATCHAIN_MAX_RETRIES="0",
        CHATCHAIN_TIMEOUT="2",
        CHATCHAIN_DATA_DIR=str(tmp_path / "data"),
        CHATCHAIN_STORE=f"sqlite:///{tmp_path / 'cli.db'}",
    )
    return env


def chatchain(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The ``chatchain`` command, as its console script runs it."""
    return subprocess.run(
        [sys.executable, "-c", "from chatchain.cli import main; main()", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow  # runs the command in many processes
def test_the_cli_never_prints_the_key(
    server: OpenAITestServer, cli_env: dict[str, str], tmp_path: Path
) -> None:
    old = os.umask(0)
    try:
        asked = chatchain(cli_env, "ask", "hello there", "--session", "s1", "--debug")
        assert asked.returncode == 0, asked.stderr
        assert asked.stdout.strip() == "Echo: hello there"

        server.add_fault(Fault(status=401, message=ECHOED))
        refused = chatchain(cli_env, "ask", "again", "--session", "s1", "--debug")
        assert refused.returncode == 1
        assert "Traceback" in refused.stderr and "401" in refused.stderr  # --debug shows it all

        export = tmp_path / "s1.json"
        exported = chatchain(cli_env, "sessions", "export", "s1", str(export))
        usage = chatchain(cli_env, "usage", "--by", "session,user,model,day")
    finally:
        os.umask(old)
    for done in (exported, usage):
        assert done.returncode == 0, done.stderr
    assert "Echo: hello there" in export.read_text(encoding="utf-8") and "s1" in usage.stdout
    assert_no_key(
        *(p.stdout + p.stderr for p in (asked, refused, exported, usage)),
        export.read_text(encoding="utf-8"),
    )
    assert mode_of(export) & 0o077 == 0
    for path in tmp_path.glob("cli.db*"):
        assert mode_of(path) & 0o077 == 0, path
