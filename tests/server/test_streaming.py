"""The one streaming helper of both routes (`chatchain.server._streaming`): pieces that are
ready together go out as one event, their text joined in order, tool events kept apart; and
the relayed text is the reply's, exactly, on both routes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from chatchain import Chatbot, Settings, ToolStarted
from chatchain.server import create_app
from chatchain.server._streaming import texts_joined
from chatchain.stores import MemoryStore
from chatchain.testing import FakeChatModel
from chatchain.users import Users

STARTED = ToolStarted(id="call-1", name="add", args={"a": 1})


def test_a_run_of_text_is_joined_and_tool_events_stay_in_their_place() -> None:
    pieces = ["Let", " me", STARTED, "It", "'s", " 3", "."]

    assert texts_joined(pieces) == ["Let me", STARTED, "It's 3."]
    assert texts_joined([]) == []
    assert texts_joined([STARTED]) == [STARTED]


@pytest.fixture
def client() -> Iterator[TestClient]:
    store = MemoryStore()
    token = Users(store).add("ann")
    settings = Settings(api_key="sk-test", server_requests_per_minute=0)
    bot = Chatbot(settings, llm=FakeChatModel(), store=store)
    with TestClient(create_app(bot, users=Users(store))) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        yield client


WORDS = " ".join(f"w{n}é😀" for n in range(300))  # many pieces, some of them not ASCII


def _data(body: str) -> list[str]:
    return [line[5:].strip() for line in body.split("\r\n") if line.startswith("data:")]


def test_the_native_route_relays_the_reply_exactly(client: TestClient) -> None:
    answer = client.post(
        "/v1/sessions/s/messages", json={"text": WORDS}, headers={"Accept": "text/event-stream"}
    )

    texts = [json.loads(d).get("text", "") for d in _data(answer.text)]
    assert "".join(texts) == f"Echo: {WORDS}"
    names = [line[6:].strip() for line in answer.text.split("\r\n") if line.startswith("event:")]
    assert set(names[:-2]) == {"text"} and names[-2:] == ["usage", "done"]


def test_the_openai_route_relays_the_reply_exactly(client: TestClient) -> None:
    body = {
        "model": "gpt-4o-mini",
        "stream": True,
        "messages": [{"role": "user", "content": WORDS}],
    }
    answer = client.post("/v1/chat/completions", json=body, headers={"X-Session-Id": "s"})

    data = _data(answer.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == f"Echo: {WORDS}"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}


def test_a_streamed_turn_does_not_hand_each_chunk_to_a_thread() -> None:
    # LangChain runs a sync callback handler (the turn's metering handler) in the loop's
    # default executor for each streamed chunk, unless the handler runs inline: a thread hop
    # per chunk, most of the service's CPU per relayed chunk after the endpoint's parsing.
    bot = Chatbot(Settings(api_key="sk-test"), llm=FakeChatModel())
    handed: list[object] = []

    async def stream() -> str:
        loop = asyncio.get_running_loop()
        submit = loop.run_in_executor

        def counted(executor: Any, func: Any, *args: Any) -> Any:
            handed.append(func)
            return submit(executor, func, *args)

        loop.run_in_executor = counted  # type: ignore[method-assign]
        return "".join([piece async for piece in bot.astream(WORDS, session_id="s")])

    assert asyncio.run(stream()) == f"Echo: {WORDS}"
    assert len(handed) < 20  # the store's work, not one per chunk (there are 600)
