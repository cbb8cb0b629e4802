"""Closing releases what chatchain opened: `Chatbot.close` (and ``with Chatbot(...)``),
`ChatChain.close`, and the service at shutdown.

Each test opens and closes many bots and counts the process's open file descriptors before and
after: a store's file, the response cache's file (``CHATCHAIN_CACHE``), a connection to the
endpoint left open by one bot would each add one per bot. The closed bots are kept referenced,
so that only closing, not the garbage collector, can release what they held. Redis and
PostgreSQL: tests/stores/test_close_stores.py.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import closing
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from chatchain import Chatbot, ConfigurationError, Settings, create_chat_chain
from chatchain.server import create_app
from chatchain.stores import open_store
from chatchain.testing import FakeChatModel, OpenAITestServer
from chatchain.users import Users
from tests.fds import HAS_FDS, leaked_per_round

pytestmark = pytest.mark.skipif(not HAS_FDS, reason="counts file descriptors in /proc/self/fd")


def settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "store_url": f"sqlite:///{tmp_path / 'store.db'}",
        "cache": f"sqlite:///{tmp_path / 'cache.db'}",
    }
    return Settings.load(
        env_file=None, api_key="sk-test", model="gpt-4o-mini", **{**values, **overrides}
    )


def test_closed_bots_over_a_sqlite_store_and_cache_leave_nothing_open(tmp_path: Path) -> None:
    def round_(index: int) -> Chatbot:
        bot = Chatbot(settings(tmp_path), llm=FakeChatModel(model_name="gpt-4o-mini"))
        assert bot.chat("hi", session_id=f"s{index}").text == "Echo: hi"  # a hit from the 2nd on
        bot.close()
        return bot

    assert leaked_per_round(round_) == 0


def test_bots_used_with_with_close_their_cache_also_when_a_turn_fails(tmp_path: Path) -> None:
    def round_(index: int) -> Chatbot:
        bot = Chatbot(settings(tmp_path), llm=FakeChatModel(errors=[RuntimeError("down")]))
        with pytest.raises(Exception, match="down"), bot:  # the bot closes as the error passes
            bot.chat("hi", session_id=f"s{index}")
        return bot

    assert leaked_per_round(round_) == 0


def test_a_bot_that_cannot_be_built_closes_the_store_it_opened(tmp_path: Path) -> None:
    def round_(index: int) -> object:
        with pytest.raises(ConfigurationError, match="template") as caught:
            Chatbot(settings(tmp_path), llm=FakeChatModel(), system="Unclosed {brace")
        return caught  # its traceback holds the half-built bot, as a logged error would

    assert leaked_per_round(round_) == 0


def test_a_closed_chain_leaves_its_cache_file_closed(tmp_path: Path) -> None:
    def round_(index: int) -> object:
        with create_chat_chain(FakeChatModel(), settings=settings(tmp_path)) as chain:
            config = {"configurable": {"session_id": f"s{index}"}}
            assert chain.invoke({"input": "hi"}, config=config).content == "Echo: hi"
        return chain

    assert leaked_per_round(round_) == 0


def test_bots_on_the_real_chat_model_share_their_connections_to_the_endpoint(
    tmp_path: Path,
) -> None:
    """Every way of calling, sync and on fresh event loops: the endpoint's connections are
    pooled for the process and per loop, not opened per bot."""
    with OpenAITestServer() as server:

        def round_(index: int) -> Chatbot:
            with Chatbot(settings(tmp_path, base_url=server.base_url, cache=None)) as bot:
                session = f"s{index}"
                assert bot.chat(f"one {index}", session_id=session).text
                assert "".join(bot.stream(f"two {index}", session_id=session))
                assert asyncio.run(bot.achat(f"three {index}", session_id=session)).text
            return bot

        assert leaked_per_round(round_) == 0


def test_the_service_closes_its_bot_and_cache_at_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with OpenAITestServer() as server:
        for name, value in {
            "OPENAI_BASE_URL": server.base_url,
            "OPENAI_MODEL": "gpt-4o-mini",
            "CHATCHAIN_STORE": f"sqlite:///{tmp_path / 'store.db'}",
            "CHATCHAIN_CACHE": f"sqlite:///{tmp_path / 'cache.db'}",
            "CHATCHAIN_SERVER_REQUESTS_PER_MINUTE": "0",
        }.items():
            monkeypatch.setenv(name, value)
        with closing(open_store(os.environ["CHATCHAIN_STORE"])) as store:
            token = Users(store).add("ann")

        def round_(index: int) -> object:
            app = create_app()
            with TestClient(app) as client:
                sent = client.post(
                    f"/v1/sessions/s{index}/messages",
                    json={"text": "hi"},
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert sent.status_code == 200, sent.text
            return app

        assert leaked_per_round(round_) == 0
