"""The response cache (``CHATCHAIN_CACHE``) through every route of the service, in this
process (FastAPI's TestClient over a FakeChatModel): a user who sends another user's exact
first message is answered by the model, never with the other user's reply, unless the
operator shares the cache (``CHATCHAIN_CACHE_SCOPE=shared``). Every cache backend and entry
point of the library is in tests/stores/test_cached_turns.py."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from chatchain import Chatbot, Settings
from chatchain.server import create_app
from chatchain.stores import MemoryStore
from chatchain.testing import FakeChatModel
from chatchain.users import Users

QUESTION = "What did the lab say about my results?"
SECRET = "Ann, your results are back: positive."  # a sampled reply that tells what she asked
ECHO = f"Echo: {QUESTION}"


def _native(client: TestClient, session: str) -> str:
    answer = client.post(f"/v1/sessions/{session}/messages", json={"text": QUESTION})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["text"])


def _native_sse(client: TestClient, session: str) -> str:
    answer = client.post(
        f"/v1/sessions/{session}/messages",
        json={"text": QUESTION},
        headers={"Accept": "text/event-stream"},
    )
    assert answer.status_code == 200, answer.text
    return "".join(json.loads(data)["text"] for name, data in _sse(answer.text) if name == "text")


def _openai(client: TestClient, session: str | None, *, stream: bool = False) -> str:
    headers = {"X-Session-Id": session} if session else {}
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": QUESTION}],
        "stream": stream,
    }
    answer = client.post("/v1/chat/completions", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    if not stream:
        return str(answer.json()["choices"][0]["message"]["content"])
    chunks = [json.loads(data) for _, data in _sse(answer.text) if data.startswith("{")]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def _sse(text: str) -> list[tuple[str, str]]:
    found = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith(("event:", "data:"))]
        fields = dict(line.split(":", 1) for line in lines)
        if "data" in fields:
            found.append((fields.get("event", "message").strip(), fields["data"].strip()))
    return found


Route = Callable[[TestClient, str], str]
ROUTES: dict[str, Route] = {
    "native": _native,
    "native-sse": _native_sse,
    "openai-session": lambda client, session: _openai(client, session),
    "openai-session-stream": lambda client, session: _openai(client, session, stream=True),
    "openai-stateless": lambda client, session: _openai(client, None),
    "openai-stateless-stream": lambda client, session: _openai(client, None, stream=True),
}


@pytest.fixture(params=["memory", "sqlite"])
def cache_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/cache.db"


def _service(cache: str, scope: str) -> tuple[FakeChatModel, Callable[[str], TestClient]]:
    fake = FakeChatModel(model_name="gpt-4o-mini", replies=[SECRET])
    store = MemoryStore()
    settings = Settings(
        api_key="sk-test", cache=cache, cache_scope=scope, server_requests_per_minute=0
    )
    bot = Chatbot(settings, llm=fake, store=store, system="Be kind.")
    app = create_app(bot)
    users = Users(store)

    def client(name: str) -> TestClient:
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()  # the app's lifespan, which hands the requests its state
        client.headers["Authorization"] = f"Bearer {users.add(name)}"
        return client

    return fake, client


@pytest.fixture
def clients() -> Iterator[list[TestClient]]:
    opened: list[TestClient] = []
    yield opened
    for client in opened:
        client.__exit__(None, None, None)


@pytest.mark.parametrize("route", list(ROUTES))
def test_another_user_sending_the_same_message_is_not_served_the_cached_reply(
    cache_url: str, route: str, clients: list[TestClient]
) -> None:
    fake, client = _service(cache_url, "user")
    ann, bob = client("ann"), client("bob")
    clients += [ann, bob]
    ask = ROUTES[route]
    assert ask(ann, "s1") == SECRET
    assert ask(bob, "s1") == ECHO  # asked of the model: Bob learns nothing of Ann
    assert len(fake.calls) == 2
    assert ask(ann, "s2") == SECRET and ask(bob, "s2") == ECHO  # each from their own cache
    assert len(fake.calls) == 2
    usage = bob.get("/v1/usage").json()["rows"]
    assert sum(row["cached_turns"] for row in usage) == 1


@pytest.mark.parametrize("route", list(ROUTES))
def test_with_the_shared_scope_every_user_is_served_the_cached_reply(
    cache_url: str, route: str, clients: list[TestClient]
) -> None:
    fake, client = _service(cache_url, "shared")
    ann, bob = client("ann"), client("bob")
    clients += [ann, bob]
    ask = ROUTES[route]
    assert ask(ann, "s1") == SECRET
    assert ask(bob, "s1") == SECRET  # the operator's explicit choice
    assert len(fake.calls) == 1
