"""LangChain's own standard tests of chat models (``langchain-tests``'
``ChatModelIntegrationTests``), run with ``ChatOpenAI`` and its default capability flags
against a real ``chatchain serve --offline`` (uvicorn, over loopback), and the same class
straight against the package's test server, `OpenAITestServer` (as ``serve --offline`` runs
it: ``memory_echo_reply``), as the baseline.

What passes straight against the test server passes through chatchain (32 tests): forced
``tool_choice``, tool calls without arguments, tool message histories and error statuses,
structured output (json_schema, function calling, few-shot), streaming with usage, batches,
message names. What fails both ways (6 tests) needs a real model: one that reads arguments out
of the question or chooses a tool unforced; those are skipped here in both classes alike, each
with its reason (`NEED_A_MODEL`). The rest the library skips itself (inputs of other kinds,
JSON mode, model overrides and recorded benchmarks, which ChatOpenAI's default flags leave off).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import ChatModelIntegrationTests

from chatchain.testing import OpenAITestServer, memory_echo_reply
from tests.server.conftest import start_service

MODEL = "gpt-4o-mini"

pytestmark = [
    pytest.mark.slow,  # a real `chatchain serve` (uvicorn) for the class through chatchain
    # Warnings LangChain gives about what these tests do on purpose (pydantic.v1 schemas, a
    # parsed instance in a field typed None while a run is traced); not chatchain's.
    pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning"),
    pytest.mark.filterwarnings("ignore:Received a Pydantic BaseModel V1 schema:UserWarning"),
]

# Each fails against the test server as it fails through chatchain: they need a model that
# understands what it is asked. (The test server calls a tool only when tool_choice forces it,
# or a rule of the test says so, with arguments made to fit the tool's schema.)
_READS_ARGUMENTS = (
    "the model must read the tool's argument (3) from the question; the test server makes "
    "arguments that only fit the schema"
)
NEED_A_MODEL = {
    "test_tool_calling": _READS_ARGUMENTS,
    "test_tool_calling_async": _READS_ARGUMENTS,
    "test_agent_loop": (
        "the model must choose to call the weather tool unforced, then answer from its result"
    ),
    "test_unicode_tool_call_integration": (
        "the model must copy '你好' from the question into the arguments; the test server "
        "fills strings with 'text'"
    ),
}


def _skip_if_it_needs_a_model(request: pytest.FixtureRequest) -> None:
    reason = NEED_A_MODEL.get(request.node.originalname)
    if reason is not None:
        pytest.skip(f"needs a real model: {reason}")


class _Standard(ChatModelIntegrationTests):
    base_url = ""
    api_key = ""

    @property
    def chat_model_class(self) -> type[ChatOpenAI]:
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # stream_usage: asked for, as ChatOpenAI does by itself only for OpenAI's own URL.
        # An async HTTP client per model (each test has its own): ChatOpenAI's default is one
        # per endpoint for the process, bound to the event loop of the test that used it first.
        # It keeps no connection open, so that none is left to a closed loop either.
        return {
            "model": MODEL,
            "base_url": self.base_url,
            "api_key": self.api_key,
            "stream_usage": True,
            "http_async_client": httpx.AsyncClient(
                timeout=60, limits=httpx.Limits(max_keepalive_connections=0)
            ),
        }

    @pytest.fixture(autouse=True)
    def _needs_a_model(self, request: pytest.FixtureRequest) -> None:
        _skip_if_it_needs_a_model(request)


class TestThroughChatchain(_Standard):
    """``ChatOpenAI`` → ``chatchain serve --offline`` → its echo server."""

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _served(cls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
        folder = tmp_path_factory.mktemp("standard")
        service = start_service(f"sqlite:///{folder / 'chat.db'}", None, folder)
        try:
            _, token = service.add_user()
            cls.base_url, cls.api_key = f"{service.url}/v1", token
            yield
        finally:
            service.stop()


class TestTestServerDirectly(_Standard):
    """The baseline: ``ChatOpenAI`` → the test server, as ``serve --offline`` runs it."""

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _served(cls) -> Iterator[None]:
        with OpenAITestServer(reply=memory_echo_reply, model=MODEL) as server:
            cls.base_url, cls.api_key = server.base_url, "test"
            yield
