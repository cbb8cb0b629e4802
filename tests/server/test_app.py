"""`create_app` in this process (FastAPI's TestClient over a FakeChatModel): the mapping of
every chatchain error class, the event stream's shape, and ``chatchain serve``'s hand-over
to uvicorn. The same behaviour over real uvicorn processes is in the other test modules."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from chatchain import Chatbot, Settings, errors
from chatchain.cli._commands import cli
from chatchain.server import create_app
from chatchain.server._errors import HTTPProblem, status_of
from chatchain.server._throttle import UserThrottle
from chatchain.stores import MemoryStore
from chatchain.testing import FakeChatModel
from chatchain.users import User, Users

STATUS = {
    "InvalidInputError": 422,
    "MissingPromptVariableError": 422,
    "SessionExistsError": 422,
    "UnknownUserError": 422,
    "UserExistsError": 422,
    "BudgetExceeded": 402,
    "SessionBusyError": 409,
    "SessionLockLostError": 409,
    "StoreError": 503,
    "TurnJournaledError": 503,
    "EndpointTimeoutError": 504,
    "TurnDeadlineError": 504,
    "EndpointError": 502,
    "AuthenticationError": 502,
    "RateLimitError": 502,
    "EndpointConnectionError": 502,
    "ContextTooLongError": 502,
    "BadRequestError": 502,
    "ServerError": 502,
    "StructuredReplyError": 502,
    "ChatChainError": 500,
    "ConfigurationError": 500,
    "MissingAPIKeyError": 500,
}


def test_every_error_class_has_its_status() -> None:
    assert sorted(STATUS) == sorted(errors.__all__)
    for name, status in STATUS.items():
        kind = getattr(errors, name)
        error = kind.__new__(kind)  # the status depends on the class only
        assert status_of(error) == status, name


@pytest.fixture
def fake() -> FakeChatModel:
    return FakeChatModel(model_name="gpt-4o-mini")


@pytest.fixture
def app_client(fake: FakeChatModel) -> Iterator[tuple[TestClient, str]]:
    store = MemoryStore()
    settings = Settings(api_key="sk-test", server_requests_per_minute=0)
    bot = Chatbot(
        settings, llm=fake, store=store, system="Be {tone}.", prompt_vars={"tone": "kind"}
    )
    token = Users(store).add("ann")
    with TestClient(create_app(bot), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        yield client, token


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.EndpointTimeoutError("slow"), 504),
        (errors.ServerError("broken"), 502),
        (errors.StoreError("down"), 503),
        (errors.SessionBusyError("busy"), 409),
        (RuntimeError("a bug with a secret sk-test"), 500),
    ],
    ids=["timeout", "server", "store", "busy", "unexpected"],
)
def test_a_failing_turn_answers_with_its_status_and_stores_nothing(
    app_client: tuple[TestClient, str], fake: FakeChatModel, error: Exception, status: int
) -> None:
    client, _ = app_client
    fake.errors.append(error)
    fake.model_post_init(None)

    answer = client.post("/v1/sessions/s/messages", json={"text": "hi"})

    assert answer.status_code == status
    assert set(answer.json()["error"]) == {"type", "message"}
    assert "sk-test" not in answer.text and "Traceback" not in answer.text
    assert client.get("/v1/sessions").json() == {"sessions": []}


def test_prompt_variables_reach_the_system_message(
    app_client: tuple[TestClient, str], fake: FakeChatModel
) -> None:
    client, _ = app_client

    answer = client.post("/v1/sessions/s/messages", json={"text": "hi", "vars": {"tone": "brief"}})

    assert answer.status_code == 200
    assert fake.calls[-1][0].text == "Be brief."


def _events(text: str) -> list[tuple[str, str]]:
    found = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            found.append((lines["event"], lines["data"]))
    return found


def test_a_stream_cut_by_the_endpoint_ends_with_an_error_event(
    app_client: tuple[TestClient, str], fake: FakeChatModel
) -> None:
    client, _ = app_client
    fake.fail_after_chunks = 2

    answer = client.post(
        "/v1/sessions/s/messages",
        json={"text": "one two three"},
        headers={"Accept": "text/event-stream"},
    )

    received = _events(answer.text)
    # The two pieces come as one text event or two (pieces ready together are joined).
    assert [name for name, _ in received] in (["text", "text", "error"], ["text", "error"])
    text = "".join(json.loads(data)["text"] for _, data in received[:-1])
    assert text and "Echo: one two three".startswith(text)
    assert '"status": 502' in received[-1][1]
    history = client.get("/v1/sessions/s/messages").json()["messages"]
    assert history[-1]["interrupted"] is True


def test_the_openapi_docs_describe_the_api(app_client: tuple[TestClient, str]) -> None:
    client, _ = app_client

    paths = client.get("/openapi.json").json()["paths"]

    assert {"/v1/sessions/{session_id}/messages", "/v1/usage", "/healthz"} <= set(paths)
    assert client.get("/docs").status_code == 200


def test_an_unknown_path_is_a_json_404(app_client: tuple[TestClient, str]) -> None:
    client, _ = app_client

    answer = client.get("/v1/nothing")

    assert answer.status_code == 404
    assert answer.json()["error"]["type"] == "NotFound"


def test_serve_hands_the_store_and_a_metrics_folder_to_the_workers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    seen: dict[str, Any] = {}

    def run(app: str, **options: Any) -> None:
        seen.update(options, app=app, env=dict(os.environ))

    monkeypatch.setattr("uvicorn.run", run)
    store = f"sqlite:///{tmp_path / 'chat.db'}"

    result = CliRunner().invoke(cli, ["serve", "--workers", "3", "--store", store, "--offline"])

    assert result.exit_code == 0, result.output
    assert seen["app"] == "chatchain.server:create_app" and seen["factory"] is True
    assert (seen["host"], seen["port"], seen["workers"]) == ("127.0.0.1", 8000, 3)
    assert seen["env"]["CHATCHAIN_STORE"] == store
    assert seen["env"]["OPENAI_BASE_URL"].startswith("http://127.0.0.1:")
    assert seen["env"]["OPENAI_API_KEY"] == "offline"
    assert os.path.isdir(seen["env"]["PROMETHEUS_MULTIPROC_DIR"]) is False  # removed after
    assert "CHATCHAIN_STORE" not in os.environ and "PROMETHEUS_MULTIPROC_DIR" not in os.environ


def test_the_native_routes_in_process(app_client: tuple[TestClient, str]) -> None:
    client, _ = app_client
    assert client.post("/v1/sessions/a/messages", json={"text": "hi"}).status_code == 200
    streamed = client.post(
        "/v1/sessions/b/messages", json={"text": "yo"}, headers={"Accept": "text/event-stream"}
    )

    assert [name for name, _ in _events(streamed.text)][-2:] == ["usage", "done"]
    listed = client.get("/v1/sessions").json()["sessions"]
    assert [s["session_id"] for s in listed] == ["b", "a"]
    assert client.get("/v1/sessions/a/export").json()["session_id"] == "a"
    assert len(client.get("/v1/usage").json()["rows"]) == 2
    assert client.delete("/v1/sessions/a").status_code == 204
    assert client.get("/v1/sessions/a/messages").status_code == 404
    assert client.post("/v1/sessions/a/messages", json={"txt": "hi"}).status_code == 422
    assert (
        client.post("/v1/sessions/" + "x" * 256 + "/messages", json={"text": "hi"}).json()["error"][
            "type"
        ]
        == "InvalidInputError"
    )
    assert client.get("/v1/sessions", headers={"Authorization": "Bearer x"}).status_code == 401
    assert client.get("/healthz").json() == {"status": "ok"}
    assert "chatchain_turns_total" in client.get("/metrics").text


def test_limits_body_size_and_cors_in_process(fake: FakeChatModel) -> None:
    store = MemoryStore()
    settings = Settings(
        api_key="sk-test",
        server_requests_per_minute=3,
        server_streams_per_user=1,
        server_max_body_bytes=100,
        server_cors_origins="https://a.example",  # type: ignore[arg-type]  (as from the env)
    )
    token = Users(store).add("ann")
    app = create_app(Chatbot(settings, llm=fake, store=store))
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        too_big = client.post("/v1/sessions/s/messages", json={"text": "x" * 200})
        allowed = client.options(
            "/v1/usage",
            headers={"Origin": "https://a.example", "Access-Control-Request-Method": "GET"},
        )
        answers = [client.get("/v1/sessions") for _ in range(4)]

    assert settings.server_cors_origins == ("https://a.example",)
    assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "PayloadTooLarge"
    assert allowed.headers["access-control-allow-origin"] == "https://a.example"
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert int(answers[-1].headers["retry-after"]) >= 1


def test_a_users_stream_slots_are_counted_and_given_back() -> None:
    throttle = UserThrottle(requests_per_minute=0, streams=2)
    ann, bob = User("ann", datetime.now(UTC)), User("bob", datetime.now(UTC))

    async def main() -> HTTPProblem:
        first = await throttle.aopen_stream(ann)
        await throttle.aopen_stream(ann)
        await throttle.aopen_stream(bob)
        with pytest.raises(HTTPProblem) as refused:
            await throttle.aopen_stream(ann)
        await first.close()
        await first.close()  # once only
        await throttle.aopen_stream(ann)
        with pytest.raises(HTTPProblem):
            await throttle.aopen_stream(ann)
        return refused.value

    refused = asyncio.run(main())
    assert refused.status == 429 and refused.headers == {"Retry-After": "1"}
    assert "CHATCHAIN_SERVER_STREAMS_PER_USER" in refused.message


def test_healthz_answers_503_when_the_store_fails(fake: FakeChatModel) -> None:
    class Broken(MemoryStore):
        def count(self, session_id: str) -> int:
            raise errors.StoreError("down")

    store = Broken()
    Users(store)
    with TestClient(create_app(Chatbot(Settings(api_key="sk-test"), llm=fake, store=store))) as c:
        answer = c.get("/healthz")

    assert answer.status_code == 503 and answer.json()["error"]["type"] == "StoreError"
