"""End to end: stopping `Chatbot.astream` (cancel or ``aclose``) always keeps the turn.

The real `ChatOpenAI` over loopback, streaming fast, stopped at many different moments: each
time the history must hold the user's message and the partial reply, marked interrupted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from langchain_core.messages import AIMessage, HumanMessage

from chatchain import Chatbot, Settings
from chatchain.testing import OpenAITestServer

LOOPS = 60
WORDS = " ".join(f"w{i}" for i in range(400))


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAITestServer]:
    with OpenAITestServer(chunk_words=1) as server:
        yield server


# The model from the settings keeps langchain-openai's per-chunk timeout: an asyncio.wait_for
# around each chunk read, which on Python 3.11 can return the chunk and drop a cancellation.
@pytest.fixture
def bot(server: OpenAITestServer) -> Iterator[Chatbot]:
    server.clear()
    settings = Settings(
        api_key="sk-e2e-secret-0123456789abcdef",
        base_url=server.base_url,
        model="gpt-4o-mini",
        max_retries=0,
        timeout=5.0,
    )
    with Chatbot(settings) as bot:
        yield bot


def _lost_turns(bot: Chatbot, loops: int) -> list[str]:
    """Stop ``loops`` streams at varied moments; describe each whose turn was not kept."""

    async def stop_one(session_id: str, after: int, spins: int, by_aclose: bool) -> bool:
        pieces = 0
        enough = asyncio.Event()

        async def read() -> None:
            nonlocal pieces
            async with bot.astream(WORDS, session_id=session_id) as stream:
                async for _ in stream:
                    pieces += 1
                    if pieces >= after:
                        if by_aclose:
                            return  # __aexit__ closes the stream
                        enough.set()

        task = asyncio.create_task(read())
        if by_aclose:
            await task
            return True
        await enough.wait()
        for _ in range(spins):  # cancel at a different point of the chunk reads each loop
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.wait({task})
        return task.cancelled()  # not run on to the end as if never cancelled

    async def run() -> list[str]:
        lost: list[str] = []
        for i in range(loops):
            session_id = f"s{i}"
            stopped = await stop_one(session_id, after=1 + i % 7, spins=i % 5, by_aclose=i % 6 == 5)
            history = bot.history(session_id)
            kept = (
                stopped
                and len(history) == 2
                and isinstance(history[0], HumanMessage)
                and history[0].text == WORDS
                and isinstance(history[1], AIMessage)
                and history[1].response_metadata.get("interrupted") is True
                and 0 < len(history[1].text) < len(f"Echo: {WORDS}")
            )
            if not kept:
                lost.append(f"{session_id}: {[(m.type, m.response_metadata) for m in history]}")
        return lost

    return asyncio.run(run())


# Separate and older than this fix: on Python 3.11 a cancelled read can leave one of httpx's
# stream generators marked running, and its finalizer then reports "async generator already
# executing" (about 1 run of 4 here, before and after the fix). Not what this test measures.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_stopped_stream_always_keeps_the_message_and_the_partial_reply(bot: Chatbot) -> None:
    lost = _lost_turns(bot, LOOPS)
    assert lost == [], f"{len(lost)} of {LOOPS} stopped turns not kept: {lost[:3]}"
