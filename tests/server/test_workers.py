"""Two uvicorn workers, 50 concurrent turns on one session, over SQLite and PostgreSQL:
none lost, duplicated or out of order (each reply follows its own question), and exactly one
ledger entry per turn."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from chatchain import Chatbot, Settings
from chatchain.testing import OpenAITestServer
from tests.server.conftest import start_service
from tests.stores.fixtures_postgres import postgres_url, wipe
from tests.stores.fixtures_redis import redis_url

__all__ = ["postgres_url", "redis_url"]

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
    with Chatbot(Settings(store_url=store_url)) as bot:
        entries = bot.usage_entries(session_id=f"{name}:shared")
    assert len(entries) == TURNS
    assert all(entry.user_id == name for entry in entries)
    # The turns saw each other: the n-th turn's prompt held the n-1 exchanges before it.
    prompts = sorted(entry.prompt_tokens for entry in entries)
    assert len(set(prompts)) == TURNS


# -- kill -9 of a worker mid-stream ------------------------------------------------------------

STORY = " ".join(f"word{i}" for i in range(400))


def _children(pid: int) -> list[int]:
    """The process ids whose parent is ``pid`` (uvicorn's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found


def _connections_to(pid: int, port: int) -> int:
    """Established TCP connections of process ``pid`` to 127.0.0.1:``port``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(
        1
        for fields in (line.split() for line in lines)
        if int(fields[2].split(":")[1], 16) == port and fields[3] == "01" and fields[9] in inodes
    )


def _stream_until_cut(url: str, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    with (
        contextlib.suppress(httpx.HTTPError),
        httpx.stream(
            "POST",
            f"{url}/v1/sessions/story/messages",
            json={"text": "A long story"},
            headers=headers,
            timeout=60,
        ) as answer,
    ):
        for _ in answer.iter_lines():
            pass


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgres"])
def test_a_worker_killed_mid_stream_loses_neither_the_message_nor_the_bill(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if backend == "sqlite":
        store_url = f"sqlite:///{tmp_path / 'chat.db'}"
    else:
        store_url = request.getfixturevalue(f"{backend}_url")
        if backend == "postgres":
            wipe(store_url)
    with OpenAITestServer(chunk_interval=0.02) as endpoint:
        endpoint.queue_replies(STORY)
        service = start_service(store_url, endpoint, tmp_path, workers=2)
        try:
            name, token = service.add_user()
            streamer = threading.Thread(target=_stream_until_cut, args=(service.url, token))
            streamer.start()
            deadline = time.monotonic() + 30
            while not endpoint.requests and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.5)  # mid-reply, a checkpoint of it behind
            port = int(endpoint.base_url.rsplit(":", 1)[1].split("/")[0])
            workers = _children(service.process.pid)
            victim = max(workers, key=lambda pid: _connections_to(pid, port))
            assert _connections_to(victim, port) == 1
            os.kill(victim, signal.SIGKILL)  # a worker of the service this test started
            killed_at = time.monotonic()
            streamer.join(30)
            client = service.client(token)
            answer = client.post("/v1/sessions/story/messages", json={"text": "Still there?"})
            while answer.status_code != 200 and time.monotonic() - killed_at < 60:
                answer = client.post("/v1/sessions/story/messages", json={"text": "Still there?"})
            usable_after = time.monotonic() - killed_at
            history = client.get("/v1/sessions/story/messages").json()["messages"]
        finally:
            service.stop()
        calls = len(endpoint.requests)
    assert answer.status_code == 200, answer.text
    assert [(m["role"], m["interrupted"]) for m in history] == [
        ("user", False),
        ("assistant", True),
        ("user", False),
        ("assistant", False),
    ]
    assert history[0]["text"] == "A long story"
    assert history[1]["text"].startswith("word0 word1")
    with Chatbot(Settings(store_url=store_url)) as bot:
        entries = bot.usage_entries(session_id=f"{name}:story")
    assert len(entries) == calls == 2  # the killed call is in the ledger (estimated)
    assert entries[0].estimated
    assert usable_after < 30  # within the lease (10 s) on a loaded machine
