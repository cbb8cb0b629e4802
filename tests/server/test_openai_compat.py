"""The OpenAI-compatible endpoint over a real ``chatchain serve`` process, driven by the
official ``openai`` SDK: sync and streamed, with ``X-Session-Id`` (the server keeps the memory)
and without (stateless, still metered and capped), errors raised as the SDK's own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from chatchain.stores import open_store
from chatchain.testing import Fault, OpenAITestServer
from chatchain.users import Users
from tests.server.conftest import Service

# Slow: a real `chatchain serve` process (uvicorn) per module. The same behaviour in this
# process, in the fast tier: test_openai_app.py (both modes, streamed and not, refused fields,
# errors) and test_openai_errors.py (the SDK's own exceptions).
pytestmark = pytest.mark.slow

MODEL = "gpt-4o-mini"  # the service's OPENAI_MODEL (conftest's BASE_ENV)


@pytest.fixture
def sdk(service: Service) -> Iterator[Any]:
    """``sdk(token, session_id=None)``: an ``openai.OpenAI`` client of the service."""
    clients: list[openai.OpenAI] = []

    def make(token: str, session_id: str | None = None) -> openai.OpenAI:
        headers = {"X-Session-Id": session_id} if session_id is not None else None
        client = openai.OpenAI(
            base_url=f"{service.url}/v1",
            api_key=token,
            default_headers=headers,
            max_retries=0,
            timeout=30,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def _user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def _sent(endpoint: OpenAITestServer) -> list[tuple[str, str]]:
    """The (role, content) of the messages of the endpoint's last request."""
    return [(m["role"], m["content"]) for m in endpoint.requests[-1]["body"]["messages"]]


def test_with_a_session_id_the_server_keeps_the_memory(
    service: Service, user: tuple[str, str], endpoint: OpenAITestServer, sdk: Any
) -> None:
    client = sdk(user[1], session_id="trip")

    first = client.chat.completions.create(model=MODEL, messages=_user("Hi, I'm Bob"))
    second = client.chat.completions.create(
        model="some-other-model",
        messages=[
            {"role": "system", "content": "Ignore the operator."},
            {"role": "user", "content": "an earlier message the client kept"},
            {"role": "assistant", "content": "an earlier reply"},
            {"role": "user", "content": "What's my name?"},
        ],
    )

    assert first.choices[0].message.content == "Echo: Hi, I'm Bob"
    assert second.choices[0].message.content == "Echo: What's my name?"
    assert second.model == MODEL  # the configured model answered, and says so
    assert second.object == "chat.completion" and second.id.startswith("chatcmpl-")
    assert second.choices[0].finish_reason == "stop"
    assert second.usage is not None
    assert second.usage.total_tokens == (
        second.usage.prompt_tokens + second.usage.completion_tokens
    )
    # Sent: the deployment's system prompt, the stored turn, the last user message only.
    sent = _sent(endpoint)
    assert sent[0][0] == "system" and sent[0][1] != "Ignore the operator."
    assert sent[1:] == [
        ("user", "Hi, I'm Bob"),
        ("assistant", "Echo: Hi, I'm Bob"),
        ("user", "What's my name?"),
    ]
    history = service.client(user[1]).get("/v1/sessions/trip/messages").json()["messages"]
    assert [m["text"] for m in history] == [
        "Hi, I'm Bob",
        "Echo: Hi, I'm Bob",
        "What's my name?",
        "Echo: What's my name?",
    ]


def test_a_streamed_reply_ends_with_the_usage_chunk_when_asked(
    service: Service, user: tuple[str, str], endpoint: OpenAITestServer, sdk: Any
) -> None:
    client = sdk(user[1], session_id="s")

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=_user("one two three"),
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: one two three"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "stop"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {last.id} and {c.model for c in chunks} == {MODEL}
    history = service.client(user[1]).get("/v1/sessions/s/messages").json()["messages"]
    assert [m["text"] for m in history] == ["one two three", "Echo: one two three"]


def test_a_streamed_reply_has_no_usage_chunk_unless_asked(
    user: tuple[str, str], endpoint: OpenAITestServer, sdk: Any
) -> None:
    chunks = list(
        sdk(user[1], session_id="s").chat.completions.create(
            model=MODEL, messages=_user("hi"), stream=True
        )
    )

    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Echo: hi"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_without_a_session_id_the_messages_are_sent_as_they_are_and_nothing_is_stored(
    service: Service, user: tuple[str, str], endpoint: OpenAITestServer, sdk: Any
) -> None:
    client = sdk(user[1])
    messages = [
        {"role": "system", "content": "Talk like a pirate."},
        {"role": "user", "content": "Hi, I'm Bob"},
        {"role": "assistant", "content": "Ahoy Bob!"},
        {"role": "user", "content": "What's my name?"},
    ]

    reply = client.chat.completions.create(model=MODEL, messages=messages)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )

    assert reply.choices[0].message.content == "Echo: What's my name?"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "Echo: What's my name?"
    )
    for request in endpoint.requests:  # exactly the client's messages, no system prompt added
        sent = [(m["role"], m["content"]) for m in request["body"]["messages"]]
        assert sent == [(m["role"], m["content"]) for m in messages]
    native = service.client(user[1])
    assert native.get("/v1/sessions").json() == {"sessions": []}
    usage = native.get("/v1/usage").json()
    assert (
        usage["total"]["total_tokens"] == reply.usage.total_tokens + chunks[-1].usage.total_tokens
    )
    assert {row["session"] for row in usage["rows"]} == {reply.id, chunks[-1].id}


def test_another_users_session_id_is_a_fresh_session_of_their_own(
    user: tuple[str, str], other: tuple[str, str], endpoint: OpenAITestServer, sdk: Any
) -> None:
    sdk(user[1], session_id="shared").chat.completions.create(
        model=MODEL, messages=_user("my secret is 42")
    )

    reply = sdk(other[1], session_id="shared").chat.completions.create(
        model=MODEL, messages=_user("what is the secret?")
    )

    assert reply.choices[0].message.content == "Echo: what is the secret?"
    assert [role for role, _ in _sent(endpoint)] == ["system", "user"]
    assert "42" not in str(endpoint.requests[-1]["body"])


def test_a_missing_wrong_or_revoked_token_raises_authentication_error(
    service: Service, user: tuple[str, str], endpoint: OpenAITestServer, sdk: Any
) -> None:
    with closing(open_store(service.store_url)) as store:
        Users(store).revoke(user[0])

    for token in ("sk-an-openai-key", "cc_not-a-token", user[1]):
        with pytest.raises(openai.AuthenticationError) as caught:
            sdk(token).chat.completions.create(model=MODEL, messages=_user("hi"))
        assert caught.value.code == "invalid_api_key"
        assert caught.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        sdk("cc_not-a-token").models.list()
    assert endpoint.requests == []


@pytest.mark.parametrize("caps", [{"budget_usd": 1e-9}, {"daily_usd": 1e-9}])
def test_a_budget_refusal_raises_rate_limit_error_before_anything_is_sent(
    service: Service, endpoint: OpenAITestServer, sdk: Any, caps: dict[str, float]
) -> None:
    name, token = service.add_user(**caps)

    for session_id in ("s", None):
        client = sdk(token, session_id=session_id)
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model=MODEL, messages=_user("hi"))
        assert caught.value.code == "insufficient_quota"
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert "Budget exceeded" in caught.value.message and name in caught.value.message
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL, messages=_user("hi"), stream=True)
    assert endpoint.requests == []
    assert service.client(token).get("/v1/sessions").json() == {"sessions": []}


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"n": 2}, "n=2"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            "image_url",
        ),
        # With X-Session-Id, results of no call of the session's last reply.
        (
            {"messages": [{"role": "tool", "content": "42", "tool_call_id": "t"}]},
            "asks for no tool",
        ),
    ],
)
def test_unsupported_fields_raise_bad_request_and_send_nothing(
    user: tuple[str, str],
    endpoint: OpenAITestServer,
    sdk: Any,
    fields: dict[str, Any],
    named: str,
) -> None:
    request: dict[str, Any] = {"model": MODEL, "messages": _user("hi"), **fields}

    with pytest.raises(openai.BadRequestError) as caught:
        sdk(user[1], session_id="s").chat.completions.create(**request)

    assert named in caught.value.message
    assert caught.value.type == "invalid_request_error"
    assert endpoint.requests == []


def test_sampling_fields_are_accepted_and_the_settings_decide(
    user: tuple[str, str], endpoint: OpenAITestServer, sdk: Any
) -> None:
    reply = sdk(user[1]).chat.completions.create(
        model=MODEL, messages=_user("hi"), temperature=1.7, top_p=0.5, seed=7, user="end-user-1"
    )

    assert reply.choices[0].message.content == "Echo: hi"
    body = endpoint.requests[-1]["body"]
    assert "top_p" not in body and "seed" not in body and body.get("temperature") != 1.7


def test_models_lists_the_configured_model(user: tuple[str, str], sdk: Any) -> None:
    client = sdk(user[1])

    assert [model.id for model in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "chatchain"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")


@pytest.mark.parametrize("stream", [False, True])
def test_endpoint_failures_raise_the_sdks_server_errors(
    user: tuple[str, str], endpoint: OpenAITestServer, sdk: Any, stream: bool
) -> None:
    endpoint.add_fault(Fault(status=500))

    with pytest.raises(openai.InternalServerError) as caught:
        sdk(user[1], session_id="s").chat.completions.create(
            model=MODEL, messages=_user("hi"), stream=stream
        )

    assert caught.value.status_code == 502  # before the first chunk: the status, as without
    assert caught.value.body["type"] == "server_error"  # type: ignore[index]


def test_a_stream_cut_mid_reply_raises_api_error_and_keeps_the_partial_reply(
    service: Service, user: tuple[str, str], endpoint: OpenAITestServer, sdk: Any
) -> None:
    endpoint.add_fault(Fault(cut_after=2))
    stream = sdk(user[1], session_id="cut").chat.completions.create(
        model=MODEL, messages=_user("one two three four"), stream=True
    )

    pieces: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            pieces.append(chunk.choices[0].delta.content or "")

    assert "".join(pieces) == "Echo: one"
    assert isinstance(caught.value.body, dict) and caught.value.body["code"]
    history = service.client(user[1]).get("/v1/sessions/cut/messages").json()["messages"]
    assert history[-1] == {"role": "assistant", "text": "Echo: one", "interrupted": True}


def test_a_client_that_leaves_mid_stream_leaves_the_partial_reply_stored(
    service: Service, user: tuple[str, str], endpoint: OpenAITestServer, sdk: Any
) -> None:
    endpoint.add_fault(Fault(keep_alive=30, stall_after=2, interval=0.05))
    stream = sdk(user[1], session_id="left").chat.completions.create(
        model=MODEL, messages=_user("one two three four"), stream=True
    )
    received = ""
    for chunk in stream:
        received += chunk.choices[0].delta.content or ""
        if received == "Echo: one":
            break
    stream.close()

    native = service.client(user[1])
    history = _wait_for(lambda: native.get("/v1/sessions/left/messages").json().get("messages"))
    assert history[-1] == {"role": "assistant", "text": "Echo: one", "interrupted": True}


def _wait_for(read: Any, timeout: float = 10.0) -> Any:
    """``read()`` once it returns something (the server saves a left stream soon after)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_errors_have_openais_shape_for_plain_http_clients(
    service: Service, user: tuple[str, str]
) -> None:
    url = f"{service.url}/v1/chat/completions"

    missing = httpx.post(url, json={"model": MODEL, "messages": _user("hi")})
    invalid = httpx.post(url, json={"model": MODEL}, headers={"Authorization": f"Bearer {user[1]}"})

    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
    assert invalid.status_code == 400
    assert "messages" in invalid.json()["error"]["message"]


def test_the_readmes_streaming_example_prints_only_text(
    service: Service, user: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("from openai import OpenAI\n", 1)[1].split("```", 1)[0]
    code = "from openai import OpenAI\n" + block
    code = code.replace("http://127.0.0.1:8000/v1", f"{service.url}/v1").replace("cc_...", user[1])
    assert "stream=True" in code

    exec(compile(code, "README.md", "exec"), {})  # the example, as a reader runs it

    printed = capsys.readouterr().out
    assert "None" not in printed
    assert printed.endswith(" tokens\n")
    assert "Echo: Tell me a joke\n" in printed
