"""Tests for chatchain's OpenAI-compatible test server, driven by the real clients."""

from __future__ import annotations

import http.client
import itertools
import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from chatchain.testing import Fault, OpenAITestServer, ScriptedCall, echo_reply

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-do-not-leak"
MODEL = "gpt-4o-mini"


@pytest.fixture
def server() -> Iterator[OpenAITestServer]:
    with OpenAITestServer() as srv:
        yield srv


@pytest.fixture
def client(server: OpenAITestServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0) as c:
        yield c


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def connect(server: OpenAITestServer) -> http.client.HTTPConnection:
    url = urlsplit(server.base_url)
    assert url.hostname is not None
    assert url.port is not None
    return http.client.HTTPConnection(url.hostname, url.port, timeout=5)


def raw_request(
    server: OpenAITestServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = connect(server)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def sse_events(payload: bytes) -> list[str]:
    """The ``data:`` values of an SSE body, in order."""
    events = [e for e in payload.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: ") :] for e in events]


def expected_prompt_tokens(server: OpenAITestServer, texts: list[str]) -> int:
    return sum(server.count_tokens(t) + 4 for t in texts) + 3


# --- replies and usage ------------------------------------------------------------------


def test_echo_reply_function() -> None:
    assert echo_reply(user("hi")) == "Echo: hi"
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "later"},
    ]
    assert echo_reply(messages) == "Echo: ab"
    assert echo_reply([{"role": "system", "content": "sys"}]) == "Echo: "


def test_echo_reply_through_openai_client(
    server: OpenAITestServer, client: openai.OpenAI, capfd: pytest.CaptureFixture[str]
) -> None:
    reply = client.chat.completions.create(model="my-model", messages=user("hello there"))
    assert reply.choices[0].message.content == "Echo: hello there"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == "my-model"
    assert reply.system_fingerprint
    # Nothing is logged per request.
    assert capfd.readouterr().err == ""


def test_custom_reply_function() -> None:
    with (
        OpenAITestServer(reply=lambda messages: f"{len(messages)} messages") as server,
        openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0) as client,
    ):
        messages = [{"role": "system", "content": "s"}, *user("u")]
        reply = client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "2 messages"


def test_queued_replies_are_used_in_order_then_fallback(
    server: OpenAITestServer, client: openai.OpenAI
) -> None:
    server.queue_replies("first", "second")
    server.queue_replies("third")
    contents = [
        client.chat.completions.create(model=MODEL, messages=user(f"q{i}"))
        .choices[0]
        .message.content
        for i in range(4)
    ]
    assert contents == ["first", "second", "third", "Echo: q3"]


def test_count_tokens_with_a_real_tokenizer() -> None:
    server = OpenAITestServer()  # o200k_base, as OpenAI's gpt-4o family bills
    assert server.count_tokens("") == 0
    assert server.count_tokens("Hello world") == 2
    assert server.count_tokens("x" * 40) == 5
    # CJK text costs about a token a character, not a quarter of one.
    assert server.count_tokens("北京的天气怎么样明天会下雨吗") >= 10
    assert OpenAITestServer(encoding="cl100k_base").count_tokens("Hello world") == 2


def test_count_tokens_by_characters() -> None:
    server = OpenAITestServer(encoding=None)
    assert server.count_tokens("") == 0
    assert server.count_tokens("a") == 1
    assert server.count_tokens("abcd") == 1
    assert server.count_tokens("abcde") == 2
    assert server.count_tokens("x" * 40) == 10


def test_usage_matches_count_tokens_formula(
    server: OpenAITestServer, client: openai.OpenAI
) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello there, world!"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": [{"type": "text", "text": "How are you doing today?"}]},
    ]
    server.queue_replies("Fine, thank you very much.")
    reply = client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    usage = reply.usage
    assert usage is not None
    prompt = expected_prompt_tokens(
        server, ["You are terse.", "Hello there, world!", "Hi.", "How are you doing today?"]
    )
    completion = server.count_tokens("Fine, thank you very much.")
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        prompt,
        completion,
        prompt + completion,
    )
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 0


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_truncates_with_finish_reason_length(
    server: OpenAITestServer, client: openai.OpenAI, param: str
) -> None:
    server.queue_replies("one two three four five six", "short")
    reply = client.chat.completions.create(model=MODEL, messages=user("x"), **{param: 2})
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content == "one two"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 2
    reply = client.chat.completions.create(model=MODEL, messages=user("x"), **{param: 2})
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == "short"


# --- streaming --------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [True, False])
def test_streaming_chunks_join_to_reply(
    server: OpenAITestServer, client: openai.OpenAI, include_usage: bool
) -> None:
    text = "Hello  there,\n\nworld! How are you?  "
    server.queue_replies(text)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=user("hi"),
        stream=True,
        stream_options={"include_usage": include_usage},
    )
    chunks = list(stream)
    contents = [c.choices[0].delta.content for c in chunks if c.choices]
    assert contents[0] == ""
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(contents) == 2 + len(text.split())  # role chunk + one per word + finish chunk
    assert "".join(c or "" for c in contents) == text
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    usage_chunks = [c for c in chunks if not c.choices]
    if include_usage:
        assert len(usage_chunks) == 1
        assert chunks[-1] is usage_chunks[0]
        assert chunks[-2].choices[0].finish_reason == "stop"
        usage = chunks[-1].usage
        assert usage is not None
        prompt = expected_prompt_tokens(server, ["hi"])
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
            prompt,
            server.count_tokens(text),
            prompt + server.count_tokens(text),
        )
    else:
        assert usage_chunks == []
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert all(c.usage is None for c in chunks)


@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_wire_format(include_usage: bool) -> None:
    text = "  alpha beta\tgamma delta epsilon "
    with OpenAITestServer(chunk_words=2) as server:
        server.queue_replies(text)
        body: dict[str, Any] = {"model": "m1", "messages": user("hi"), "stream": True}
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        status, headers, payload = raw_request(
            server, "POST", "/v1/chat/completions", json.dumps(body).encode()
        )
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["Transfer-Encoding"] == "chunked"
    events = sse_events(payload)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {(c["id"], c["created"], c["model"], c["object"]) for c in chunks} == {
        (chunks[0]["id"], chunks[0]["created"], "m1", "chat.completion.chunk")
    }
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    if include_usage:
        *choice_chunks, usage_chunk = chunks
        assert usage_chunk["choices"] == []
        assert usage_chunk["usage"]["completion_tokens"] == server.count_tokens(text)
        assert all("usage" in c and c["usage"] is None for c in choice_chunks)
    else:
        choice_chunks = chunks
        assert all("usage" not in c for c in chunks)
    finish = choice_chunks[-1]["choices"][0]
    assert finish["delta"] == {}
    assert finish["finish_reason"] == "stop"
    pieces = [c["choices"][0]["delta"]["content"] for c in choice_chunks[1:-1]]
    assert pieces == ["  alpha beta", "\tgamma delta", " epsilon "]  # two words per chunk
    assert all(c["choices"][0]["finish_reason"] is None for c in choice_chunks[:-1])


def test_streaming_with_max_tokens_finishes_with_length(
    server: OpenAITestServer, client: openai.OpenAI
) -> None:
    server.queue_replies("one two three four five six")
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=user("x"), stream=True, max_tokens=2)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "one two"
    assert chunks[-1].choices[0].finish_reason == "length"


# --- LangChain --------------------------------------------------------------------------


def test_langchain_invoke_and_stream_usage_metadata(server: OpenAITestServer) -> None:
    llm = ChatOpenAI(
        base_url=server.base_url,
        api_key=API_KEY,  # type: ignore[arg-type]
        model=MODEL,
        stream_usage=True,
        max_retries=0,
    )
    prompt = expected_prompt_tokens(server, ["hello world"])
    completion = server.count_tokens("Echo: hello world")

    message = llm.invoke("hello world")
    assert message.content == "Echo: hello world"
    assert message.usage_metadata is not None
    assert message.usage_metadata["input_tokens"] == prompt
    assert message.usage_metadata["output_tokens"] == completion
    assert message.usage_metadata["total_tokens"] == prompt + completion

    chunks = list(llm.stream("hello world"))
    assert len(chunks) > 3
    assert "".join(str(c.content) for c in chunks) == "Echo: hello world"
    with_usage = [c for c in chunks if c.usage_metadata]
    assert len(with_usage) == 1
    usage = with_usage[0].usage_metadata
    assert usage is not None
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (
        prompt,
        completion,
        prompt + completion,
    )
    assert server.requests[-1]["body"]["stream_options"] == {"include_usage": True}


# --- faults -----------------------------------------------------------------------------


def test_429_with_retry_after_is_retried_then_succeeds(server: OpenAITestServer) -> None:
    server.add_fault(Fault(status=429, retry_after=0.05))
    with openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=1) as client:
        started = time.perf_counter()
        reply = client.chat.completions.create(model=MODEL, messages=user("again"))
        elapsed = time.perf_counter() - started
    assert reply.choices[0].message.content == "Echo: again"
    requests = server.requests
    assert len(requests) == 2
    assert requests[1]["headers"]["x-stainless-retry-count"] == "1"
    # The client waited for retry-after-ms (50 ms), not its own >= 375 ms backoff.
    assert elapsed < 0.3


def test_error_fault_wire_format(server: OpenAITestServer) -> None:
    server.add_fault(Fault(status=429, retry_after=1.5))
    server.add_fault(Fault(status=401, message="bad key"))
    body = json.dumps({"model": MODEL, "messages": user("x")}).encode()
    status, headers, payload = raw_request(server, "POST", "/v1/chat/completions", body)
    assert status == 429
    assert headers["Retry-After"] == "1.5"
    assert headers["retry-after-ms"] == "1500"
    assert headers["Content-Type"] == "application/json"
    assert json.loads(payload) == {
        "error": {
            "message": "Rate limit reached for requests. Please try again shortly.",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    status, headers, payload = raw_request(server, "POST", "/v1/chat/completions", body)
    assert status == 401
    assert "Retry-After" not in headers
    assert json.loads(payload)["error"] == {
        "message": "bad key",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }


def test_500_raises_internal_server_error_without_retries(
    server: OpenAITestServer, client: openai.OpenAI
) -> None:
    server.add_fault(Fault(status=500))
    with pytest.raises(openai.InternalServerError) as excinfo:
        client.chat.completions.create(model=MODEL, messages=user("x"))
    assert excinfo.value.status_code == 500
    assert excinfo.value.type == "server_error"
    assert len(server.requests) == 1
    # The fault is used up: the next request succeeds.
    assert (
        client.chat.completions.create(model=MODEL, messages=user("y")).choices[0].message.content
    )


def test_faults_are_fifo_and_times_counts_down(
    server: OpenAITestServer, client: openai.OpenAI
) -> None:
    server.add_fault(Fault(status=500, times=2))
    server.add_fault(Fault(status=503))
    server.queue_replies("finally")
    statuses = []
    for _ in range(3):
        with pytest.raises(openai.APIStatusError) as excinfo:
            client.chat.completions.create(model=MODEL, messages=user("x"))
        statuses.append(excinfo.value.status_code)
    assert statuses == [500, 500, 503]
    # Errors did not use up the queued reply.
    reply = client.chat.completions.create(model=MODEL, messages=user("x"))
    assert reply.choices[0].message.content == "finally"


def test_fault_validation() -> None:
    with pytest.raises(ValueError, match="status"):
        Fault(status=200)
    with pytest.raises(ValueError, match="times"):
        Fault(times=0)
    with pytest.raises(ValueError, match="delay"):
        Fault(delay=-1)


def test_delay_beyond_client_timeout_raises_timeout(server: OpenAITestServer) -> None:
    server.add_fault(Fault(delay=2.0))
    with openai.OpenAI(
        base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=0.2
    ) as client:
        started = time.perf_counter()
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model=MODEL, messages=user("slow"))
        assert time.perf_counter() - started < 1.5
        # A delay shorter than the timeout only slows the reply down.
        server.add_fault(Fault(delay=0.05))
        started = time.perf_counter()
        reply = client.chat.completions.create(model=MODEL, messages=user("ok"))
        assert time.perf_counter() - started >= 0.05
    assert reply.choices[0].message.content == "Echo: ok"


@pytest.mark.parametrize("cut_after", [0, 2])
def test_cut_after_drops_stream_after_n_content_chunks(
    server: OpenAITestServer, client: openai.OpenAI, cut_after: int
) -> None:
    server.add_fault(Fault(cut_after=cut_after))
    received: list[str] = []
    stream = client.chat.completions.create(model=MODEL, messages=user("a b c d e f"), stream=True)

    def consume() -> None:
        for chunk in stream:
            assert chunk.choices[0].finish_reason is None
            received.append(chunk.choices[0].delta.content or "")

    with pytest.raises(openai.APIConnectionError):
        consume()
    assert received == ["", *["Echo:", " a", " b"][:cut_after]]
    # The server keeps serving.
    reply = client.chat.completions.create(model=MODEL, messages=user("next"))
    assert reply.choices[0].message.content == "Echo: next"


def test_malformed_json_reply_raises(server: OpenAITestServer, client: openai.OpenAI) -> None:
    server.add_fault(Fault(malformed=True, times=2))
    with pytest.raises(json.JSONDecodeError):
        client.chat.completions.create(model=MODEL, messages=user("x"))
    with pytest.raises(json.JSONDecodeError):
        list(client.chat.completions.create(model=MODEL, messages=user("x"), stream=True))
    reply = client.chat.completions.create(model=MODEL, messages=user("x"))
    assert reply.choices[0].message.content == "Echo: x"


def test_context_window_exceeded_is_bad_request() -> None:
    with (
        OpenAITestServer(context_window=30, encoding=None) as server,
        openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0) as client,
    ):
        fits = "x" * (4 * (30 - 7))  # 23 tokens + 4 + 3 == 30
        assert client.chat.completions.create(model=MODEL, messages=user(fits)).choices
        with pytest.raises(openai.BadRequestError) as excinfo:
            client.chat.completions.create(model=MODEL, messages=user(fits + "y"))
    error = excinfo.value
    assert error.code == "context_length_exceeded"
    assert error.type == "invalid_request_error"
    assert "maximum context length is 30 tokens" in error.message
    assert "resulted in 31 tokens" in error.message


# --- protocol ---------------------------------------------------------------------------


def test_authorization_is_never_recorded(server: OpenAITestServer, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL, messages=user("x"))
    list(client.chat.completions.create(model=MODEL, messages=user("y"), stream=True))
    requests = server.requests
    assert len(requests) == 2
    for request in requests:
        assert request["headers"]["authorization"] == "<redacted>"
        assert API_KEY not in repr(request)
    assert requests[0]["body"]["messages"] == user("x")
    assert requests[1]["body"]["stream"] is True


def test_requests_is_a_copy_and_clear_forgets_everything(
    server: OpenAITestServer, client: openai.OpenAI
) -> None:
    client.chat.completions.create(model=MODEL, messages=user("x"))
    server.requests[0]["body"]["messages"].clear()
    assert server.requests[0]["body"]["messages"] == user("x")
    server.queue_replies("never used")
    server.add_fault(Fault(status=500))
    server.clear()
    assert server.requests == []
    reply = client.chat.completions.create(model=MODEL, messages=user("y"))
    assert reply.choices[0].message.content == "Echo: y"


def test_models_unknown_path_and_invalid_json(
    server: OpenAITestServer, client: openai.OpenAI
) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    status, _, payload = raw_request(server, "POST", "/v1/nope", b"{}")
    assert status == 404
    assert json.loads(payload)["error"]["type"] == "invalid_request_error"
    status, _, payload = raw_request(server, "GET", "/elsewhere")
    assert status == 404
    assert "message" in json.loads(payload)["error"]
    status, _, payload = raw_request(server, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400
    assert json.loads(payload)["error"]["type"] == "invalid_request_error"
    assert server.requests[-1]["body"] is None


def test_connection_is_kept_alive_across_requests(server: OpenAITestServer) -> None:
    conn = connect(server)
    try:
        sockets = []
        for stream in (False, True, False):
            body = json.dumps({"model": MODEL, "messages": user("k"), "stream": stream})
            conn.request("POST", "/v1/chat/completions", body=body)
            resp = conn.getresponse()
            assert resp.status == 200
            assert not resp.will_close
            resp.read()
            sockets.append(conn.sock)
        assert sockets[0] is not None
        assert sockets.count(sockets[0]) == 3
        # Accepted sockets have Nagle's algorithm off.
        (server_side,) = server._httpd.connections  # type: ignore[union-attr]
        assert server_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        conn.close()


def test_many_concurrent_clients(server: OpenAITestServer, client: openai.OpenAI) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(3):
                text = f"t{n}-{i}"
                reply = client.chat.completions.create(model=MODEL, messages=user(text))
                assert reply.choices[0].message.content == f"Echo: {text}"
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert errors == []
    assert len(server.requests) == 72


def test_client_disconnect_mid_stream_is_silent(capfd: pytest.CaptureFixture[str]) -> None:
    with OpenAITestServer(reply=lambda messages: "word " * 100_000) as server:
        with openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0) as client:
            stream = client.chat.completions.create(model=MODEL, messages=user("x"), stream=True)
            first = next(iter(stream))
            assert first.choices[0].delta.role == "assistant"
            stream.close()
        server.stop()
        assert server._httpd is None
    assert capfd.readouterr().err == ""


# --- lifecycle --------------------------------------------------------------------------


def test_stop_is_prompt_with_kept_alive_connection_open() -> None:
    server = OpenAITestServer().start()
    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
    idle = connect(server)
    try:
        client.chat.completions.create(model=MODEL, messages=user("x"))  # pooled connection
        idle.request("GET", "/v1/models")
        idle.getresponse().read()
        assert idle.sock is not None
        server.add_fault(Fault(delay=30))  # and one request stuck in a long delay
        outcome: list[BaseException] = []

        def call_stuck() -> None:
            try:
                client.chat.completions.create(model=MODEL, messages=user("stuck"))
            except BaseException as exc:
                outcome.append(exc)

        stuck = threading.Thread(target=call_stuck)
        stuck.start()
        deadline = time.monotonic() + 5
        while len(server.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)

        started = time.perf_counter()
        server.stop()
        assert time.perf_counter() - started < 2.0
        stuck.join(timeout=5)
        assert not stuck.is_alive()
        # The stuck request's connection was closed without a reply.
        assert len(outcome) == 1
        assert isinstance(outcome[0], openai.APIConnectionError)
        # The idle kept-alive connection was closed by the server.
        idle.sock.settimeout(2)
        assert idle.sock.recv(1) == b""
        server.stop()  # idempotent
        with pytest.raises(RuntimeError):
            _ = server.base_url
    finally:
        idle.close()
        client.close()
        server.stop()


def test_server_can_be_restarted() -> None:
    server = OpenAITestServer()
    with pytest.raises(RuntimeError):
        _ = server.base_url
    for _ in range(2):
        with server, openai.OpenAI(base_url=server.base_url, api_key=API_KEY) as client:
            assert client.chat.completions.create(model=MODEL, messages=user("r")).choices


def _start_cli(*extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatchain.testing", "--port", "0", "--model", "cli-model", *extra],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    if not ready:
        proc.kill()
        proc.communicate()
        pytest.fail("the server did not print its base_url")
    line = proc.stdout.readline().strip()
    assert line.startswith("base_url=http://127.0.0.1:"), line
    assert line.endswith("/v1")
    return proc, line.removeprefix("base_url=")


@pytest.mark.slow  # a server process
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_prints_base_url_serves_and_stops_on_signal(sig: signal.Signals) -> None:
    proc, base_url = _start_cli()
    try:
        with openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as client:
            assert [m.id for m in client.models.list()] == ["cli-model"]
            reply = client.chat.completions.create(model="cli-model", messages=user("cli"))
            assert reply.choices[0].message.content == "Echo: cli"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=10)
        assert proc.returncode == 0
        assert stderr == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# --- hostile endpoints ------------------------------------------------------------------


def test_hostile_fault_validation() -> None:
    with pytest.raises(ValueError, match="keep_alive"):
        Fault(keep_alive=-1)
    with pytest.raises(ValueError, match="drip"):
        Fault(drip=-0.5)
    with pytest.raises(ValueError, match="stall_after"):
        Fault(stall_after=-1)
    with pytest.raises(ValueError, match="interval"):
        Fault(interval=0)
    with pytest.raises(ValueError, match="answer_model"):
        Fault(answer_model="")


def test_keep_alive_stream_sends_comments_after_stall_then_the_reply(
    server: OpenAITestServer,
) -> None:
    server.add_fault(Fault(keep_alive=0.3, interval=0.1, stall_after=2))
    body = json.dumps({"model": MODEL, "messages": user("a b c"), "stream": True}).encode()
    started = time.perf_counter()
    status, _, payload = raw_request(
        server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    assert status == 200
    assert time.perf_counter() - started >= 0.3  # the server held the reply back
    events = [e for e in payload.decode().split("\n\n") if e]
    comments = [i for i, e in enumerate(events) if e.startswith(":")]
    assert [events[i] for i in comments] == [": keep-alive"] * 3
    # The role chunk and two content chunks, then the comments, then the rest of the reply.
    assert comments == [3, 4, 5]
    data = [json.loads(e[len("data: ") :]) for e in events if e.startswith("data: {")]
    assert "".join(d["choices"][0]["delta"].get("content") or "" for d in data) == "Echo: a b c"
    assert events[-1] == "data: [DONE]"


def test_keep_alive_comments_are_invisible_to_the_client(
    server: OpenAITestServer, client: openai.OpenAI
) -> None:
    server.add_fault(Fault(keep_alive=0.2, interval=0.05, times=2))
    reply = client.chat.completions.create(model=MODEL, messages=user("slow"))
    assert reply.choices[0].message.content == "Echo: slow"
    stream = client.chat.completions.create(model=MODEL, messages=user("slow"), stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Echo: slow"


def test_keep_alive_non_streamed_body_starts_with_blanks(server: OpenAITestServer) -> None:
    server.add_fault(Fault(keep_alive=0.3, interval=0.1))
    body = json.dumps({"model": MODEL, "messages": user("x")}).encode()
    status, headers, payload = raw_request(
        server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    assert status == 200
    assert payload.startswith(b"   {") and int(headers["Content-Length"]) == len(payload)
    assert json.loads(payload)["choices"][0]["message"]["content"] == "Echo: x"


@pytest.mark.parametrize("stream", [False, True])
def test_drip_sends_the_body_a_byte_at_a_time_then_the_rest(
    server: OpenAITestServer, stream: bool
) -> None:
    server.add_fault(Fault(drip=0.2, interval=0.05))  # 4 single bytes
    conn = connect(server)
    try:
        body = json.dumps({"model": MODEL, "messages": user("drip"), "stream": stream})
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        pieces = [resp.read1(65536) for _ in range(4)]
        rest = resp.read()
    finally:
        conn.close()
    if stream:  # one byte per chunk of the chunked body
        assert pieces == [b"d", b"a", b"t", b"a"]
    else:  # one byte per read while the body trickles (Content-Length framing)
        assert [len(p) for p in pieces] == [1, 1, 1, 1] and pieces[0] == b"{"
    whole = b"".join(pieces) + rest
    if stream:
        assert b'"content": " drip"' in whole and whole.endswith(b"data: [DONE]\n\n")
    else:
        assert json.loads(whole)["choices"][0]["message"]["content"] == "Echo: drip"


def test_stop_is_prompt_during_a_trickle() -> None:
    server = OpenAITestServer().start()
    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
    server.add_fault(Fault(keep_alive=30))
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            list(client.chat.completions.create(model=MODEL, messages=user("x"), stream=True))
        except BaseException as exc:
            outcome.append(exc)

    trickled = threading.Thread(target=call)
    try:
        trickled.start()
        deadline = time.monotonic() + 5
        while not server.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.perf_counter()
        server.stop()
        assert time.perf_counter() - started < 5  # not the 30 s of the trickle
        trickled.join(timeout=5)
        assert not trickled.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], openai.APIConnectionError)
    finally:
        client.close()
        server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_answer_model_answers_under_another_name(
    server: OpenAITestServer, client: openai.OpenAI, stream: bool
) -> None:
    server.add_fault(Fault(answer_model="openrouter/gpt-4o-mini"))
    if stream:
        chunks = list(client.chat.completions.create(model=MODEL, messages=user("x"), stream=True))
        assert {c.model for c in chunks} == {"openrouter/gpt-4o-mini"}
    else:
        reply = client.chat.completions.create(model=MODEL, messages=user("x"))
        assert reply.model == "openrouter/gpt-4o-mini"
    assert server.requests[0]["body"]["model"] == MODEL
    # One request only: the next one is answered under the name it asked for.
    assert client.chat.completions.create(model=MODEL, messages=user("y")).model == MODEL


def test_lone_surrogate_reply_is_valid_json_but_not_valid_unicode(
    server: OpenAITestServer, client: openai.OpenAI
) -> None:
    server.add_fault(Fault(lone_surrogate=True, times=2))
    body = json.dumps({"model": MODEL, "messages": user("smile")}).encode()
    _, _, payload = raw_request(
        server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    assert b'"Echo: smile \\ud83d"' in payload  # a JSON escape: the body itself is ASCII
    reply = client.chat.completions.create(model=MODEL, messages=user("smile"))
    text = reply.choices[0].message.content
    assert text == "Echo: smile \ud83d"
    with pytest.raises(UnicodeEncodeError):
        text.encode("utf-8")


@pytest.mark.slow  # a server process
def test_cli_hostile_modes_apply_to_every_request() -> None:
    proc, base_url = _start_cli("--hostile", "alias", "--hostile", "lone-surrogate")
    try:
        with openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as client:
            for text in ("one", "two"):
                reply = client.chat.completions.create(model="cli-model", messages=user(text))
                assert reply.model == "openrouter/cli-model"
                assert reply.choices[0].message.content == f"Echo: {text} \ud83d"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
        assert (proc.returncode, stderr) == (0, "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_cli_hostile_keep_alive_is_the_30_second_trickle() -> None:
    from chatchain.testing.__main__ import hostile_fault

    fault = hostile_fault(["keep-alive", "byte-a-second"], "m")
    assert fault is not None
    assert (fault.keep_alive, fault.stall_after, fault.drip, fault.answer_model) == (
        30.0,
        2,
        30.0,
        None,
    )
    assert fault.times == sys.maxsize


# --- tool calls and structured replies --------------------------------------------------

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
    },
}


def chat_openai(server: OpenAITestServer, **kwargs: Any) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=server.base_url,
        api_key=API_KEY,  # type: ignore[arg-type]
        model=MODEL,
        stream_usage=True,
        max_retries=0,
        **kwargs,
    )


def test_tool_rule_calls_the_offered_tool_then_answers_with_the_results(
    server: OpenAITestServer, client: openai.OpenAI
) -> None:
    server.add_tool_rule("get_weather", {"city": "Oslo"})
    server.add_tool_rule("not_offered", {})
    asked: list[Any] = user("Weather in Oslo?")
    first = client.chat.completions.create(model=MODEL, messages=asked, tools=[WEATHER_TOOL])  # type: ignore[list-item]
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == (  # type: ignore[union-attr]
        "get_weather",
        {"city": "Oslo"},
    )
    result = {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}
    second = client.chat.completions.create(
        model=MODEL,
        messages=[*asked, choice.message.model_dump(exclude_none=True), result],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "Echo: Weather in Oslo? [tool results: sunny, 21 C]"
    # Without the tool offered, the rule does not fire.
    plain = client.chat.completions.create(model=MODEL, messages=user("hi"))
    assert plain.choices[0].message.content == "Echo: hi"
    assert plain.choices[0].message.tool_calls is None


def test_queued_parallel_calls_then_the_queued_answer(
    server: OpenAITestServer, client: openai.OpenAI
) -> None:
    server.queue_tool_calls(
        ScriptedCall("get_weather", {"city": "Oslo"}, id="call_w"),
        ScriptedCall("get_time", {"zone": "CET"}),
    )
    server.queue_replies("Sunny, and it is noon.")
    tools: Any = [WEATHER_TOOL, TIME_TOOL]
    first = client.chat.completions.create(model=MODEL, messages=user("both?"), tools=tools)
    calls = first.choices[0].message.tool_calls
    assert calls is not None
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]  # type: ignore[union-attr]
    assert calls[0].id == "call_w"
    assert len({c.id for c in calls}) == 2
    second = client.chat.completions.create(model=MODEL, messages=user("next"), tools=tools)
    assert second.choices[0].message.content == "Sunny, and it is noon."
    # The calls count as completion tokens; the tools' schemas as prompt tokens.
    assert first.usage is not None and first.usage.completion_tokens > 5
    plain_prompt = expected_prompt_tokens(server, ["both?"])
    assert first.usage.prompt_tokens == plain_prompt + server.count_tokens(json.dumps(tools))


def test_streamed_tool_call_deltas_on_the_wire(server: OpenAITestServer) -> None:
    server.queue_tool_calls(
        ScriptedCall("get_weather", {"city": "Oslo, Norway"}, id="call_a"),
        ScriptedCall("get_time", {"zone": "Europe/Oslo"}, id="call_b"),
    )
    body = {
        "model": MODEL,
        "messages": user("weather and time"),
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, _, payload = raw_request(
        server,
        "POST",
        "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200
    events = sse_events(payload)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    first = chunks[0]["choices"][0]["delta"]
    # Each call's id and name come first, with empty arguments; then the arguments in pieces.
    assert first["role"] == "assistant"
    assert [(c["index"], c["id"], c["function"]) for c in first["tool_calls"]] == [
        (0, "call_a", {"name": "get_weather", "arguments": ""}),
        (1, "call_b", {"name": "get_time", "arguments": ""}),
    ]
    pieces: dict[int, list[str]] = {0: [], 1: []}
    finish = []
    for chunk in chunks[1:]:
        for choice in chunk["choices"]:
            for delta in choice["delta"].get("tool_calls", []):
                assert set(delta) == {"index", "function"}  # no id or name after the first
                pieces[delta["index"]].append(delta["function"]["arguments"])
            finish.append(choice["finish_reason"])
    assert len(pieces[0]) > 1  # arguments really come in pieces
    assert json.loads("".join(pieces[0])) == {"city": "Oslo, Norway"}
    assert json.loads("".join(pieces[1])) == {"zone": "Europe/Oslo"}
    assert [f for f in finish if f] == ["tool_calls"]
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_langchain_bind_tools_invoke_and_stream(server: OpenAITestServer) -> None:
    llm = chat_openai(server).bind_tools([WEATHER_TOOL, TIME_TOOL])
    server.add_tool_rule("get_weather", {"city": "Oslo"})
    server.add_tool_rule("get_time", {"zone": "CET"})

    message = llm.invoke("weather and time in Oslo?")
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [  # type: ignore[attr-defined]
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {"zone": "CET"}),
    ]
    assert message.response_metadata["finish_reason"] == "tool_calls"

    chunks = list(llm.stream("weather and time in Oslo?"))
    assert len(chunks) > 4
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    assert [(c["name"], c["args"]) for c in whole.tool_calls] == [  # type: ignore[attr-defined]
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {"zone": "CET"}),
    ]
    assert whole.usage_metadata is not None  # type: ignore[attr-defined]
    assert whole.usage_metadata["output_tokens"] > 0  # type: ignore[attr-defined]

    # The results go back as ToolMessages; the answer follows.
    from langchain_core.messages import HumanMessage, ToolMessage

    results = [ToolMessage(f"result {c['name']}", tool_call_id=c["id"]) for c in message.tool_calls]  # type: ignore[attr-defined]
    answer = llm.invoke([HumanMessage("weather and time in Oslo?"), message, *results])
    assert answer.content == (
        "Echo: weather and time in Oslo? [tool results: result get_weather; result get_time]"
    )
    assert answer.tool_calls == []  # type: ignore[attr-defined]


def test_cut_after_counts_tool_call_deltas(server: OpenAITestServer) -> None:
    server.add_fault(Fault(cut_after=1))
    server.queue_tool_calls(ScriptedCall("get_weather", {"city": "A long city name"}))
    llm = chat_openai(server).bind_tools([WEATHER_TOOL])
    with pytest.raises(openai.APIConnectionError):
        list(llm.stream("weather?"))


class Forecast(BaseModel):
    city: str
    days: int = Field(ge=1)
    unit: Literal["C", "F"]


def test_json_schema_reply_is_generated_to_fit_the_schema(server: OpenAITestServer) -> None:
    structured = chat_openai(server).with_structured_output(Forecast, method="json_schema")
    assert structured.invoke("forecast?") == Forecast(city="text", days=1, unit="C")
    request = server.requests[-1]["body"]
    assert request["response_format"]["type"] == "json_schema"


def test_json_schema_reply_from_the_queue(server: OpenAITestServer) -> None:
    server.queue_json({"city": "Oslo", "days": 3, "unit": "F"})
    structured = chat_openai(server).with_structured_output(Forecast, method="json_schema")
    assert structured.invoke("forecast?") == Forecast(city="Oslo", days=3, unit="F")


def test_function_calling_structured_reply(server: OpenAITestServer) -> None:
    structured = chat_openai(server).with_structured_output(Forecast, method="function_calling")
    assert structured.invoke("forecast?") == Forecast(city="text", days=1, unit="C")
    server.queue_json({"city": "Bergen", "days": 2, "unit": "C"})
    assert structured.invoke("forecast?") == Forecast(city="Bergen", days=2, unit="C")
    assert server.requests[-1]["body"]["tool_choice"]["function"]["name"] == "Forecast"


def test_server_can_refuse_json_schema_like_servers_without_it() -> None:
    with (
        OpenAITestServer(json_schema=False) as server,
        openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0) as client,
    ):
        server.queue_replies("kept for the next request")
        response_format: Any = {
            "type": "json_schema",
            "json_schema": {"name": "Forecast", "schema": Forecast.model_json_schema()},
        }
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model=MODEL, messages=user("x"), response_format=response_format
            )
        assert caught.value.status_code == 400
        assert caught.value.body["param"] == "response_format"  # type: ignore[index]
        assert "'response_format' of type 'json_schema' is not supported" in caught.value.message
        # Plain requests, JSON mode and function calling still work; no reply was used up.
        reply = client.chat.completions.create(model=MODEL, messages=user("x"))
        assert reply.choices[0].message.content == "kept for the next request"
        structured = chat_openai(server).with_structured_output(Forecast, method="function_calling")
        assert structured.invoke("forecast?") == Forecast(city="text", days=1, unit="C")


def test_chunk_interval_spaces_the_streamed_chunks_like_a_model_writing() -> None:
    with pytest.raises(ValueError, match="chunk_interval"):
        OpenAITestServer(chunk_interval=-1)
    with OpenAITestServer(chunk_interval=0.05) as server:
        server.queue_replies("one two three four")
        body = {"model": "m1", "messages": user("hi"), "stream": True}
        started = time.monotonic()
        status, _, payload = raw_request(
            server, "POST", "/v1/chat/completions", json.dumps(body).encode()
        )
        elapsed = time.monotonic() - started
    assert status == 200
    chunks = [json.loads(e) for e in sse_events(payload)[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == (
        "one two three four"
    )
    assert elapsed >= 4 * 0.05  # a wait before each of the four content chunks (a lower bound)


def test_ignore_max_tokens_answers_and_bills_the_whole_reply(
    server: OpenAITestServer, client: openai.OpenAI
) -> None:
    text = "a reply far longer than two tokens"
    capped = client.chat.completions.create(model=MODEL, messages=user(text), max_tokens=2)
    server.add_fault(Fault(ignore_max_tokens=True))
    whole = client.chat.completions.create(model=MODEL, messages=user(text), max_tokens=2)

    cut = capped.choices[0].message.content or ""
    assert capped.choices[0].finish_reason == "length"
    assert f"Echo: {text}".startswith(cut) and 0 < server.count_tokens(cut) <= 2
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (
        f"Echo: {text}",
        "stop",
    )
    assert whole.usage is not None and capped.usage is not None
    assert whole.usage.completion_tokens == server.count_tokens(f"Echo: {text}")
    billed = server.billed
    assert billed == {
        "requests": 2,
        "prompt_tokens": capped.usage.prompt_tokens + whole.usage.prompt_tokens,
        "completion_tokens": capped.usage.completion_tokens + whole.usage.completion_tokens,
    }


def test_a_stream_left_early_is_billed_for_what_was_sent() -> None:
    text = "word " * 400
    with OpenAITestServer(chunk_interval=0.002) as server:
        with openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0) as client:
            stream = client.chat.completions.create(model=MODEL, messages=user(text), stream=True)
            received = "".join(
                chunk.choices[0].delta.content or ""
                for chunk in itertools.islice(stream, 10)  # then the client leaves
            )
            stream.close()
        deadline = time.monotonic() + 5
        while not server.billed["requests"] and time.monotonic() < deadline:
            time.sleep(0.01)
        billed = server.billed
    whole = server.count_tokens(f"Echo: {text}")
    assert billed["requests"] == 1 and billed["prompt_tokens"] > 0
    assert server.count_tokens(received) <= billed["completion_tokens"] < whole / 2
    server.clear()
    assert server.billed == {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}


def test_cli_hostile_ignore_max_tokens() -> None:
    from chatchain.testing.__main__ import hostile_fault

    fault = hostile_fault(["ignore-max-tokens"], "m")
    assert fault is not None and fault.ignore_max_tokens and fault.times == sys.maxsize
