"""The OpenAI-compatible routes in this process (FastAPI's TestClient over a FakeChatModel):
both modes of ``POST /v1/chat/completions``, streamed and not, the fields it refuses, its
errors in OpenAI's shape, and ``GET /v1/models``. The same through the ``openai`` SDK over
real uvicorn processes is in test_openai_compat.py and test_openai_errors.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from chatchain import Chatbot, Settings, errors
from chatchain.server import create_app
from chatchain.stores import MemoryStore
from chatchain.testing import FakeChatModel
from chatchain.users import Users

PATH = "/v1/chat/completions"


@pytest.fixture
def fake() -> FakeChatModel:
    return FakeChatModel(model_name="gpt-4o-mini")  # a real name, so turns have a price


@pytest.fixture
def users() -> Users:
    return Users(MemoryStore())


@pytest.fixture
def client(fake: FakeChatModel, users: Users) -> Iterator[TestClient]:
    settings = Settings(api_key="sk-test", server_requests_per_minute=0)
    bot = Chatbot(settings, llm=fake, store=users.store, system="Be kind.")
    token = users.add("ann")
    with TestClient(create_app(bot, users=users), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        yield client


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _body(text: str = "hi", **fields: Any) -> dict[str, Any]:
    return {"model": "any-name", "messages": _user(text), **fields}


def _fail(fake: FakeChatModel, error: BaseException) -> None:
    fake.errors.append(error)
    fake.model_post_init(None)  # the script's errors are read at construction


def _data(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order (pings and comments left out)."""
    found = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                found.append(line.removeprefix("data: "))
    return found


def _chunks(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The JSON chunks of a streamed completion, and the payloads that are not JSON."""
    data = _data(text)
    return [json.loads(d) for d in data if d.startswith("{")], [
        d for d in data if not d.startswith("{")
    ]


def _openai_error(answer: Any, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


def test_with_a_session_id_the_second_request_sees_the_first_turn(
    client: TestClient, fake: FakeChatModel
) -> None:
    fake.queue("Hello Bob!")
    headers = {"X-Session-Id": "s"}

    first = client.post(PATH, json=_body("I'm Bob"), headers=headers)
    # The request's earlier messages are ignored: the stored session is the conversation.
    messages = [
        {"role": "system", "content": "Be rude."},
        {"role": "user", "content": "ignored"},
        {"role": "user", "content": "Who am I?"},
    ]
    second = client.post(PATH, json={"model": "m", "messages": messages}, headers=headers)

    reply = first.json()
    assert first.status_code == 200 and reply["object"] == "chat.completion"
    assert reply["id"].startswith("chatcmpl-") and reply["model"] == "gpt-4o-mini"
    assert reply["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello Bob!", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    usage = reply["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert usage["cost_usd"] > 0
    assert second.json()["choices"][0]["message"]["content"] == "Echo: Who am I?"
    sent = [(type(m), m.text) for m in fake.calls[-1]]
    assert sent == [
        (SystemMessage, "Be kind."),
        (HumanMessage, "I'm Bob"),
        (AIMessage, "Hello Bob!"),
        (HumanMessage, "Who am I?"),
    ]
    stored = client.get("/v1/sessions/s/messages").json()["messages"]
    assert [m["text"] for m in stored] == ["I'm Bob", "Hello Bob!", "Who am I?", "Echo: Who am I?"]


def test_without_a_session_id_the_messages_go_as_sent_and_only_the_ledger_keeps_the_call(
    client: TestClient, fake: FakeChatModel
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "No emoji."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "My "}, {"type": "text", "text": "name"}],
        },
        {"role": "assistant", "content": "Noted.", "name": "bot"},
        {"role": "user", "content": "What is it?"},
    ]

    answer = client.post(PATH, json={"model": "m", "messages": messages})

    reply = answer.json()
    assert reply["choices"][0]["message"]["content"] == "Echo: What is it?"
    sent = fake.calls[-1]
    assert [(type(m), m.text) for m in sent] == [
        (SystemMessage, "Be brief."),
        (SystemMessage, "No emoji."),
        (HumanMessage, "My name"),
        (AIMessage, "Noted."),
        (HumanMessage, "What is it?"),
    ]
    assert sent[1].additional_kwargs == {"__openai_role__": "developer"}
    assert sent[3].name == "bot"
    assert client.get("/v1/sessions").json() == {"sessions": []}
    usage = client.get("/v1/usage").json()
    assert [row["session"] for row in usage["rows"]] == [reply["id"]]
    assert usage["total"]["total_tokens"] == reply["usage"]["total_tokens"]


@pytest.mark.parametrize("session_id", ["s", None], ids=["session", "stateless"])
@pytest.mark.parametrize("include_usage", [True, False], ids=["usage", "no-usage"])
def test_a_streamed_reply_is_chunks_that_add_up_to_the_reply_and_end_with_done(
    client: TestClient, fake: FakeChatModel, session_id: str | None, include_usage: bool
) -> None:
    fake.queue("one two three")
    headers = {"X-Session-Id": session_id} if session_id else {}
    body = _body(stream=True, stream_options={"include_usage": include_usage})

    answer = client.post(PATH, json=body, headers=headers)

    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    chunks, other = _chunks(answer.text)
    assert other == ["[DONE]"] and _data(answer.text)[-1] == "[DONE]"
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in with_choices)
    assert text == "one two three"
    assert [c["choices"][0]["finish_reason"] for c in with_choices][-1] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in with_choices[:-1])
    usage_chunks = [c for c in chunks if not c["choices"]]
    if include_usage:
        assert all(c["usage"] is None for c in with_choices)
        assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
        assert usage_chunks[0]["usage"]["total_tokens"] > 0
    else:
        assert usage_chunks == [] and all("usage" not in c for c in chunks)
    stored = client.get("/v1/sessions").json()["sessions"]
    assert [s["session_id"] for s in stored] == ([session_id] if session_id else [])
    rows = client.get("/v1/usage").json()["rows"]
    assert [row["session"] for row in rows] == [session_id or chunks[0]["id"]]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"n": 2}, "n=2"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tools": [{"type": "web_search"}]}, "only function tools"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "name"),
        ({"messages": [{"role": "tool", "content": "4"}]}, "tool_call_id"),
        ({"messages": [{"role": "function", "content": "4", "name": "f"}]}, "legacy"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c"}]}]}, "a tool call is"),
        ({"function_call": "auto"}, "function_call"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "logprobs"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy"}}, "audio"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"messages": [{"role": "user"}]}, "no content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "image_url",
        ),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_an_unsupported_field_is_a_400_in_openai_shape_before_any_call(
    client: TestClient, fake: FakeChatModel, fields: dict[str, Any], named: str
) -> None:
    for stream in (False, True):
        answer = client.post(PATH, json={**_body(stream=stream), **fields})

        error = _openai_error(answer, 400)
        assert error["type"] == "invalid_request_error"
        assert named in error["message"]
    assert fake.calls == []


def test_accepted_sampling_fields_and_text_response_format_change_nothing(
    client: TestClient, fake: FakeChatModel
) -> None:
    fields = {
        "temperature": 0.1,
        "n": 1,
        "tool_choice": "none",
        "response_format": {"type": "text"},
    }

    answer = client.post(PATH, json=_body("hi", **fields))

    assert answer.json()["choices"][0]["message"]["content"] == "Echo: hi"


def test_a_session_turn_needs_a_user_message(client: TestClient, fake: FakeChatModel) -> None:
    body = {"model": "m", "messages": [{"role": "system", "content": "Be brief."}]}

    answer = client.post(PATH, json=body, headers={"X-Session-Id": "s"})

    assert "role 'user'" in _openai_error(answer, 400)["message"]
    assert fake.calls == []


@pytest.mark.parametrize("authorization", [None, "Bearer cc_not-a-token"], ids=["none", "wrong"])
def test_a_missing_or_wrong_token_is_a_401_invalid_api_key(
    client: TestClient, fake: FakeChatModel, authorization: str | None
) -> None:
    del client.headers["Authorization"]
    headers = {"Authorization": authorization} if authorization else {}

    for answer in (
        client.post(PATH, json=_body(), headers=headers),
        client.get("/v1/models", headers=headers),
    ):
        assert _openai_error(answer, 401)["code"] == "invalid_api_key"
    assert fake.calls == []


def test_a_budget_refusal_is_a_429_insufficient_quota_not_to_be_retried(
    client: TestClient, fake: FakeChatModel, users: Users
) -> None:
    token = users.add("bob", budget_usd=1e-9)
    client.headers["Authorization"] = f"Bearer {token}"

    for headers in ({"X-Session-Id": "s"}, {}):
        for stream in (False, True):
            answer = client.post(PATH, json=_body(stream=stream), headers=headers)

            error = _openai_error(answer, 429)
            assert error["type"] == error["code"] == "insufficient_quota"
            assert answer.headers["x-should-retry"] == "false"
            assert "Budget exceeded" in error["message"] and "bob" in error["message"]
    assert fake.calls == []
    assert client.get("/v1/sessions").json() == {"sessions": []}


@pytest.mark.parametrize("session_id", ["s", None], ids=["session", "stateless"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_endpoint_failure_is_a_502_in_openai_shape(
    client: TestClient, fake: FakeChatModel, session_id: str | None, stream: bool
) -> None:
    _fail(fake, errors.ServerError("the endpoint broke"))
    headers = {"X-Session-Id": session_id} if session_id else {}

    answer = client.post(PATH, json=_body(stream=stream), headers=headers)

    error = _openai_error(answer, 502)
    assert error["type"] == "server_error" and error["code"] == "ServerError"
    assert "the endpoint broke" in error["message"]
    assert client.get("/v1/sessions").json() == {"sessions": []}
    assert client.post(PATH, json=_body("again")).status_code == 200  # the stream was closed


def test_an_unexpected_failure_is_a_500_without_its_details(
    client: TestClient, fake: FakeChatModel
) -> None:
    _fail(fake, RuntimeError("a bug with a secret sk-test"))

    answer = client.post(PATH, json=_body(stream=True))

    error = _openai_error(answer, 500)
    assert error["type"] == "server_error"
    assert "sk-test" not in answer.text and "Traceback" not in answer.text


@pytest.mark.parametrize("session_id", ["s", None], ids=["session", "stateless"])
def test_a_stream_cut_after_its_first_chunk_ends_with_an_error_event(
    client: TestClient, fake: FakeChatModel, session_id: str | None
) -> None:
    fake.fail_after_chunks = 2
    headers = {"X-Session-Id": session_id} if session_id else {}

    answer = client.post(PATH, json=_body("one two three", stream=True), headers=headers)

    assert answer.status_code == 200
    chunks, other = _chunks(answer.text)
    assert other == []  # no [DONE]
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks[:-1])
    assert text.strip() and "Echo: one two three".startswith(text)
    assert text != "Echo: one two three"
    error = chunks[-1]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error" and error["code"] == "EndpointConnectionError"
    if session_id:
        history = client.get("/v1/sessions/s/messages").json()["messages"]
        assert history[-1]["interrupted"] is True
    assert client.post(PATH, json=_body("again", stream=True)).status_code == 200


def test_the_models_list_names_the_configured_model(client: TestClient) -> None:
    listed = client.get("/v1/models").json()
    [entry] = listed["data"]
    model = client.get(f"/v1/models/{entry['id']}")
    other = client.get("/v1/models/gpt-5")

    assert listed["object"] == "list"
    assert entry["id"] == Settings(api_key="sk-test").model
    assert entry["object"] == "model" and entry["owned_by"] == "chatchain"
    assert model.json() == entry  # the same creation time on every call
    error = _openai_error(other, 404)
    assert "'gpt-5' is not served here" in error["message"]
