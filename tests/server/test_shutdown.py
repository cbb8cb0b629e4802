"""SIGTERM: ``chatchain serve`` drains, finishes its turns within the grace, stores the rest.

A real ``chatchain serve`` (uvicorn) streams two replies from an `OpenAITestServer` sending a
word every 50 ms: a short one that ends within the shutdown grace, and a long one that
cannot. On SIGTERM, ``/healthz`` says draining while requests are still served (the drain
delay), then new connections are refused; the short stream ends as usual (its whole reply
stored), the long one is stopped at the grace's end (its reply so far stored, marked
interrupted), both billed, and the process exits.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatchain import Chatbot, Settings
from chatchain.testing import Fault, OpenAITestServer
from tests.server.conftest import events, start_service
from tests.server.test_instances import wait_for

SHORT = " ".join(f"short{i}" for i in range(100))  # 5 s at 50 ms a word
LONG = " ".join(f"long{i}" for i in range(1000))  # 50 s
DELAY, GRACE = 3.0, 4.0


def stream(url: str, token: str, session: str, seen: list[tuple[str, Any]]) -> None:
    """Stream a turn, keeping its events in ``seen`` (until the server ends or cuts it)."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    try:
        with httpx.stream(
            "POST",
            f"{url}/v1/sessions/{session}/messages",
            json={"text": f"Tell me the {session} one"},
            headers=headers,
            timeout=60,
        ) as answer:
            seen.extend(events(answer))
    except httpx.HTTPError as exc:
        seen.append(("cut", type(exc).__name__))


def refused(url: str) -> bool:
    """Whether a new connection is refused (not accepted and left waiting)."""
    try:
        httpx.get(f"{url}/healthz", timeout=1)
    except httpx.ConnectError:
        return True
    except httpx.TimeoutException:
        return False
    return False


def draining(url: str) -> bool:
    return httpx.get(f"{url}/healthz", timeout=5).status_code == 503


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_finishes_streams_within_the_grace_and_stores_the_rest(
    workers: int, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'chat.db'}"
    args = ["--drain-delay", str(DELAY), "--shutdown-grace", str(GRACE)]
    with OpenAITestServer(chunk_interval=0.05) as endpoint:
        service = start_service(store_url, endpoint, tmp_path, workers=workers, args=args)
        try:
            name, token = service.add_user()
            endpoint.queue_replies(LONG, SHORT)
            long_seen: list[tuple[str, Any]] = []
            short_seen: list[tuple[str, Any]] = []
            streams = [
                threading.Thread(target=stream, args=(service.url, token, "long", long_seen)),
                threading.Thread(target=stream, args=(service.url, token, "short", short_seen)),
            ]
            streams[0].start()
            wait_for(lambda: len(endpoint.requests) == 1, 30, "the long stream's call")
            streams[1].start()
            wait_for(lambda: len(endpoint.requests) == 2, 30, "the short stream's call")
            service.process.send_signal(signal.SIGTERM)  # the process this test started
            sent = time.monotonic()
            # uvicorn's supervisor of several workers passes SIGTERM on within 0.5 s.
            wait_for(lambda: draining(service.url), 1, "/healthz to say draining")
            health = httpx.get(f"{service.url}/healthz", timeout=5)
            during = service.client(token).post(
                "/v1/sessions/during/messages", json={"text": "Still serving?"}
            )
            assert time.monotonic() - sent < DELAY, "the checks took longer than the delay"
            wait_for(lambda: refused(service.url), DELAY + 5, "the listener to close")
            closed_after = time.monotonic() - sent
            service.process.wait(DELAY + GRACE + 20)
            exited_after = time.monotonic() - sent
            for thread in streams:
                thread.join(10)
                assert not thread.is_alive()
        finally:
            service.stop()
    print(
        f"SIGTERM ({workers} worker(s)): listener closed after {closed_after:.2f} s, process "
        f"exited after {exited_after:.2f} s (drain delay {DELAY} s, grace {GRACE} s)"
    )
    assert health.status_code == 503
    assert health.json()["status"] == "draining"
    assert during.status_code == 200, during.text  # served during the drain delay
    assert DELAY - 0.2 < closed_after < DELAY + 1.5
    assert exited_after < DELAY + GRACE + 10
    assert short_seen[-1][0] == "done"  # the short stream ended as usual
    assert "done" not in [event for event, _ in long_seen]
    with Chatbot(Settings(store_url=store_url)) as bot:
        short = bot.history(f"{name}:short")
        long = bot.history(f"{name}:long")
        billed = {
            session: len(bot.usage_entries(session_id=f"{name}:{session}"))
            for session in ("short", "long")
        }
    assert [m.type for m in short] == ["human", "ai"]
    assert short[1].content == SHORT
    assert not short[1].response_metadata.get("interrupted")
    assert [m.type for m in long] == ["human", "ai"]
    assert long[0].content == "Tell me the long one"
    assert long[1].response_metadata.get("interrupted") is True
    assert str(long[1].content).startswith("long0 long1")
    assert len(str(long[1].content)) < len(LONG)
    assert billed == {"short": 1, "long": 1}


@pytest.mark.slow
def test_a_non_streamed_turn_cut_at_the_grace_keeps_its_message(tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path / 'chat.db'}"
    with OpenAITestServer() as endpoint:
        service = start_service(
            store_url, endpoint, tmp_path, args=["--shutdown-grace", "2", "--drain-delay", "0"]
        )
        try:
            name, token = service.add_user()
            endpoint.add_fault(Fault(delay=60))  # the model answers after the grace
            answers: list[Any] = []

            def send() -> None:
                try:
                    answers.append(
                        service.client(token).post(
                            "/v1/sessions/slow/messages", json={"text": "Take your time"}
                        )
                    )
                except httpx.HTTPError as exc:
                    answers.append(exc)

            sender = threading.Thread(target=send)
            sender.start()
            wait_for(lambda: len(endpoint.requests) == 1, 30, "the turn's call")
            service.process.send_signal(signal.SIGTERM)  # the process this test started
            service.process.wait(20)
            sender.join(10)
        finally:
            service.stop()
    print(answers)
    with Chatbot(Settings(store_url=store_url)) as bot:
        history = bot.history(f"{name}:slow")
        billed = len(bot.usage_entries(session_id=f"{name}:slow"))
    assert [m.type for m in history] == ["human", "ai"]
    assert history[0].content == "Take your time"
    assert history[1].response_metadata.get("interrupted") is True
    assert billed == 1
