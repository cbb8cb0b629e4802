import logging
from pathlib import Path

import pytest

from chatchain import (
    Chatbot,
    ConfigurationError,
    MissingAPIKeyError,
    Settings,
    create_chat_model,
    create_summary_model,
)

SECRET = "sk-live-abcdefghijklmnop0123456789"


def test_defaults_without_environment() -> None:
    settings = Settings.load(env_file=None)
    assert settings.model == "gpt-4o-mini"
    assert settings.api_key is None
    assert settings.max_retries == 2


def test_environment_wins_over_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = tmp_path / ".env"
    env.write_text(
        "OPENAI_API_KEY=sk-from-file\nOPENAI_MODEL=gpt-from-file\nCHATCHAIN_TIMEOUT=12.5\n"
        "CHATCHAIN_MAX_RETRIES=5\nCHATCHAIN_FALLBACK_MODEL=gpt-4o\nOTHER_APP_SETTING=ignored\n"
    )
    monkeypatch.setenv("OPENAI_MODEL", "gpt-from-env")
    settings = Settings.load(env)
    assert settings.model == "gpt-from-env"
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == "sk-from-file"
    assert (settings.timeout, settings.max_retries) == (12.5, 5)
    assert settings.fallback_model == "gpt-4o"


def test_summary_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATCHAIN_SUMMARY_TOKENS", "300")
    monkeypatch.setenv("CHATCHAIN_SUMMARY_MODEL", "gpt-4.1-nano")
    monkeypatch.setenv("CHATCHAIN_MAX_TOKENS", "40")
    settings = Settings.load(env_file=None, api_key="sk-test")
    window = settings.history_window()
    assert window is not None and window.summary_tokens == 300
    model = create_summary_model(settings)
    assert (model.model_name, model.max_tokens) == ("gpt-4.1-nano", 300)  # not the turns' 40
    monkeypatch.setenv("CHATCHAIN_SUMMARY_MAX_TOKENS", "350")
    assert create_summary_model(Settings.load(env_file=None, api_key="sk-test")).max_tokens == 350
    for name in (
        "CHATCHAIN_SUMMARY_TOKENS",
        "CHATCHAIN_SUMMARY_MODEL",
        "CHATCHAIN_SUMMARY_MAX_TOKENS",
    ):
        monkeypatch.delenv(name)
    defaults = Settings.load(env_file=None)
    assert (defaults.summary_tokens, defaults.summary_model, defaults.summary_max_tokens) == (
        500,
        None,
        None,
    )


def test_dotenv_in_the_working_directory_is_read_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("OPENAI_MODEL=gpt-cwd\n")
    monkeypatch.chdir(tmp_path)
    assert Settings.load().model == "gpt-cwd"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CHATCHAIN_TEMPERATURE", "hot"),
        ("CHATCHAIN_TEMPERATURE", "3"),
        ("CHATCHAIN_MAX_RETRIES", "-1"),
        ("CHATCHAIN_TIMEOUT", "0"),
        ("CHATCHAIN_SUMMARY_TOKENS", "0"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with pytest.raises(ConfigurationError, match=name) as info:
        Settings.load(env_file=None)
    assert SECRET not in str(info.value)


def test_key_is_never_shown(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with caplog.at_level(logging.DEBUG):
        settings = Settings.load(env_file=None)
        model = create_chat_model(settings)
        bot = Chatbot(settings)
    for text in (
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        repr(model),
        repr(bot),
        repr(bot.chain),
        caplog.text,
    ):
        assert SECRET not in text


def test_missing_key_says_what_to_set() -> None:
    with pytest.raises(
        MissingAPIKeyError, match=r"OPENAI_API_KEY=sk-\.\.\..*\.env.*OPENAI_BASE_URL"
    ):
        Chatbot(Settings.load(env_file=None))


def test_a_base_url_needs_no_key() -> None:
    settings = Settings(base_url="http://127.0.0.1:11434/v1")
    assert settings.resolved_api_key().get_secret_value() == "not-needed"
    assert Chatbot(settings).settings.base_url == "http://127.0.0.1:11434/v1"
