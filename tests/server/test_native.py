"""The native API over a real ``chatchain serve`` process: turns as JSON and as events,
sessions, export, usage, and refusals that store nothing."""

from __future__ import annotations

import httpx

from chatchain.testing import OpenAITestServer
from tests.server.conftest import Service, events


def test_a_message_answers_with_the_reply_and_its_usage_and_is_kept(
    service: Service, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    client = service.client(user[1])

    answer = client.post("/v1/sessions/trip/messages", json={"text": "Hi, I'm Bob"})

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["session_id"] == "trip"
    assert body["text"] == "Echo: Hi, I'm Bob"
    assert body["interrupted"] is False
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert usage["line"].startswith(f"{usage['total_tokens']} tokens (")
    history = client.get("/v1/sessions/trip/messages").json()
    assert history == {
        "session_id": "trip",
        "messages": [
            {"role": "user", "text": "Hi, I'm Bob", "interrupted": False},
            {"role": "assistant", "text": "Echo: Hi, I'm Bob", "interrupted": False},
        ],
    }


def test_unknown_fields_are_refused_with_422_and_nothing_is_stored(
    service: Service, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    client = service.client(user[1])

    answer = client.post("/v1/sessions/s/messages", json={"text": "hi", "temperature": 2})

    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["type"] == "InvalidInputError"
    assert "temperature" in error["message"]
    assert endpoint.requests == []
    assert client.get("/v1/sessions").json() == {"sessions": []}


def test_a_request_without_a_token_is_refused_with_401_and_a_json_error(
    service: Service,
) -> None:
    answer = httpx.post(f"{service.url}/v1/sessions/s/messages", json={"text": "hi"})

    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == "Bearer"
    assert answer.json()["error"]["type"] == "Unauthorized"


def test_a_streamed_reply_comes_as_text_events_then_usage_then_done(
    service: Service, user: tuple[str, str]
) -> None:
    client = service.client(user[1])

    with client.stream(
        "POST",
        "/v1/sessions/s/messages",
        json={"text": "one two three"},
        headers={"Accept": "text/event-stream"},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        received = list(events(response))

    names = [name for name, _ in received]
    assert names[-2:] == ["usage", "done"] and set(names[:-2]) == {"text"}
    assert "".join(data["text"] for name, data in received if name == "text") == (
        "Echo: one two three"
    )
    assert received[-1][1] == {"interrupted": False, "notices": []}
    assert received[-2][1]["total_tokens"] > 0
