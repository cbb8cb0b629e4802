"""Closing bots over the server stores (Redis, PostgreSQL) and the Redis response cache leaves
no connection open, counted in the process's file descriptors as in tests/test_close.py.
"""

from __future__ import annotations

import asyncio

import pytest

from chatchain import Chatbot, Settings
from chatchain.testing import FakeChatModel
from tests.fds import BOTS, HAS_FDS, leaked_per_round, open_fds

pytestmark = pytest.mark.skipif(not HAS_FDS, reason="counts file descriptors in /proc/self/fd")


def settings(store: str, cache: str | None = None) -> Settings:
    return Settings.load(
        env_file=None, api_key="sk-test", model="gpt-4o-mini", store_url=store, cache=cache
    )


@pytest.mark.parametrize("server", ["redis_url", "postgres_url"])
def test_closed_bots_over_a_server_store_leave_no_connection_open(
    server: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(server)

    def round_(index: int) -> Chatbot:
        with Chatbot(settings(url), llm=FakeChatModel()) as bot:
            assert bot.chat("hi", session_id=f"close-{index}").text == "Echo: hi"
        return bot

    assert leaked_per_round(round_) == 0


def test_closed_bots_close_their_redis_cache_client(redis_url: str) -> None:
    def round_(index: int) -> Chatbot:
        with Chatbot(settings("memory://", cache=redis_url), llm=FakeChatModel()) as bot:
            assert bot.chat("hi", session_id=f"close-{index}").text == "Echo: hi"
        return bot

    assert leaked_per_round(round_) == 0


def test_async_with_closes_the_redis_stores_connections_of_a_loop_that_goes_on(
    redis_url: str,
) -> None:
    """In a notebook or a service the loop outlives the bots: their async connections must
    close with the bot, not with the loop."""

    async def many_bots() -> float:
        kept = []
        async with Chatbot(settings(redis_url), llm=FakeChatModel()) as bot:  # warm-up
            await bot.achat("hi", session_id="close-warm")
        before = open_fds()
        for index in range(BOTS):
            async with Chatbot(settings(redis_url), llm=FakeChatModel()) as bot:
                assert (await bot.achat("hi", session_id=f"close-{index}")).text == "Echo: hi"
            kept.append(bot)
        return (open_fds() - before) / BOTS

    assert asyncio.run(many_bots()) == 0
