"""The native API over a real ``chatchain serve`` process: turns as JSON and as events,
sessions, export, usage, and refusals that store nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from langchain_core.messages import HumanMessage

from chatchain import Chatbot, Settings
from chatchain.stores import open_store
from chatchain.testing import Fault, OpenAITestServer
from tests.server.conftest import Service, events

# Slow: a real `chatchain serve` process (uvicorn) per module. The same behaviour in this
# process, in the fast tier: test_app.py (the native routes, prompt variables, a cut stream's error
# event).
pytestmark = pytest.mark.slow


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
            {
                "role": "assistant",
                "text": "Echo: Hi, I'm Bob",
                "interrupted": False,
                # The reply's usage is kept with it (without the timings, which are not).
                "usage": {
                    **usage,
                    "estimated": False,
                    "line": usage["line"].split(", ")[0] + ", " + usage["line"].split(", ")[1],
                },
            },
        ],
    }


def test_sessions_are_listed_with_titles_and_renamed(
    service: Service, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    client = service.client(user[1])
    long = "Where should we go in May?   " + "x" * 200
    assert client.post("/v1/sessions/trip/messages", json={"text": long}).status_code == 200
    listed = client.get("/v1/sessions").json()["sessions"]
    assert listed[0]["title"] == ("Where should we go in May? " + "x" * 200)[:79] + "…"

    assert client.put("/v1/sessions/trip/title", json={"title": " Oslo  trip "}).status_code == 204
    assert client.get("/v1/sessions").json()["sessions"][0]["title"] == "Oslo trip"
    missing = client.put("/v1/sessions/nope/title", json={"title": "x"})
    assert missing.status_code == 404
    assert client.put("/v1/sessions/trip/title", json={"title": "y" * 201}).status_code == 422

    assert client.delete("/v1/sessions/trip").status_code == 204  # the title goes with it
    assert client.post("/v1/sessions/trip/messages", json={"text": "again"}).status_code == 200
    assert client.get("/v1/sessions").json()["sessions"][0]["title"] == "again"


def test_me_names_the_model_and_the_budget_left(service: Service) -> None:
    _, plain = service.add_user()
    _, capped = service.add_user(budget_usd=5.0, daily_usd=0.5)
    me = service.client(plain).get("/v1/me").json()
    assert me["model"] == "gpt-4o-mini" and me["budget"] is None
    budget = service.client(capped).get("/v1/me").json()["budget"]
    assert budget == {
        "cap": "daily cap",
        "max_usd": 0.5,
        "left_usd": 0.5,
        "line": "$0.50 left of your daily cap of $0.50 ($0.00 spent)",
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


def _stream(client: httpx.Client, session_id: str, text: str) -> Any:
    return client.stream(
        "POST",
        f"/v1/sessions/{session_id}/messages",
        json={"text": text},
        headers={"Accept": "text/event-stream"},
    )


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Poll ``condition`` until it returns something truthy (a wait, not a pass/fail timing)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


def test_a_client_leaving_mid_stream_keeps_the_partial_reply_marked_interrupted(
    service: Service, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    client = service.client(user[1])
    # Several times: the server must stop the turn whatever it is waiting for when the
    # client leaves (a lost cancellation once kept a turn running, the partial reply unsaved).
    for attempt in range(5):
        session_id = f"s{attempt}"
        # Two pieces, then the endpoint keeps the stream open (keep-alive comments) for 60 s.
        endpoint.add_fault(Fault(keep_alive=60, stall_after=2, interval=0.05))
        with _stream(client, session_id, "one two three four") as response:
            assert response.status_code == 200
            name, data = next(events(response))
            assert name == "text"
        # Leaving the block closed the connection mid-stream.

        def stored(session_id: str = session_id) -> list[dict[str, Any]]:
            answer = client.get(f"/v1/sessions/{session_id}/messages")  # 404 until saved
            return answer.json()["messages"] if answer.status_code == 200 else []

        messages = wait_for(stored, "the partial reply")
        assert messages[0] == {"role": "user", "text": "one two three four", "interrupted": False}
        assert messages[1]["role"] == "assistant" and messages[1]["interrupted"] is True
        assert messages[1]["text"].startswith(data["text"])
        assert "Echo: one two three four".startswith(messages[1]["text"])
        assert messages[1]["text"] != "Echo: one two three four"


def test_a_client_leaving_before_the_first_text_stops_the_turn_too(
    service: Service, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    # The endpoint sends keep-alive comments only, for 60 s; the client gives up after 1 s.
    endpoint.add_fault(Fault(keep_alive=60, interval=0.05))
    client = service.client(user[1])

    with pytest.raises(httpx.ReadTimeout):
        client.post(
            "/v1/sessions/s/messages",
            json={"text": "anyone there?"},
            headers={"Accept": "text/event-stream"},
            timeout=httpx.Timeout(60, read=1),
        )

    def stored() -> list[dict[str, Any]]:
        answer = client.get("/v1/sessions/s/messages")  # 404 until the turn is saved
        return answer.json()["messages"] if answer.status_code == 200 else []

    messages = wait_for(stored, "the stopped turn", timeout=20)  # not the endpoint's 60 s
    assert messages == [
        {"role": "user", "text": "anyone there?", "interrupted": False},
        {"role": "assistant", "text": "", "interrupted": True},
    ]


def test_a_stream_refused_before_its_first_text_answers_with_the_errors_status(
    service: Service, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    endpoint.add_fault(Fault(status=500))
    client = service.client(user[1])

    with _stream(client, "s", "hello") as response:
        response.read()

    assert response.status_code == 502
    assert response.json()["error"]["type"] == "ServerError"
    assert client.get("/v1/sessions").json() == {"sessions": []}


def test_a_stream_that_fails_after_some_text_ends_with_an_error_event_and_keeps_it(
    service: Service, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    endpoint.add_fault(Fault(cut_after=2))  # the endpoint drops the connection mid-reply
    client = service.client(user[1])

    with _stream(client, "s", "one two three four") as response:
        received = list(events(response))

    assert [name for name, _ in received[:-1]] == ["text"] * (len(received) - 1)
    name, error = received[-1]
    assert name == "error"
    assert error["status"] in (502, 504) and error["type"].endswith("Error")
    assert error["message"]
    messages = client.get("/v1/sessions/s/messages").json()["messages"]
    assert messages[-1]["interrupted"] is True
    assert messages[-1]["text"] == "".join(d["text"] for n, d in received if n == "text")


def test_sessions_are_listed_newest_first_and_deleted_for_good(
    service: Service, user: tuple[str, str]
) -> None:
    client = service.client(user[1])
    for session_id in ("older", "newer"):
        assert client.post(f"/v1/sessions/{session_id}/messages", json={"text": "hi"}).is_success

    listed = client.get("/v1/sessions").json()["sessions"]

    assert [s["session_id"] for s in listed] == ["newer", "older"]
    assert listed[0]["message_count"] == 2
    assert client.delete("/v1/sessions/older").status_code == 204
    assert [s["session_id"] for s in client.get("/v1/sessions").json()["sessions"]] == ["newer"]
    assert client.get("/v1/sessions/older/messages").status_code == 404
    assert client.delete("/v1/sessions/older").status_code == 404


def test_the_listing_is_the_callers_newest_500_sessions(
    service: Service, user: tuple[str, str]
) -> None:
    name, token = user
    t0 = datetime(2026, 1, 2, tzinfo=UTC)
    with closing(open_store(service.store_url)) as store:
        for i in range(501):  # s000 is the oldest
            store.replace_session(
                f"{name}:s{i:03}", [HumanMessage("hi")], updated_at=t0 + timedelta(seconds=i)
            )
        # Another user whose name starts with the caller's, written last.
        store.replace_session(f"{name}x:s999", [HumanMessage("hi")], updated_at=t0 + timedelta(1))

    listed = service.client(token).get("/v1/sessions").json()["sessions"]

    assert [s["session_id"] for s in listed] == [f"s{i:03}" for i in range(500, 0, -1)]


def test_an_export_names_the_callers_own_session_id_and_imports_back(
    service: Service, user: tuple[str, str], tmp_path: Path
) -> None:
    client = service.client(user[1])
    client.post("/v1/sessions/trip/messages", json={"text": "pack the tent"})

    exported = client.get("/v1/sessions/trip/export").json()

    assert exported["session_id"] == "trip"
    assert user[0] not in json.dumps(exported)
    bot = Chatbot(Settings(store_url="memory://"))
    assert bot.import_session(exported) == "trip"
    assert [m.text for m in bot.history("trip")] == ["pack the tent", "Echo: pack the tent"]


def test_usage_shows_the_callers_totals_and_rows_by_their_own_session_ids(
    service: Service, user: tuple[str, str]
) -> None:
    client = service.client(user[1])
    turns = [client.post(f"/v1/sessions/{s}/messages", json={"text": "hi"}) for s in "ab"]

    usage = client.get("/v1/usage").json()

    assert usage["total"]["total_tokens"] == sum(t.json()["usage"]["total_tokens"] for t in turns)
    assert sorted(row["session"] for row in usage["rows"]) == ["a", "b"]
    assert all(row["turns"] == 1 for row in usage["rows"])


@pytest.mark.parametrize(
    ("session_id", "body", "what"),
    [
        ("s", {"text": "  "}, "empty"),
        ("s", {"text": "hi", "vars": {"session_id": "x"}}, "session_id"),
        ("s", {"text": "hi", "vars": {"tone": 3}}, "vars.tone"),
        ("x" * 250, {"text": "hi"}, "characters long"),
        ("s", {"vars": {}}, "text"),
    ],
    ids=["blank text", "reserved var", "non-string var", "long session id", "no text"],
)
def test_bad_input_is_refused_with_422_saying_what_and_nothing_is_stored(
    service: Service,
    user: tuple[str, str],
    endpoint: OpenAITestServer,
    session_id: str,
    body: dict[str, Any],
    what: str,
) -> None:
    client = service.client(user[1])

    answer = client.post(f"/v1/sessions/{session_id}/messages", json=body)

    assert answer.status_code == 422
    assert what in answer.json()["error"]["message"]
    assert endpoint.requests == []
    assert client.get("/v1/sessions").json() == {"sessions": []}


def test_replace_last_regenerates_the_last_turn_and_the_ledger_keeps_both(
    service: Service, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    client = service.client(user[1])
    for text in ("first", "second"):
        assert client.post("/v1/sessions/r/messages", json={"text": text}).status_code == 200
    answer = client.post(
        "/v1/sessions/r/messages", json={"text": "second, edited", "replace_last": True}
    )
    assert answer.status_code == 200, answer.text
    messages = client.get("/v1/sessions/r/messages").json()["messages"]
    assert [m["text"] for m in messages] == [
        "first",
        "Echo: first",
        "second, edited",
        "Echo: second, edited",
    ]
    # The model was sent the history without the replaced turn.
    sent = [m["content"] for m in endpoint.requests[-1]["body"]["messages"][1:]]
    assert sent == ["first", "Echo: first", "second, edited"]
    rows = client.get("/v1/usage").json()["rows"]
    assert sum(row["turns"] for row in rows if row["session"] == "r") == 3  # all three billed


def test_a_refused_replacement_puts_the_last_turn_back(
    service: Service, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    client = service.client(user[1])
    assert client.post("/v1/sessions/r/messages", json={"text": "keep me"}).status_code == 200
    before = client.get("/v1/sessions/r/messages").json()
    endpoint.add_fault(Fault(status=500))
    refused = client.post("/v1/sessions/r/messages", json={"text": "new", "replace_last": True})
    assert refused.status_code == 502
    assert client.get("/v1/sessions/r/messages").json() == before
    endpoint.add_fault(Fault(status=500))
    streamed = client.post(
        "/v1/sessions/r/messages",
        json={"text": "new", "replace_last": True},
        headers={"Accept": "text/event-stream"},
    )
    assert streamed.status_code == 502
    assert client.get("/v1/sessions/r/messages").json() == before
    empty = client.post("/v1/sessions/none/messages", json={"text": "x", "replace_last": True})
    assert empty.status_code == 404
