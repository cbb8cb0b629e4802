"""``chatchain serve``: its defaults, ``--offline``, and what it refuses before starting."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from chatchain.cli._commands import cli
from tests.server.conftest import start_service


def test_it_binds_loopback_port_8000_and_one_worker_by_default() -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"])

    assert result.exit_code == 0
    assert "--host TEXT" in result.output and "[default: 127.0.0.1]" in result.output
    assert "[default: 8000;" in result.output and "[default: 1;" in result.output


def test_help_names_the_chat_page_and_its_address() -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"])

    assert "Serve the chat page" in result.output
    assert "http://127.0.0.1:8000/" in result.output


def test_several_workers_over_a_memory_store_are_refused_with_what_to_do(
    tmp_path: Path,
) -> None:
    result = CliRunner().invoke(cli, ["serve", "--workers", "2", "--store", "memory://"])

    assert result.exit_code == 1
    assert "--workers above 1 need a store the workers share" in result.output
    assert "sqlite:///" in result.output


def test_a_tools_module_that_fails_to_import_stops_serve_with_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("raise ValueError('not today')\n")

    result = CliRunner().invoke(
        cli, ["serve", "--store", f"sqlite:///{tmp_path / 'chat.db'}", "--tools", str(broken)]
    )

    assert result.exit_code == 1
    assert result.output.startswith("error: --tools ")
    assert "not today" in result.output and "Traceback" not in result.output


def test_a_store_it_cannot_open_is_one_error_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["serve", "--store", "nosuch://x"])

    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "Traceback" not in result.output


def test_a_var_the_prompt_does_not_have_is_refused_before_starting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # In this process; tests/server/test_service_edges.py runs the same refusal as a process.
    monkeypatch.setenv("CHATCHAIN_SYSTEM_PROMPT", "Answer in {language}.")
    store = f"sqlite:///{tmp_path / 'chat.db'}"

    result = CliRunner().invoke(cli, ["serve", "--store", store, "--var", "tone=x"])

    assert result.exit_code == 1
    assert result.output.startswith("error: --var tone: the system prompt")
    assert "has no {tone}; its variables are language." in result.output
    assert not (tmp_path / "chat.db").exists()  # refused before the store was opened


@pytest.mark.slow
def test_offline_it_answers_with_the_echo_server_and_needs_no_key(tmp_path: Path) -> None:
    service = start_service(f"sqlite:///{tmp_path / 'chat.db'}", None, tmp_path)
    try:
        _, token = service.add_user()
        client = service.client(token)
        first = client.post("/v1/sessions/s/messages", json={"text": "I'm Bob"}).json()
        second = client.post("/v1/sessions/s/messages", json={"text": "Who am I?"}).json()
    finally:
        service.stop()

    assert "I'm Bob" in first["text"]
    assert second["text"] == "(echo; I was sent 2 earlier messages) Who am I?"  # the memory
    assert "OFFLINE" in service.log.read_text()
    port = service.url.rsplit(":", 1)[1]
    assert f"Chat page: http://127.0.0.1:{port}/" in service.log.read_text()
