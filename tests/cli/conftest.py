"""The CLI end to end: click's CliRunner against chatchain's own OpenAI-compatible server.

Every test gets its own SQLite store and data folder under tmp_path, and talks to a test
server started once per module, through the environment (as a user would configure it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from chatchain.cli._commands import cli
from chatchain.stores import HistoryStore, open_store
from chatchain.testing import OpenAITestServer

KEY = "sk-cli-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def module_server() -> Iterator[OpenAITestServer]:
    with OpenAITestServer() as server:
        yield server


@pytest.fixture
def server(module_server: OpenAITestServer) -> OpenAITestServer:
    module_server.clear()
    return module_server


@dataclass
class Chatchain:
    """Runs ``chatchain ARGS`` in this process, configured through the environment."""

    env: dict[str, str | None]
    store_url: str
    data_dir: Path

    def __call__(
        self, *args: str, input: str | None = None, env: dict[str, str | None] | None = None
    ) -> Result:
        runner = CliRunner(env={**self.env, **(env or {})}, catch_exceptions=False)
        return runner.invoke(cli, list(args), input=input)

    @contextmanager
    def store(self) -> Iterator[HistoryStore]:
        """The store the commands used, opened again."""
        store = open_store(self.store_url)
        try:
            yield store
        finally:
            store.close()


@pytest.fixture
def chatchain(server: OpenAITestServer, tmp_path: Path) -> Chatchain:
    store_url = f"sqlite:///{tmp_path / 'chat.db'}"
    env: dict[str, str | None] = {
        "OPENAI_API_KEY": KEY,
        "OPENAI_BASE_URL": server.base_url,
        "CHATCHAIN_STORE": store_url,
        "CHATCHAIN_DATA_DIR": str(tmp_path / "data"),
        "CHATCHAIN_MAX_RETRIES": "0",
        "CHATCHAIN_TIMEOUT": "10",
    }
    return Chatchain(env, store_url, tmp_path / "data")


def stable(text: str) -> str:
    """``text`` with what changes from run to run (latencies, times) replaced by placeholders,
    and without the spaces that pad table cells at the ends of lines."""
    text = re.sub(r"\d+\.\d\d s\b", "T s", text)
    text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d", "DATE", text)
    return "\n".join(line.rstrip() for line in text.splitlines())
