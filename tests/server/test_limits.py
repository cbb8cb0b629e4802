"""Per-user limits, the body limit and CORS, over a real ``chatchain serve`` configured by
its ``CHATCHAIN_SERVER_*`` variables."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from chatchain.testing import Fault, OpenAITestServer
from tests.server.conftest import Service, events, start_service
from tests.server.test_native import wait_for

# Slow: a real `chatchain serve` process (uvicorn) per module. The same behaviour in this
# process, in the fast tier: test_app.py::test_limits_body_size_and_cors_in_process and
# test_a_users_stream_slots_are_counted_and_given_back.
pytestmark = pytest.mark.slow

ORIGIN = "https://chat.example.com"


@pytest.fixture(scope="module")
def limited(
    endpoint: OpenAITestServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    folder = tmp_path_factory.mktemp("limited")
    env = {
        "CHATCHAIN_SERVER_REQUESTS_PER_MINUTE": "5",
        "CHATCHAIN_SERVER_STREAMS_PER_USER": "1",
        "CHATCHAIN_SERVER_MAX_BODY_BYTES": "2000",
        "CHATCHAIN_SERVER_CORS_ORIGINS": f"{ORIGIN}, https://other.example.com",
    }
    running = start_service(f"sqlite:///{folder / 'chat.db'}", endpoint, folder, env=env)
    yield running
    running.stop()


def test_a_user_over_their_requests_per_minute_gets_429_with_retry_after(
    limited: Service,
) -> None:
    client = limited.client(limited.add_user()[1])
    fresh = limited.client(limited.add_user()[1])

    answers = [client.get("/v1/sessions") for _ in range(6)]

    assert [a.status_code for a in answers] == [200] * 5 + [429]
    assert 1 <= int(answers[-1].headers["retry-after"]) <= 60
    error = answers[-1].json()["error"]
    assert error["type"] == "TooManyRequests"
    assert "CHATCHAIN_SERVER_REQUESTS_PER_MINUTE" in error["message"]
    assert fresh.get("/v1/sessions").status_code == 200  # counted per user


def open_streams(service: Service) -> float:
    metrics = httpx.get(f"{service.url}/metrics").text
    return float(re.search(r"^chatchain_open_streams (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]


# A known, open defect (issue 21), the one test_shared_limits.py's two-process test shows:
# about one run in eight the second stream is served (200) while the first seems open. Not
# strict: the test still runs its whole course, and a pass is reported (XPASS).
@pytest.mark.xfail(reason="intermittent second stream slot (issue 21)", strict=False)
def test_a_user_with_all_their_streams_open_gets_429_until_one_ends(
    limited: Service, endpoint: OpenAITestServer
) -> None:
    client = limited.client(limited.add_user()[1])
    endpoint.add_fault(Fault(keep_alive=30, stall_after=1, interval=0.05))
    ask = {"json": {"text": "hi there"}, "headers": {"Accept": "text/event-stream"}}

    with client.stream("POST", "/v1/sessions/a/messages", **ask) as first:  # type: ignore[arg-type]
        assert next(events(first))[0] == "text"
        second = client.post("/v1/sessions/b/messages", **ask)  # type: ignore[arg-type]
        other_user = limited.client(limited.add_user()[1]).post(
            "/v1/sessions/c/messages", json={"text": "hi"}
        )

    assert second.status_code == 429
    assert second.headers["retry-after"] == "1"
    assert "CHATCHAIN_SERVER_STREAMS_PER_USER" in second.json()["error"]["message"]
    assert other_user.status_code == 200
    wait_for(lambda: open_streams(limited) == 0, "the first stream to end")
    with client.stream("POST", "/v1/sessions/b/messages", **ask) as third:  # type: ignore[arg-type]
        assert [name for name, _ in events(third)][-1] == "done"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_refused_with_413_and_nothing_is_stored(
    limited: Service, endpoint: OpenAITestServer, chunked: bool
) -> None:
    client = limited.client(limited.add_user()[1])
    body = b'{"text": "' + b"x" * 3000 + b'"}'
    content = iter([body[:1000], body[1000:]]) if chunked else body

    answer = client.post(
        "/v1/sessions/s/messages", content=content, headers={"Content-Type": "application/json"}
    )

    assert answer.status_code == 413
    error = answer.json()["error"]
    assert (
        error["type"] == "PayloadTooLarge" and "CHATCHAIN_SERVER_MAX_BODY_BYTES" in error["message"]
    )
    assert endpoint.requests == []
    assert client.get("/v1/sessions").json() == {"sessions": []}


def preflight(service: Service, origin: str) -> httpx.Response:
    return httpx.options(
        f"{service.url}/v1/sessions/s/messages",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_cors_allows_the_configured_origins_only(limited: Service) -> None:
    allowed = preflight(limited, ORIGIN)
    refused = preflight(limited, "https://evil.example.com")

    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-origin" not in refused.headers


def test_cors_is_off_unless_origins_are_configured(service: Service) -> None:
    answer = preflight(service, ORIGIN)

    assert "access-control-allow-origin" not in answer.headers
    assert answer.status_code == 405
