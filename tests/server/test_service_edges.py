"""What an outside attack on the service found at its edges (issue 18, item 9), through the
routes: the native API (JSON and server-sent events) and the OpenAI-compatible route, with and
without ``X-Session-Id``.

- a store failure answers 503 without the store's address (``user@host:port/db``): logged;
- ``X-Session-Id`` is read as UTF-8, as a session id in a URL path is; other bytes are a 400;
- a client that leaves before the reply began counts as ``abandoned``, not ``interrupted``;
- the operator gives defaults to the system prompt's variables (``serve --var``,
  ``CHATCHAIN_PROMPT_VARS``), so that OpenAI-route clients, which cannot send vars, are served.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient

from chatchain import Chatbot, Settings, errors
from chatchain.server import create_app
from chatchain.stores import MemoryStore, open_store
from chatchain.testing import FakeChatModel, Fault, OpenAITestServer
from chatchain.users import Users
from tests.server.conftest import Service, start_service
from tests.server.test_metrics import sample

OPENAI = "/v1/chat/completions"
WHERE = "chat_app@db.internal.example:5432/chatchain"
STORE_DOWN = errors.StoreError(
    f"The PostgreSQL store {WHERE} failed (OperationalError): check the server is up."
)
SSE = {"Accept": "text/event-stream"}


@contextmanager
def _client(fake: FakeChatModel, settings: Settings) -> Iterator[TestClient]:
    store = MemoryStore()
    users = Users(store)
    bot = Chatbot(settings, llm=fake, store=store)
    token = users.add("ann")
    with TestClient(create_app(bot, users=users), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        yield client


@pytest.fixture
def fake() -> FakeChatModel:
    return FakeChatModel(model_name="gpt-4o-mini")


@pytest.fixture
def client(fake: FakeChatModel) -> Iterator[TestClient]:
    with _client(fake, Settings(api_key="sk-test", server_requests_per_minute=0)) as client:
        yield client


def _openai(text: str, **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **fields}


# Every route a turn goes through: (name, method arguments of TestClient.post).
ROUTES: dict[str, dict[str, Any]] = {
    "native-json": {"url": "/v1/sessions/s/messages", "json": {"text": "hi"}},
    "native-sse": {"url": "/v1/sessions/s/messages", "json": {"text": "hi"}, "headers": SSE},
    "openai-session": {"url": OPENAI, "json": _openai("hi"), "headers": {"X-Session-Id": "s"}},
    "openai-session-stream": {
        "url": OPENAI,
        "json": _openai("hi", stream=True),
        "headers": {"X-Session-Id": "s"},
    },
    "openai-stateless": {"url": OPENAI, "json": _openai("hi")},
    "openai-stateless-stream": {"url": OPENAI, "json": _openai("hi", stream=True)},
}


# -- 503 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_store_failure_is_a_503_that_does_not_show_where_the_store_is(
    client: TestClient, fake: FakeChatModel, route: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake.errors.append(STORE_DOWN)
    fake.model_post_init(None)

    with caplog.at_level(logging.ERROR, logger="chatchain.server"):
        answer = client.post(**ROUTES[route])

    assert answer.status_code == 503, answer.text
    message = answer.json()["error"]["message"]
    assert "not available right now" in message and "Try again" in message
    assert "db.internal.example" not in answer.text and "chat_app" not in answer.text
    assert WHERE in caplog.text  # the operator still learns where and why


# -- prompt variables' defaults ----------------------------------------------------------------


@pytest.fixture
def french(fake: FakeChatModel) -> Iterator[TestClient]:
    settings = Settings(
        api_key="sk-test",
        server_requests_per_minute=0,
        system_prompt="Answer in {language}.",
        prompt_vars={"language": "French"},
    )
    with _client(fake, settings) as client:
        yield client


@pytest.mark.parametrize("route", list(ROUTES))
def test_the_operators_defaults_fill_the_prompts_variables_on_every_route(
    french: TestClient, fake: FakeChatModel, route: str
) -> None:
    answer = french.post(**ROUTES[route])

    assert answer.status_code == 200, answer.text
    if route.startswith("openai-stateless"):  # the client's messages go as they are
        assert fake.calls[-1][0].text == "hi"
    else:
        assert fake.calls[-1][0].text == "Answer in French."


def test_a_native_requests_vars_win_over_the_defaults(
    french: TestClient, fake: FakeChatModel
) -> None:
    for headers in ({}, SSE):
        body = {"text": "hi", "vars": {"language": "Welsh"}}
        answer = french.post("/v1/sessions/s/messages", json=body, headers=headers)
        assert answer.status_code == 200, answer.text
        assert fake.calls[-1][0].text == "Answer in Welsh."


def test_without_defaults_a_session_request_on_the_openai_route_is_a_400(
    fake: FakeChatModel,
) -> None:
    settings = Settings(
        api_key="sk-test", server_requests_per_minute=0, system_prompt="Answer in {language}."
    )
    with _client(fake, settings) as client:
        answer = client.post(**ROUTES["openai-session"])
    assert answer.status_code == 400
    assert "language" in answer.json()["error"]["message"]


def test_the_setting_is_json_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATCHAIN_SYSTEM_PROMPT", "Answer in {language} as a {role}.")
    monkeypatch.setenv("CHATCHAIN_PROMPT_VARS", '{"language": "French", "role": "pirate"}')
    bot = Chatbot(llm=FakeChatModel())
    bot.chat("hi", session_id="s")
    assert bot.chain.prompt.invoke({"input": "x", "history": []}).to_messages()[0].text == (
        "Answer in French as a pirate."
    )
    assert bot.chat("hi", session_id="s", role="poet").text == "Echo: hi"


# -- over a real `chatchain serve` -------------------------------------------------------------


# Slow: two `chatchain serve` workers; in this process: the tests above, on every route.
@pytest.mark.slow
def test_serve_var_gives_the_defaults_to_every_worker(
    endpoint: OpenAITestServer, tmp_path: Path
) -> None:
    env = {"CHATCHAIN_SYSTEM_PROMPT": "Answer in {language} as a {role}."}
    env["CHATCHAIN_PROMPT_VARS"] = json.dumps({"language": "Welsh", "role": "poet"})
    args = ["--var", "language=French", "--var", "role=a pirate = always"]
    service = start_service(
        f"sqlite:///{tmp_path / 'chat.db'}", endpoint, tmp_path, workers=2, env=env, args=args
    )
    try:
        _, token = service.add_user()
        for _ in range(4):  # a new connection each time: both workers answer
            with service.client(token) as client:
                answer = client.post(OPENAI, json=_openai("hi"), headers={"X-Session-Id": "s"})
                assert answer.status_code == 200, answer.text
    finally:
        service.stop()
    systems = {r["body"]["messages"][0]["content"] for r in endpoint.requests}
    assert systems == {"Answer in French as a a pirate = always."}


@pytest.mark.slow  # in process: test_serve_command.py
def test_serve_refuses_a_var_the_prompt_does_not_have(tmp_path: Path) -> None:
    env = {"CHATCHAIN_SYSTEM_PROMPT": "Answer in {language}."}
    with pytest.raises(AssertionError, match=r"--var tone: the system prompt .* has no \{tone\}"):
        start_service(
            f"sqlite:///{tmp_path / 'chat.db'}", None, tmp_path, env=env, args=["--var", "tone=x"]
        )


LEAVING = {
    "native": {"url": "/v1/sessions/gone/messages", "json": {"text": "hi"}, "headers": SSE},
    "openai-session": {
        "url": OPENAI,
        "json": _openai("hi", stream=True),
        "headers": {"X-Session-Id": "gone"},
    },
    "openai-stateless": {"url": OPENAI, "json": _openai("hi", stream=True)},
}


@pytest.mark.parametrize("way", list(LEAVING))
def test_a_client_that_leaves_before_the_reply_began_is_abandoned_not_interrupted(
    service: Service, user: tuple[str, str], endpoint: OpenAITestServer, way: str
) -> None:
    endpoint.add_fault(Fault(delay=1.5))  # the endpoint answers after the client gave up
    before = httpx.get(f"{service.url}/metrics").text
    request = LEAVING[way]
    route = way.split("-")[0]
    auth = {"Authorization": f"Bearer {user[1]}"}
    with (
        httpx.Client(base_url=service.url, headers=auth, timeout=0.5) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.post(**request)

    labels = f'outcome="abandoned",route="{route}"'
    deadline = time.monotonic() + 20
    # The service notices the client left and stops the turn; the turn's end counts it (in
    # the turn's task), then the request gives its stream back: a scrape can fall between.
    while True:
        after = httpx.get(f"{service.url}/metrics").text
        counted = sample(after, "chatchain_turns_total", labels) > sample(
            before, "chatchain_turns_total", labels
        )
        if counted and sample(after, "chatchain_open_streams") == 0:
            break
        assert time.monotonic() < deadline, after
        time.sleep(0.1)
    for outcome in ("interrupted", "ok"):
        labels = f'outcome="{outcome}",route="{route}"'
        assert sample(after, "chatchain_turns_total", labels) == sample(
            before, "chatchain_turns_total", labels
        )


@pytest.mark.slow
@pytest.mark.parametrize("way", list(LEAVING))
def test_a_client_that_leaves_before_the_first_piece_ends_the_turn_on_every_route(
    service: Service, user: tuple[str, str], endpoint: OpenAITestServer, way: str
) -> None:
    # The endpoint sends keep-alive comments only; the client gives up after 1 s. Each
    # streaming route ends the turn as the native one does: the user's message kept with an
    # empty reply marked interrupted (with a session), the call in the ledger, no hold left.
    endpoint.add_fault(Fault(keep_alive=60, interval=0.05))
    auth = {"Authorization": f"Bearer {user[1]}"}
    with (
        httpx.Client(base_url=service.url, headers=auth, timeout=httpx.Timeout(60, read=1)) as c,
        pytest.raises(httpx.ReadTimeout),
    ):
        c.post(**LEAVING[way])
    with closing(open_store(service.store_url)) as store:
        deadline = time.monotonic() + 20  # not the endpoint's 60 s
        while not store.usage_entries(user_id=user[0]):
            assert time.monotonic() < deadline, "the turn was not ended"
            time.sleep(0.05)
        if way != "openai-stateless":
            history = store.load(f"{user[0]}:gone")
            assert [(m.type, m.text) for m in history] == [("human", "hi"), ("ai", "")]
            assert history[1].response_metadata["interrupted"] is True
    database = service.store_url.removeprefix("sqlite:///")
    with closing(sqlite3.connect(database)) as conn:
        assert conn.execute("SELECT count(*) FROM budget_holds").fetchone() == (0,)


# X-Session-Id over a real server: the header's bytes as a client sends them (TestClient's
# transport would re-encode them).


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_utf8_session_header_names_the_same_session_as_the_url_path(
    service: Service, user: tuple[str, str], stream: bool
) -> None:
    client = service.client(user[1])
    session = f"café-{stream}"
    headers = {"X-Session-Id": session.encode()}  # the header's bytes, as UTF-8
    answer = client.post(OPENAI, json=_openai("hi", stream=stream), headers=headers)
    assert answer.status_code == 200, answer.text

    # The native API's path (percent-encoded UTF-8) finds the same session, not 'cafÃ©'.
    stored = client.get(f"/v1/sessions/{quote(session)}/messages")
    assert stored.status_code == 200, stored.text
    assert [m["text"] for m in stored.json()["messages"]] == ["hi", "Echo: hi"]
    listed = [s["session_id"] for s in client.get("/v1/sessions").json()["sessions"]]
    assert session in listed and session.encode().decode("latin-1") not in listed


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_session_header_that_is_not_utf8_is_refused_before_any_call(
    service: Service, user: tuple[str, str], endpoint: OpenAITestServer, stream: bool
) -> None:
    client = service.client(user[1])
    headers = {"X-Session-Id": "café".encode("latin-1")}
    answer = client.post(OPENAI, json=_openai("hi", stream=stream), headers=headers)

    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "X-Session-Id header is not UTF-8" in error["message"]
    assert endpoint.requests == []
    assert client.get("/v1/sessions").json() == {"sessions": []}
