"""Budget cuts through every chat route (in this process, FastAPI's TestClient): native JSON,
native SSE, and the OpenAI route stateless and with ``X-Session-Id``.

Issue 18 item 1: a user's daily cap that pays for 9 of the 10 reply tokens of
``CHATCHAIN_MAX_TOKENS=10``. Before, the call was sent and billed, then the turn failed
(JSON routes 500, SSE routes an error event after the whole reply) and nothing was recorded.
Item 3: an endpoint that ignores ``max_tokens`` is read only up to the hold, on every route.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from chatchain import Chatbot, ModelPrice, Settings
from chatchain.server import create_app
from chatchain.stores import HistoryStore, MemoryStore, SQLiteStore
from chatchain.testing import FakeChatModel, Fault, OpenAITestServer
from chatchain.usage import UsageLedger
from chatchain.users import Users

PRICE = 1000.0  # USD per million tokens both ways: $0.001 a token
LONG = "lorem ipsum " * 2000
ROUTES = ["native", "native-sse", "openai", "openai-session"]


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HistoryStore]:
    made: HistoryStore = (
        MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "chat.db")
    )
    yield made
    made.close()


def settings(**values: object) -> Settings:
    prices = {"gpt-4o-mini": ModelPrice(input=PRICE, output=PRICE)}
    return Settings(
        api_key="sk-test",
        model="gpt-4o-mini",
        prices=prices,
        server_requests_per_minute=0,
        window_turns=None,
        window_tokens=None,
        summarize=False,
        **values,  # type: ignore[arg-type]
    )


def send(client: TestClient, route: str, text: str, session: str) -> httpx.Response:
    if route.startswith("native"):
        headers = {"Accept": "text/event-stream"} if route == "native-sse" else {}
        return client.post(f"/v1/sessions/{session}/messages", json={"text": text}, headers=headers)
    headers = {"X-Session-Id": session} if route == "openai-session" else {}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def held_prompt(client: TestClient, route: str, text: str) -> int:
    """The prompt tokens a turn of ``route`` holds, from a refusal (it needs them plus one)."""
    probe = "openai" if route == "openai" else "native"  # the same prompt as the route's
    answer = send(client, probe, text, "probe")
    needed = re.search(r"needs at least \$([0-9]+\.[0-9]+)", answer.text)
    assert needed is not None, answer.text
    return round(float(needed.group(1)) * 1e6 / PRICE) - 1


@pytest.mark.parametrize("route", ROUTES)
def test_a_reply_cut_to_fit_a_users_daily_cap_is_answered_recorded_and_stored(
    store: HistoryStore, route: str
) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini", respond=lambda m: LONG)
    bot = Chatbot(settings(max_tokens=10), llm=fake, store=store, system="Be kind.")
    users = Users(store)
    app = create_app(bot, users=users)
    with TestClient(app, raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {users.add('probe', daily_usd=1e-6)}"
        prompt = held_prompt(client, route, "hello there")
        cap = (prompt + 9.5) * PRICE / 1e6  # the first hold (10 reply tokens) is refused
        client.headers["Authorization"] = f"Bearer {users.add('ann', daily_usd=cap)}"

        answer = send(client, route, "hello there", "s")

    assert answer.status_code == 200, answer.text
    assert "event: error" not in answer.text
    assert "cut at 9 tokens" in answer.text or route.startswith("openai")
    entries = UsageLedger(store).entries(user_id="ann")
    assert [e.completion_tokens for e in entries] == [9]
    assert len(fake.calls) == 1  # the one call billed is the one recorded
    if route != "openai":  # the stateless route stores no messages
        assert [m.type for m in store.load("ann:s")] == ["human", "ai"]


@pytest.mark.parametrize("route", ROUTES)
def test_an_endpoint_ignoring_max_tokens_is_read_up_to_the_hold_on_every_route(
    store: HistoryStore, route: str
) -> None:
    with OpenAITestServer(chunk_interval=0.002) as server:
        server.add_fault(Fault(ignore_max_tokens=True))
        server.queue_replies(LONG)
        values = {"base_url": server.base_url, "max_tokens": 20, "max_retries": 0}
        bot = Chatbot(settings(**values), store=store)
        users = Users(store)
        with TestClient(create_app(bot, users=users), raise_server_exceptions=False) as client:
            client.headers["Authorization"] = f"Bearer {users.add('ann', daily_usd=1.0)}"
            answer = send(client, route, "hello", "s")

    assert answer.status_code == 200, answer.text
    (entry,) = UsageLedger(store).entries(user_id="ann")
    assert entry.estimated and 20 <= entry.completion_tokens <= 25
    assert "lorem ipsum " * 30 not in answer.text  # not the whole reply: about 20 tokens
    if route.startswith("native"):
        assert "stopped reading there" in answer.text
    if route != "openai":
        reply = store.load("ann:s")[-1]
        assert reply.response_metadata["cut_at_hold"] is True
