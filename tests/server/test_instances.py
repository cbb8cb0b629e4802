"""Two ``chatchain serve`` instances over one store: one killed (``kill -9``) mid-stream loses
nothing its user sent, and the session goes on at once on the other.

Each instance is its own ``chatchain serve`` process (one worker), as on two machines; they
share one real PostgreSQL or Redis. The model is an `OpenAITestServer` streaming a word every
20 ms. The stream runs on instance A until A is killed; the next turn on the session goes to
instance B, which must take the session (the killed holder's lock: PostgreSQL drops a dead
connection's advisory lock, Redis lets its lease run out) and store the killed turn first:
the user's message, the reply so far marked interrupted (``crashed``), and its bill.
"""

from __future__ import annotations

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
from tests.server.conftest import Service, start_service
from tests.stores.fixtures_postgres import postgres_url, wipe
from tests.stores.fixtures_redis import redis_url

__all__ = ["postgres_url", "redis_url"]

STORY = " ".join(f"word{i}" for i in range(600))


def stream_until_cut(url: str, token: str, session: str, text: str) -> None:
    """Stream a turn's reply until the server ends it or goes away."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    with (
        contextlib.suppress(httpx.HTTPError),
        httpx.stream(
            "POST",
            f"{url}/v1/sessions/{session}/messages",
            json={"text": text},
            headers=headers,
            timeout=60,
        ) as answer,
    ):
        for _ in answer.iter_lines():
            pass


def wait_for(condition: object, seconds: float, what: str) -> None:
    """Wait until ``condition()`` is true, failing after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"Timed out after {seconds} s waiting for {what}")
        time.sleep(0.05)


def store_url_of(backend: str, request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{backend}_url")
    if backend == "postgres":
        wipe(url)
    else:
        import redis

        with redis.Redis.from_url(url) as client:
            client.flushdb()
    return url


def kill(service: Service) -> None:
    """``kill -9`` of the instance this test started (no chance to release or store anything)."""
    os.kill(service.process.pid, signal.SIGKILL)
    service.process.wait(10)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgres", "redis"])
def test_an_instance_killed_mid_stream_loses_nothing_and_the_other_goes_on(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    store_url = store_url_of(backend, request)
    with OpenAITestServer(chunk_interval=0.02) as endpoint:
        first = start_service(store_url, endpoint, tmp_path)
        second = start_service(store_url, endpoint, tmp_path)
        try:
            name, token = first.add_user(daily_usd=5.0)  # with a budget: the turn holds some
            client = second.client(token)
            warm = client.post("/v1/sessions/warm/messages", json={"text": "Hi"})  # B's first turn
            assert warm.status_code == 200, warm.text
            endpoint.queue_replies(STORY)
            streamer = threading.Thread(
                target=stream_until_cut, args=(first.url, token, "story", "A long story")
            )
            streamer.start()
            wait_for(lambda: len(endpoint.requests) == 2, 30, "the stream's call")
            time.sleep(2.5)  # mid-reply, with a checkpoint of it behind (every second)
            kill(first)
            killed_at = time.monotonic()
            streamer.join(30)
            assert not streamer.is_alive()
            answer = client.post("/v1/sessions/story/messages", json={"text": "Still there?"})
            usable_after = time.monotonic() - killed_at
            history = client.get("/v1/sessions/story/messages").json()["messages"]
        finally:
            first.stop()
            second.stop()
        calls = len(endpoint.requests)
    print(f"{backend}: the session was usable on the other instance {usable_after:.2f} s later")
    assert answer.status_code == 200, answer.text
    assert [(m["role"], m["interrupted"]) for m in history] == [
        ("user", False),
        ("assistant", True),
        ("user", False),
        ("assistant", False),
    ]
    assert history[0]["text"] == "A long story"
    assert history[1]["text"].startswith("word0 word1")
    assert history[2]["text"] == "Still there?"
    with Chatbot(Settings(store_url=store_url)) as bot:
        entries = bot.usage_entries(session_id=f"{name}:story")
    assert len(entries) == calls - 1 == 2  # the killed call is billed (estimated), once
    assert entries[0].estimated and entries[0].completion_tokens > 0
    assert usable_after < 15  # Redis: within the lock's lease (10 s); PostgreSQL: at once
