"""Every chatchain error answers with its HTTP status and one JSON shape, over a real
``chatchain serve``: bad input 422, budget 402, busy session 409, endpoint timeout 504, other
endpoint failures 502, store down 503, a body over the limit 413. Never a traceback or a key."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatchain.testing import Fault, OpenAITestServer, PostgresCluster
from tests.server.conftest import BASE_ENV, Service, start_service
from tests.server.test_native import wait_for

# Slow: a real `chatchain serve` process (uvicorn) per module. The same behaviour in this
# process, in the fast tier: test_app.py (every error class's status, a failing turn stores nothing,
# /healthz 503) and test_openai_app.py (errors in OpenAI's shape).
pytestmark = pytest.mark.slow

KEY = BASE_ENV["OPENAI_API_KEY"]


def assert_error(answer: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == kind
    assert "Traceback" not in answer.text and KEY not in answer.text
    error: dict[str, Any] = body["error"]
    return error


def assert_nothing_stored(client: httpx.Client) -> None:
    assert client.get("/v1/sessions").json() == {"sessions": []}
    assert client.get("/v1/usage").json()["total"]["total_tokens"] == 0


@pytest.mark.parametrize(
    ("fault", "status", "kind"),
    [
        (Fault(delay=4), 504, "EndpointTimeoutError"),
        (Fault(status=500), 502, "ServerError"),
        (Fault(status=503), 502, "ServerError"),
        (Fault(status=429, retry_after=0), 502, "RateLimitError"),
        (Fault(status=401), 502, "AuthenticationError"),
        (Fault(malformed=True), 502, "ServerError"),
    ],
    ids=["timeout", "500", "503", "rate limited", "endpoint key refused", "malformed"],
)
def test_endpoint_failures_answer_502_or_504_and_store_nothing(
    service: Service,
    user: tuple[str, str],
    endpoint: OpenAITestServer,
    fault: Fault,
    status: int,
    kind: str,
) -> None:
    endpoint.add_fault(fault)
    client = service.client(user[1])

    answer = client.post("/v1/sessions/s/messages", json={"text": "hello"})

    assert_error(answer, status, kind)
    assert_nothing_stored(client)


def test_a_turn_over_the_users_cap_answers_402_naming_the_cap_and_sends_nothing(
    service: Service, endpoint: OpenAITestServer
) -> None:
    name, token = service.add_user(daily_usd=0.000001)
    client = service.client(token)

    answer = client.post("/v1/sessions/s/messages", json={"text": "a question " * 50})

    error = assert_error(answer, 402, "BudgetExceeded")
    assert name in error["message"] and "daily" in error["message"]
    assert endpoint.requests == []
    assert_nothing_stored(client)


def test_a_session_busy_for_longer_than_the_lock_timeout_answers_409(
    service: Service, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    # The first turn keeps its endpoint busy for 6 s (blanks keep the read timeout from
    # firing); the service's lock timeout is 1 s.
    endpoint.add_fault(Fault(keep_alive=6, interval=0.2))
    client = service.client(user[1])
    first: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: first.append(client.post("/v1/sessions/s/messages", json={"text": "first"}))
    )
    thread.start()
    wait_for(lambda: endpoint.requests, "the first turn to reach the endpoint")

    answer = service.client(user[1]).post("/v1/sessions/s/messages", json={"text": "second"})

    thread.join()
    assert_error(answer, 409, "SessionBusyError")
    assert first[0].status_code == 200
    texts = [m["text"] for m in client.get("/v1/sessions/s/messages").json()["messages"]]
    assert texts == ["first", "Echo: first"]


@pytest.mark.services
def test_a_store_that_is_down_answers_503_and_healthz_says_so(
    endpoint: OpenAITestServer, tmp_path: Path
) -> None:
    cluster = PostgresCluster()
    try:
        cluster.start()
        service = start_service(f"{cluster.url}?connect_timeout=2", endpoint, tmp_path)
        try:
            _, token = service.add_user()
            client = service.client(token)
            assert client.post("/v1/sessions/s/messages", json={"text": "hi"}).status_code == 200
            cluster.stop("immediate")  # the database goes away under the service

            answer = client.post("/v1/sessions/s/messages", json={"text": "again"})
            health = httpx.get(f"{service.url}/healthz", timeout=30)
        finally:
            service.stop()
    finally:
        cluster.destroy()

    error = assert_error(answer, 503, "StoreError")
    assert "@" not in error["message"] and "5432" not in error["message"]  # in the log only
    assert health.status_code == 503
    assert health.json()["error"]["type"] == "StoreError"
