"""Session ids: one rule on every route, over a real ``chatchain serve`` (uvicorn decodes the
path, ``%2F`` included, as deployments do).

What can key a session is reachable on every route, ``/`` included, percent-encoded or not:
the OpenAI route's ``X-Session-Id``, and the native API's messages, title, export, delete and
list. What cannot (empty, control characters, too long, ``.`` and ``..``, a space first or
last) is refused the same way on each (422 on the native API, 400 on the OpenAI route)
before anything is sent or stored. A session stored with ``/`` before the rule (by the
OpenAI route) is reachable.
"""

from __future__ import annotations

from contextlib import closing
from urllib.parse import quote

import httpx
import pytest

from chatchain import Chatbot, Settings
from chatchain.stores import open_store
from chatchain.testing import FakeChatModel, OpenAITestServer
from tests.server.conftest import Service

# Slow: a real `chatchain serve` process per module.
pytestmark = pytest.mark.slow

OPENAI = "/v1/chat/completions"
LONGEST = 256 - len("u0123456789:")  # a key is "name:id"; the fixture's names are 11 long

REACHABLE = {
    "slash": "team/42",
    "slashes": "a//b/",
    "leading slash": "/root",
    "suffix-like": "a/messages",
    "encoded-looking": "a%2Fb",
    "spaces": "a  b",
    "unicode": "café/東京 🙂",
    "dots inside": "../x/..",
    "longest": "x/" * (LONGEST // 2),
}

REFUSED = {
    "empty": ("", "empty"),
    "blank": ("   ", "empty"),
    "leading space": (" a", "starts or ends with a space"),
    "trailing space": ("a ", "starts or ends with a space"),
    "dot": (".", "cannot be used"),
    "dot dot": ("..", "cannot be used"),
    "nul": ("a\x00b", "U+0000"),
    "newline": ("a\nb", "U+000A"),
    "escape": ("a\x1bb", "U+001B"),
    "too long": ("x" * (LONGEST + 1), "characters long"),
}


def _path(session_id: str, *, encoded: bool = True) -> str:
    """The id in a URL path: every "/" percent-encoded (as encodeURIComponent does), or kept."""
    if session_id in (".", ".."):  # as clients would resolve them away: encode the dots
        return session_id.replace(".", "%2E")
    return quote(session_id, safe="" if encoded else "/")


def _openai(text: str) -> dict[str, object]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}


@pytest.fixture
def client(service: Service, user: tuple[str, str]) -> httpx.Client:
    return service.client(user[1])


@pytest.mark.parametrize("session_id", REACHABLE.values(), ids=REACHABLE.keys())
def test_an_id_is_reachable_on_every_route(client: httpx.Client, session_id: str) -> None:
    header = {"X-Session-Id": session_id.encode()}  # the header's UTF-8 bytes
    first = client.post(OPENAI, json=_openai("one"), headers=header)
    native = client.post(f"/v1/sessions/{_path(session_id)}/messages", json={"text": "two"})
    assert (first.status_code, native.status_code) == (200, 200), (first.text, native.text)
    assert native.json()["session_id"] == session_id

    listed = [s["session_id"] for s in client.get("/v1/sessions").json()["sessions"]]
    assert listed == [session_id]
    # With bare "/", a client resolves ".." segments away: only the encoded id is sure.
    for encoded in (True, False) if "." not in session_id else (True,):
        path = f"/v1/sessions/{_path(session_id, encoded=encoded)}"
        messages = client.get(f"{path}/messages")
        assert messages.status_code == 200, messages.text
        texts = [m["text"] for m in messages.json()["messages"]]
        assert texts == ["one", "Echo: one", "two", "Echo: two"]
        assert client.put(f"{path}/title", json={"title": "T"}).status_code == 204
        exported = client.get(f"{path}/export")
        assert exported.status_code == 200 and exported.json()["session_id"] == session_id
    assert client.get("/v1/sessions").json()["sessions"][0]["title"] == "T"
    assert client.get("/v1/usage").json()["rows"][0]["session"] == session_id

    assert client.delete(f"/v1/sessions/{_path(session_id)}").status_code == 204
    assert client.get("/v1/sessions").json() == {"sessions": []}
    gone = client.get(f"/v1/sessions/{_path(session_id)}/messages")
    assert gone.status_code == 404


@pytest.mark.parametrize(("session_id", "says"), REFUSED.values(), ids=REFUSED.keys())
def test_an_id_that_cannot_be_reached_is_refused_on_every_route(
    client: httpx.Client, endpoint: OpenAITestServer, session_id: str, says: str
) -> None:
    path = f"/v1/sessions/{_path(session_id)}"
    native = [
        client.post(f"{path}/messages", json={"text": "hi"}),
        client.get(f"{path}/messages"),
        client.put(f"{path}/title", json={"title": "T"}),
        client.get(f"{path}/export"),
        client.delete(path),
    ]
    for answer in native:
        assert answer.status_code == 422, (answer.request.url, answer.text)
        assert says in answer.json()["error"]["message"]
    # A header cannot carry control characters, nor a space first or last (HTTP strips it).
    if session_id == session_id.strip() and session_id.isprintable():
        headers = {"X-Session-Id": session_id}
        openai = client.post(OPENAI, json=_openai("hi"), headers=headers)
        assert openai.status_code == 400
        assert openai.json()["error"]["code"] == "InvalidInputError"
        assert says in openai.json()["error"]["message"]
    assert endpoint.requests == []
    assert client.get("/v1/sessions").json() == {"sessions": []}


def test_a_session_stored_with_a_slash_before_the_rule_stays_reachable(
    service: Service, user: tuple[str, str]
) -> None:
    name, token = user
    with closing(open_store(service.store_url)) as store:  # as the OpenAI route stored it
        bot = Chatbot(Settings(api_key="sk-test"), llm=FakeChatModel(), store=store)
        bot.chat("kept", session_id=f"{name}:team/7")
    client = service.client(token)

    stored = client.get("/v1/sessions/team%2F7/messages")

    assert stored.status_code == 200
    assert [m["text"] for m in stored.json()["messages"]] == ["kept", "Echo: kept"]
    assert client.delete("/v1/sessions/team/7").status_code == 204
