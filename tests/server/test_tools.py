"""The server's own tools (``chatchain serve --tools MODULE``) over real worker processes:
tool calls in the JSON reply, ``tool`` events in the stream, the transcript, the
OpenAI-compatible route, and nothing loaded without the option."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatchain._tools import INTERRUPTED
from chatchain.testing import OpenAITestServer, ScriptedCall
from tests.server.conftest import Service, events, start_service
from tests.server.test_native import wait_for

TOOLS_MODULE = '''
import time
from pathlib import Path


def get_weather(city: str) -> str:
    """The weather in a city today."""
    return f"Sunny in {city}"


def explode(reason: str) -> str:
    """Fails, on purpose."""
    raise RuntimeError(f"boom: {reason}")


def wait_for_gate() -> str:
    """Waits until the test opens the gate (the file "gate" beside this module)."""
    gate, deadline = Path(__file__).with_name("gate"), time.monotonic() + 60
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return "open"


TOOLS = [get_weather, explode, wait_for_gate]
'''


def write_tools(folder: Path) -> Path:
    path = folder / "my_tools.py"
    path.write_text(TOOLS_MODULE)
    return path


@pytest.fixture(scope="module")
def tool_service(
    endpoint: OpenAITestServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """``chatchain serve --tools my_tools.py`` with two workers: each must load the tools."""
    folder = tmp_path_factory.mktemp("tools")
    tools = write_tools(folder)
    env = {"CHATCHAIN_MAX_RETRIES": "0", "CHATCHAIN_TIMEOUT": "5"}
    running = start_service(
        f"sqlite:///{folder / 'chat.db'}",
        endpoint,
        folder,
        workers=2,
        env=env,
        args=["--tools", str(tools)],
    )
    yield running
    (folder / "gate").touch()  # a tool still waiting (it should not be) ends
    running.stop()


def offered(request: dict[str, Any]) -> list[str]:
    return [tool["function"]["name"] for tool in request["body"].get("tools") or ()]


pytestmark = pytest.mark.slow


def test_a_reply_lists_the_tool_calls_the_server_ran(
    tool_service: Service, endpoint: OpenAITestServer
) -> None:
    endpoint.add_tool_rule("get_weather", {"city": "Oslo"})
    _, token = tool_service.add_user()
    client = tool_service.client(token)

    answer = client.post("/v1/sessions/trip/messages", json={"text": "Weather in Oslo?"})

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["text"] == "Echo: Weather in Oslo? [tool results: Sunny in Oslo]"
    [call] = body["tool_calls"]
    assert call.pop("seconds") >= 0
    assert call.pop("id")
    assert call == {
        "name": "get_weather",
        "args": {"city": "Oslo"},
        "result": "Sunny in Oslo",
        "status": "success",
        "error": None,
    }
    assert sorted(offered(endpoint.requests[0])) == ["explode", "get_weather", "wait_for_gate"]


def test_a_tool_that_fails_is_reported_and_the_turn_goes_on(
    tool_service: Service, endpoint: OpenAITestServer
) -> None:
    endpoint.queue_tool_calls(ScriptedCall("explode", {"reason": "test"}))
    endpoint.queue_replies("It broke.")
    _, token = tool_service.add_user()

    body = tool_service.client(token).post("/v1/sessions/s/messages", json={"text": "go"}).json()

    assert body["text"] == "It broke."
    [call] = body["tool_calls"]
    assert call["status"] == "error"
    assert "boom: test" in call["error"]


def test_the_stream_sends_tool_events_in_order_among_the_text(
    tool_service: Service, endpoint: OpenAITestServer
) -> None:
    endpoint.queue_tool_calls(ScriptedCall("get_weather", {"city": "Oslo"}, id="call_1"))
    endpoint.queue_tool_calls(ScriptedCall("get_weather", {"city": "Bergen"}, id="call_2"))
    endpoint.queue_replies("Sunny in both.")
    _, token = tool_service.add_user()

    with tool_service.client(token).stream(
        "POST",
        "/v1/sessions/s/messages",
        json={"text": "Oslo and Bergen?"},
        headers={"Accept": "text/event-stream"},
    ) as response:
        assert response.status_code == 200
        received = list(events(response))

    kinds = [(kind, data.get("phase")) for kind, data in received]
    # The text's pieces that arrive together come in one event: one text event or more.
    runs = [kind for i, kind in enumerate(kinds) if i == 0 or kind != kinds[i - 1]]
    assert runs == [
        ("tool", "started"),
        ("tool", "finished"),
        ("tool", "started"),
        ("tool", "finished"),
        ("text", None),
        ("usage", None),
        ("done", None),
    ]
    assert received[0][1] == {
        "phase": "started",
        "id": "call_1",
        "name": "get_weather",
        "args": {"city": "Oslo"},
    }
    finished = received[3][1]  # the tool events each come alone
    assert finished.pop("seconds") >= 0
    assert finished == {
        "phase": "finished",
        "id": "call_2",
        "name": "get_weather",
        "args": {"city": "Bergen"},
        "result": "Sunny in Bergen",
        "status": "success",
        "error": None,
    }
    assert "".join(data["text"] for kind, data in received if kind == "text") == "Sunny in both."


def test_the_transcript_shows_the_calls_and_their_results(
    tool_service: Service, endpoint: OpenAITestServer
) -> None:
    endpoint.queue_tool_calls(ScriptedCall("get_weather", {"city": "Oslo"}, id="call_9"))
    endpoint.queue_replies("Sunny.")
    _, token = tool_service.add_user()
    client = tool_service.client(token)
    answer = client.post("/v1/sessions/s/messages", json={"text": "Weather?"})
    answer.raise_for_status()

    messages = client.get("/v1/sessions/s/messages").json()["messages"]
    # The answer carries its turn's usage, both calls (the tool request's and the answer's),
    # as the reply itself reported it.
    usage, live = messages[-1].pop("usage"), answer.json()["usage"]
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert {k: usage[k] for k in keys} == {k: live[k] for k in keys}
    assert usage["cost_usd"] == pytest.approx(live["cost_usd"])  # priced again on reload

    assert messages == [
        {"role": "user", "text": "Weather?", "interrupted": False},
        {
            "role": "assistant",
            "text": "",
            "interrupted": False,
            "tool_calls": [{"id": "call_9", "name": "get_weather", "args": {"city": "Oslo"}}],
        },
        {
            "role": "tool",
            "text": "Sunny in Oslo",
            "interrupted": False,
            "name": "get_weather",
            "tool_call_id": "call_9",
            "status": "success",
        },
        {"role": "assistant", "text": "Sunny.", "interrupted": False},
    ]


def test_the_openai_route_runs_the_server_tools_in_a_session_and_answers_the_final_text(
    tool_service: Service, endpoint: OpenAITestServer
) -> None:
    endpoint.add_tool_rule("get_weather", {"city": "Oslo"})
    _, token = tool_service.add_user()
    client = tool_service.client(token)

    answer = client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Oslo?"}]},
        headers={"X-Session-Id": "s"},
    )

    assert answer.status_code == 200, answer.text
    message = answer.json()["choices"][0]["message"]
    assert message["content"] == "Echo: Oslo? [tool results: Sunny in Oslo]"
    roles = [m["role"] for m in client.get("/v1/sessions/s/messages").json()["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant"]


def test_the_openai_route_still_refuses_the_clients_own_tools(
    tool_service: Service, endpoint: OpenAITestServer
) -> None:
    _, token = tool_service.add_user()
    client_tool = {"type": "function", "function": {"name": "f", "parameters": {}}}

    answer = tool_service.client(token).post(
        "/v1/chat/completions",
        json={
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [client_tool],
        },
        headers={"X-Session-Id": "s"},
    )

    assert answer.status_code == 400
    assert endpoint.requests == []


def test_without_the_option_no_tools_are_loaded_even_if_the_variable_is_set(
    endpoint: OpenAITestServer, tmp_path: Path
) -> None:
    tools = write_tools(tmp_path)
    running = start_service(
        f"sqlite:///{tmp_path / 'chat.db'}",
        endpoint,
        tmp_path,
        env={"CHATCHAIN_SERVE_TOOLS": str(tools)},
    )
    try:
        _, token = running.add_user()
        body = running.client(token).post("/v1/sessions/s/messages", json={"text": "hi"}).json()
    finally:
        running.stop()

    assert body["tool_calls"] == []
    assert offered(endpoint.requests[-1]) == []


def test_the_openai_route_without_a_session_runs_the_tools_too_and_stores_nothing(
    tool_service: Service, endpoint: OpenAITestServer
) -> None:
    endpoint.add_tool_rule("get_weather", {"city": "Oslo"})
    _, token = tool_service.add_user()
    client = tool_service.client(token)

    answer = client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Oslo?"}]},
    )

    assert answer.status_code == 200, answer.text
    message = answer.json()["choices"][0]["message"]
    assert message["content"] == "Echo: Oslo? [tool results: Sunny in Oslo]"
    assert client.get("/v1/sessions").json() == {"sessions": []}


def test_the_openai_stream_in_a_session_is_the_final_text_only(
    tool_service: Service, endpoint: OpenAITestServer
) -> None:
    endpoint.queue_tool_calls(ScriptedCall("get_weather", {"city": "Oslo"}))
    endpoint.queue_replies("Sunny in Oslo.")
    _, token = tool_service.add_user()

    with tool_service.client(token).stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "Oslo?"}],
            "stream": True,
        },
        headers={"X-Session-Id": "s"},
    ) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]

    deltas = [json.loads(line[len("data: ") :])["choices"][0]["delta"] for line in lines]
    assert "".join(delta.get("content") or "" for delta in deltas) == "Sunny in Oslo."
    assert all("tool_calls" not in delta for delta in deltas)


def test_a_client_leaving_while_a_tool_runs_keeps_the_call_answered_as_interrupted(
    tool_service: Service, endpoint: OpenAITestServer
) -> None:
    endpoint.queue_tool_calls(ScriptedCall("wait_for_gate", {}, id="call_w"))
    _, token = tool_service.add_user()
    client = tool_service.client(token)
    with client.stream(
        "POST",
        "/v1/sessions/s/messages",
        json={"text": "wait"},
        headers={"Accept": "text/event-stream"},
    ) as response:
        name, data = next(events(response))
        assert (name, data["phase"]) == ("tool", "started")
    # Leaving the block closed the connection while the tool waits for its gate.

    def stored() -> list[dict[str, Any]]:
        answer = client.get("/v1/sessions/s/messages")  # 404 until the turn is saved
        return answer.json()["messages"] if answer.status_code == 200 else []

    messages = wait_for(stored, "the stopped turn")
    assert messages == [
        {"role": "user", "text": "wait", "interrupted": False},
        {
            "role": "assistant",
            "text": "",
            "interrupted": False,
            "tool_calls": [{"id": "call_w", "name": "wait_for_gate", "args": {}}],
        },
        {
            "role": "tool",
            "text": INTERRUPTED,
            "interrupted": False,
            "name": "wait_for_gate",
            "tool_call_id": "call_w",
            "status": "error",
        },
        {"role": "assistant", "text": "", "interrupted": True},
    ]
