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


def test_missing_key_says_what_to_set_at_the_first_turn() -> None:
    bot = Chatbot(Settings.load(env_file=None))  # sessions and usage need no key
    with pytest.raises(
        MissingAPIKeyError, match=r"OPENAI_API_KEY=sk-\.\.\..*\.env.*OPENAI_BASE_URL"
    ):
        bot.chat("hi")


def test_a_base_url_needs_no_key() -> None:
    settings = Settings(base_url="http://127.0.0.1:11434/v1")
    assert settings.resolved_api_key().get_secret_value() == "not-needed"
    assert Chatbot(settings).settings.base_url == "http://127.0.0.1:11434/v1"


@pytest.mark.parametrize("where", ["environment", ".env"])
@pytest.mark.parametrize("value", ["{bad", "[1, 2", '{"my-model": '])
def test_malformed_prices_name_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, value: str
) -> None:
    env = tmp_path / ".env"
    if where == "environment":
        monkeypatch.setenv("CHATCHAIN_PRICES", value)
    else:
        env.write_text(f"CHATCHAIN_PRICES='{value}'\n")
    with pytest.raises(ConfigurationError, match="CHATCHAIN_PRICES is not valid JSON") as info:
        Settings.load(env)
    assert info.value.__cause__ is None


# -- a misspelt variable is refused, never ignored ----------------------------------------------


def test_a_misspelt_budget_in_the_environment_is_refused_with_the_closest_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHATCHAIN_BUDGET_SESION_USD", "0.0000001")
    with pytest.raises(ConfigurationError) as info:
        Settings.load(env_file=None)
    message = str(info.value)
    assert "CHATCHAIN_BUDGET_SESION_USD (in the environment)" in message
    assert "Did you mean CHATCHAIN_BUDGET_SESSION_USD?" in message
    # Not only through load(): however the settings are made, the typo cannot drop the cap.
    with pytest.raises(ConfigurationError, match="CHATCHAIN_BUDGET_SESION_USD"):
        Settings()
    with pytest.raises(ConfigurationError, match="CHATCHAIN_BUDGET_SESION_USD"):
        Chatbot(env_file=None)


def test_a_misspelt_variable_in_dotenv_is_refused_with_the_file(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("OPENAI_MODEL=gpt-4o\nchatchain_window_turn=3\nOTHER_APP_SETTING=fine\n")
    with pytest.raises(ConfigurationError) as info:
        Settings.load(env)
    assert f"chatchain_window_turn (in {env})" in str(info.value)
    assert "Did you mean CHATCHAIN_WINDOW_TURNS?" in str(info.value)


def test_an_unknown_name_far_from_every_setting_is_refused_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHATCHAIN_XYZZY", "1")
    with pytest.raises(
        ConfigurationError, match="Unknown chatchain setting CHATCHAIN_XYZZY"
    ) as info:
        Settings.load(env_file=None)
    assert "Did you mean" not in str(info.value)


def test_settings_in_any_case_and_chatchains_other_variables_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("CHATCHAIN_DATA_DIR", "CHATCHAIN_REDIS_URL", "CHATCHAIN_POSTGRES_URL"):
        monkeypatch.setenv(name, "set by the CLI, notebooks or tests")
    monkeypatch.setenv("chatchain_budget_session_usd", "2.5")
    env = tmp_path / ".env"
    env.write_text("CHATCHAIN_WINDOW_TURNS=3\nCHATCHAIN_DATA_DIR=/tmp/chatchain\n")
    settings = Settings.load(env)
    assert (settings.budget_session_usd, settings.window_turns) == (2.5, 3)
    assert Settings.load(env_file=None).budget_session_usd == 2.5


# -- the store's password is never shown --------------------------------------------------------

STORE_SECRET = "pgS3cretPW"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            f"postgresql://att:{STORE_SECRET}@db.example:5432/chat",
            "postgresql://att@db.example:5432/chat",
        ),
        (
            f"postgresql://att@db.example/chat?password={STORE_SECRET}&sslmode=require",
            "postgresql://att@db.example/chat",
        ),
        (f"redis://:{STORE_SECRET}@cache.example:6379/0", "redis://cache.example:6379/0"),
    ],
)
def test_the_store_password_is_not_in_the_repr_or_the_dumps(url: str, shown: str) -> None:
    settings = Settings(store_url=url)
    for text in (
        repr(settings),
        str(settings),
        str(settings.model_dump()),
        settings.model_dump_json(),
    ):
        assert STORE_SECRET not in text
        assert shown in text
    assert settings.model_dump()["store_url"] == shown
    assert settings.store_url == url  # the real URL, for the code that connects


def test_a_store_without_a_secret_is_shown_as_it_is() -> None:
    for url in ("memory://", "sqlite:///tmp/chat.db", "redis://localhost:6379/0"):
        assert Settings(store_url=url).model_dump()["store_url"] == url
