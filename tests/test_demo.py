import pytest

from chatchain._demo import main


def test_demo_runs_offline_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert main() == 0
    out = capsys.readouterr().out
    assert out.startswith("OFFLINE")
    assert "OPENAI_BASE_URL=http://localhost:11434/v1" in out
    assert "bot> (echo; I was sent 2 earlier messages) What's my name?" in out
    assert "first token" in out
    assert "Session 'dp123': 8 messages stored, 4 turns" in out
    report = out.split("The usage ledger, by session and model:")[1].splitlines()
    assert any(
        line.startswith("dp123") and "gpt-4o-mini" in line and "$" in line for line in report
    )
    assert report[-1].startswith("TOTAL")


def test_demo_reports_a_configuration_error_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CHATCHAIN_TEMPERATURE", "hot")
    assert main() == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Invalid chatchain settings: CHATCHAIN_TEMPERATURE")
    assert err.count("\n") == 1
