"""Two uvicorn workers, 50 concurrent turns on one session, over SQLite and PostgreSQL:
none lost, duplicated or out of order (each reply follows its own question), and exactly one
ledger entry per turn."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from chatchain import Chatbot, Settings
from chatchain.testing import OpenAITestServer
from tests.server.conftest import start_service
from tests.stores.fixtures_postgres import postgres_url, wipe

__all__ = ["postgres_url"]

TURNS = 50


async def _turns(url: str, token: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=TURNS)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as c:
        return await asyncio.gather(
            *(c.post("/v1/sessions/shared/messages", json={"text": f"q{i}"}) for i in range(TURNS))
        )


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_two_workers_serialise_fifty_concurrent_turns_on_one_session(
    backend: str, request: pytest.FixtureRequest, endpoint: OpenAITestServer, tmp_path: Path
) -> None:
    if backend == "postgres":
        store_url = request.getfixturevalue("postgres_url")
        wipe(store_url)
    else:
        store_url = f"sqlite:///{tmp_path / 'chat.db'}"
    # 120 requests a minute per user by default: enough for 50 turns and the reads.
    service = start_service(store_url, endpoint, tmp_path, workers=2)
    try:
        name, token = service.add_user()
        answers = asyncio.run(_turns(service.url, token))
        history = service.client(token).get("/v1/sessions/shared/messages").json()["messages"]
    finally:
        service.stop()

    assert [a.status_code for a in answers] == [200] * TURNS
    assert sorted(a.json()["text"] for a in answers) == sorted(f"Echo: q{i}" for i in range(TURNS))
    assert len(history) == 2 * TURNS
    questions = [m["text"] for m in history[0::2]]
    assert sorted(questions) == sorted(f"q{i}" for i in range(TURNS))  # each once
    for question, reply in zip(history[0::2], history[1::2], strict=True):
        assert question["role"] == "user" and reply["role"] == "assistant"
        assert reply["text"] == f"Echo: {question['text']}"  # each reply after its question
    with Chatbot(Settings(store=store_url)) as bot:
        entries = bot.usage_entries(session_id=f"{name}:shared")
    assert len(entries) == TURNS
    assert all(entry.user_id == name for entry in entries)
    # The turns saw each other: the n-th turn's prompt held the n-1 exchanges before it.
    prompts = sorted(entry.prompt_tokens for entry in entries)
    assert len(set(prompts)) == TURNS
