"""Bearer tokens and isolation between users, over a real ``chatchain serve``: every /v1
route refuses a missing, wrong, revoked or replaced token with 401, and another user's
session id answers 404 on every route, as if it did not exist."""

from __future__ import annotations

from contextlib import closing

import httpx
import pytest

from chatchain.stores import open_store
from chatchain.testing import OpenAITestServer
from chatchain.users import Users
from tests.server.conftest import Service

# A real `chatchain serve`; in the fast tier, in process: tests/server/test_app.py (401, 404),
# test_openai_app.py (401 invalid_api_key), tests/test_users.py (revoked and rotated tokens).
pytestmark = pytest.mark.slow

# Every route of the native API, as (method, path, JSON body).
ROUTES = [
    ("POST", "/v1/sessions/s/messages", {"text": "hi"}),
    ("GET", "/v1/sessions", None),
    ("GET", "/v1/sessions/s/messages", None),
    ("GET", "/v1/sessions/s/export", None),
    ("DELETE", "/v1/sessions/s", None),
    ("GET", "/v1/usage", None),
]


def assert_unauthorized(answer: httpx.Response) -> None:
    assert answer.status_code == 401, answer.text
    assert answer.headers["www-authenticate"] == "Bearer"
    assert answer.json()["error"]["type"] == "Unauthorized"


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer cc_not-a-token", "Bearer", "Basic dXNlcjpwdw==", "cc_no_scheme"],
    ids=["missing", "wrong", "empty", "basic", "no scheme"],
)
def test_every_route_refuses_a_request_without_a_valid_token(
    service: Service,
    endpoint: OpenAITestServer,
    method: str,
    path: str,
    body: object,
    authorization: str | None,
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}

    answer = httpx.request(method, service.url + path, json=body, headers=headers)

    assert_unauthorized(answer)
    assert endpoint.requests == []


def test_a_revoked_token_is_refused_at_once(service: Service, user: tuple[str, str]) -> None:
    client = service.client(user[1])
    assert client.get("/v1/sessions").status_code == 200

    with closing(open_store(service.store_url)) as store:
        Users(store).revoke(user[0])

    assert_unauthorized(client.get("/v1/sessions"))
    assert_unauthorized(client.post("/v1/sessions/s/messages", json={"text": "hi"}))


def test_a_rotated_token_replaces_the_old_one(service: Service, user: tuple[str, str]) -> None:
    client = service.client(user[1])
    client.post("/v1/sessions/kept/messages", json={"text": "hi"})

    with closing(open_store(service.store_url)) as store:
        new_token = Users(store).rotate(user[0])

    assert_unauthorized(client.get("/v1/sessions"))
    sessions = service.client(new_token).get("/v1/sessions").json()["sessions"]
    assert [s["session_id"] for s in sessions] == ["kept"]


def test_another_users_session_id_answers_404_on_every_route(
    service: Service, user: tuple[str, str], other: tuple[str, str]
) -> None:
    owner, intruder = service.client(user[1]), service.client(other[1])
    owner.post("/v1/sessions/private/messages", json={"text": "my secret"})
    before = owner.get("/v1/sessions/private/export").json()

    for method, path in [
        ("GET", "/v1/sessions/private/messages"),
        ("GET", "/v1/sessions/private/export"),
        ("DELETE", "/v1/sessions/private"),
    ]:
        answer = intruder.request(method, path)
        assert answer.status_code == 404, (method, path, answer.text)
        assert answer.json()["error"]["type"] == "NotFound"
        assert "secret" not in answer.text
    assert intruder.get("/v1/sessions").json() == {"sessions": []}
    # Writing to the same id makes a session of the intruder's own, apart from the owner's.
    reply = intruder.post("/v1/sessions/private/messages", json={"text": "mine"}).json()
    assert reply["text"] == "Echo: mine"
    assert owner.get("/v1/sessions/private/export").json() == before
    assert [
        m["text"] for m in intruder.get("/v1/sessions/private/messages").json()["messages"]
    ] == [
        "mine",
        "Echo: mine",
    ]
    assert [row["session"] for row in intruder.get("/v1/usage").json()["rows"]] == ["private"]
    assert (
        intruder.get("/v1/usage").json()["total"]["total_tokens"] == reply["usage"]["total_tokens"]
    )


def test_tokens_never_reach_the_servers_log(service: Service, user: tuple[str, str]) -> None:
    client = service.client(user[1])
    client.post("/v1/sessions/s/messages", json={"text": "hi"})
    httpx.get(f"{service.url}/v1/sessions", headers={"Authorization": "Bearer cc_wrong_token"})

    log = service.log.read_text()

    assert "POST /v1/sessions/s/messages" in log  # the log is there, without the tokens
    assert user[1] not in log and "cc_wrong_token" not in log
