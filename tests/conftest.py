"""Shared fixtures: a fake chat model and a Chatbot over it, isolated from the user's env."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from chatchain import Chatbot, Settings
from chatchain.chain import ChatChain
from chatchain.testing import FakeChatModel

# Fixtures (and parameters naming a backend) that need a Redis or PostgreSQL server started by
# the test run: `redis_url`, `redis_store`, `postgres_url`, `postgres_store`, the plugins'
# `redis_proc`/`postgresql_proc`, and tests parametrized over backends by name. A test that
# starts a server of its own says so with `@pytest.mark.services`.
_SERVICES = ("redis", "postgres")
_FIXTURES = ("redis_", "postgres_")  # a parameter naming one of their fixtures


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `services` every test that needs the Redis or PostgreSQL servers."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        callspec = getattr(item, "callspec", None)
        params = callspec.params.values() if callspec is not None else ()
        if any(name.startswith(_SERVICES) for name in fixtures) or any(
            isinstance(value, str) and (value in _SERVICES or value.startswith(_FIXTURES))
            for value in params
        ):
            item.add_marker(pytest.mark.services)


@pytest.fixture(autouse=True)
def _close_chains(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close the response cache of every chain a test built (its SQLite engine or Redis
    client), after the test: tests that build a bot with ``CHATCHAIN_CACHE`` and drop it would
    otherwise leave the cache's connection to the garbage collector, and Python 3.13 turns
    that into a ResourceWarning, an error here, raised in whichever test runs then. The
    history store is not closed: it is the test's (or a wider fixture's)."""
    built: list[ChatChain] = []
    init = ChatChain.__init__

    def recording(self: ChatChain, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)  # type: ignore[arg-type]
        built.append(self)

    monkeypatch.setattr(ChatChain, "__init__", recording)
    yield
    for chain in built:
        chain.close()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    # Tests must not read the developer's key or .env: run from an empty directory.
    for name in list(os.environ):
        if name.startswith(("OPENAI_", "CHATCHAIN_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    # Journals of unsaved turns (and the CLI's files) go to a folder of the run's own.
    monkeypatch.setenv("CHATCHAIN_DATA_DIR", str(tmp_path_factory.mktemp("data")))


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
