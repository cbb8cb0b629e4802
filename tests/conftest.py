"""Shared fixtures: a fake chat model and a Chatbot over it, isolated from the user's env."""

from __future__ import annotations

import os

import pytest

from chatchain import Chatbot, Settings
from chatchain.testing import FakeChatModel


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    # Tests must not read the developer's key or .env: run from an empty directory.
    for name in list(os.environ):
        if name.startswith(("OPENAI_", "CHATCHAIN_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture
def settings() -> Settings:
    # The whole history is sent, as in the plain chain; window tests set their own.
    return Settings(
        api_key="sk-test-0123456789abcdef",
        model="gpt-4o-mini",
        lock_timeout=5.0,
        window_turns=None,
        window_tokens=None,
        summarize=False,
    )


@pytest.fixture
def fake() -> FakeChatModel:
    return FakeChatModel(model_name="gpt-4o-mini")


@pytest.fixture
def bot(settings: Settings, fake: FakeChatModel) -> Chatbot:
    return Chatbot(
        settings,
        llm=fake,
        system="You are a {role}. Answer in {language}.",
        prompt_vars={"role": "helpful assistant", "language": "English"},
    )
