"""Model choice: the models the operator allows (``CHATCHAIN_SERVER_MODELS``, ``serve
--models``), picked by a request's ``model`` on the OpenAI route and the native API, each
priced and capped as itself; any other name is OpenAI's 404 ``model_not_found``.

In this process: the app over a bot whose real ChatOpenAI talks to an `OpenAITestServer`
(which answers under the model each request names). Over a real ``chatchain serve --offline
--models ...`` with the ``openai`` SDK at the end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from chatchain import Chatbot, ConfigurationError, Settings
from chatchain.pricing import ModelPrice
from chatchain.server import create_app
from chatchain.stores import MemoryStore
from chatchain.testing import FakeChatModel, OpenAITestServer
from chatchain.users import Users
from tests.server.conftest import start_service

PATH = "/v1/chat/completions"
MINI, NANO, BIG = "gpt-4o-mini", "gpt-4.1-nano", "org/big-model"
PRICES = {
    MINI: ModelPrice(input=1.0, output=1.0),
    NANO: ModelPrice(input=3.0, output=7.0),
    BIG: ModelPrice(input=1_000_000.0, output=1_000_000.0),  # a dollar a token
}


@pytest.fixture(scope="module")
def endpoint() -> Iterator[OpenAITestServer]:
    with OpenAITestServer() as server:
        yield server


@pytest.fixture
def users() -> Users:
    return Users(MemoryStore())


@pytest.fixture
def bot(endpoint: OpenAITestServer, users: Users) -> Iterator[Chatbot]:
    settings = Settings(
        api_key="sk-test",
        base_url=endpoint.base_url,
        model=MINI,
        server_models=(NANO, BIG, MINI),
        prices=PRICES,
        server_requests_per_minute=0,
        max_retries=0,
        timeout=5,
    )
    with Chatbot(settings, store=users.store, system="Be kind.") as bot:
        yield bot


@pytest.fixture
def client(bot: Chatbot, users: Users) -> Iterator[TestClient]:
    token = users.add("ann")
    with TestClient(create_app(bot, users=users), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        yield client


def _body(model: str, text: str = "hi", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **fields}


def _asked(endpoint: OpenAITestServer) -> list[str]:
    """The model each request to the endpoint named."""
    return [request["body"]["model"] for request in endpoint.requests]


def test_the_models_list_names_each_allowed_model_the_configured_one_first(
    client: TestClient,
) -> None:
    listed = client.get("/v1/models").json()
    names = [entry["id"] for entry in listed["data"]]
    big = client.get(f"/v1/models/{BIG}")  # a name with "/" has its own path too
    unknown = client.get("/v1/models/gpt-5")

    assert names == [MINI, NANO, BIG]
    assert big.status_code == 200 and big.json() == listed["data"][2]
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"


def test_a_request_picks_its_model_and_the_ledger_names_and_prices_it(
    client: TestClient, endpoint: OpenAITestServer, bot: Chatbot
) -> None:
    endpoint.clear()
    plain = client.post(PATH, json=_body(NANO))
    remembered = client.post(PATH, json=_body(NANO, "again"), headers={"X-Session-Id": "s"})
    streamed = client.post(
        PATH, json=_body(NANO, stream=True, stream_options={"include_usage": True})
    )
    default = client.post(PATH, json=_body(MINI))

    assert _asked(endpoint) == [NANO, NANO, NANO, MINI]
    assert plain.json()["model"] == NANO and remembered.json()["model"] == NANO
    chunks = [
        json.loads(line.removeprefix("data: "))
        for line in streamed.text.splitlines()
        if line.startswith("data: {")
    ]
    assert {chunk["model"] for chunk in chunks} == {NANO}
    assert default.json()["model"] == MINI
    entries = bot.usage_entries(user_id="ann")
    assert [entry.model for entry in entries] == [NANO, NANO, NANO, MINI]
    for entry in entries:
        price = PRICES[entry.model]
        expected = price.cost(entry.prompt_tokens, entry.completion_tokens)
        assert entry.cost_usd == pytest.approx(expected)


def test_an_unknown_model_is_openais_404_and_nothing_is_sent_or_stored(
    client: TestClient, endpoint: OpenAITestServer
) -> None:
    endpoint.clear()
    answers = [
        client.post(PATH, json=_body("gpt-5")),
        client.post(PATH, json=_body("gpt-5", stream=True)),
        client.post(PATH, json=_body("gpt-5"), headers={"X-Session-Id": "s"}),
    ]

    for answer in answers:
        assert answer.status_code == 404
        assert answer.json() == {
            "error": {
                "message": "The model `gpt-5` does not exist or you do not have access to it. "
                "This server answers with 'gpt-4o-mini', 'gpt-4.1-nano', 'org/big-model' "
                "(GET /v1/models lists them).",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }
        }
    assert endpoint.requests == []
    assert client.get("/v1/sessions").json() == {"sessions": []}


def test_each_model_is_capped_at_its_own_price(
    client: TestClient, endpoint: OpenAITestServer, users: Users
) -> None:
    client.headers["Authorization"] = f"Bearer {users.add('bob', budget_usd=0.01)}"
    endpoint.clear()

    dear = client.post(PATH, json=_body(BIG))
    cheap = client.post(PATH, json=_body(MINI))

    assert dear.status_code == 429 and dear.json()["error"]["code"] == "insufficient_quota"
    assert cheap.status_code == 200
    assert _asked(endpoint) == [MINI]  # the dear one was refused before it was sent


def test_the_native_api_takes_an_optional_model(
    client: TestClient, endpoint: OpenAITestServer
) -> None:
    endpoint.clear()
    named = client.post("/v1/sessions/s/messages", json={"text": "hi", "model": NANO})
    default = client.post("/v1/sessions/s/messages", json={"text": "hi"})
    unknown = client.post("/v1/sessions/s/messages", json={"text": "hi", "model": "gpt-5"})

    assert named.status_code == 200 and default.status_code == 200
    assert _asked(endpoint) == [NANO, MINI]
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "ModelNotFound"
    assert "GET /v1/models" in unknown.json()["error"]["message"]
    assert len(client.get("/v1/sessions/s/messages").json()["messages"]) == 4


def test_the_app_closes_the_bots_it_made_and_leaves_the_store_open(
    bot: Chatbot, users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[str] = []
    aclose = Chatbot.aclose

    async def recorded(self: Chatbot) -> None:
        closed.append(self.settings.model)
        await aclose(self)

    monkeypatch.setattr(Chatbot, "aclose", recorded)
    token = users.add("ann")
    with TestClient(create_app(bot, users=users)) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        assert client.post(PATH, json=_body(NANO)).status_code == 200

    assert sorted(closed) == [NANO, BIG]  # the given bot is the caller's
    assert bot.chat("still open?", session_id="after").text == "Echo: still open?"


def test_other_models_need_a_bot_whose_model_a_name_can_change(users: Users) -> None:
    settings = Settings(api_key="sk-test", server_models=(NANO,))
    bot = Chatbot(settings, llm=FakeChatModel(), store=users.store)

    with pytest.raises(ConfigurationError, match="given its own llm"):
        create_app(bot, users=users)


def test_with_model_shares_the_store_and_closing_it_leaves_the_store_open(
    tmp_path: Path,
) -> None:
    settings = Settings(api_key="sk-test", model=MINI, store_url=f"sqlite:///{tmp_path}/c.db")
    bot = Chatbot(settings)
    twin = bot.with_model(f" {NANO} ")

    twin.close()

    assert twin.settings.model == NANO and twin.store is bot.store
    assert bot.settings.model == MINI
    assert bot.history("s") == []  # the store is still open
    bot.close()
    with pytest.raises(ConfigurationError, match="model name"):
        bot.with_model("  ")


@pytest.mark.slow  # a real chatchain serve process
def test_serve_models_lets_the_sdk_pick_a_model(tmp_path: Path) -> None:
    running = start_service(
        f"sqlite:///{tmp_path / 'chat.db'}", None, tmp_path, args=["--models", f"{NANO}, {MINI}"]
    )
    try:
        _, token = running.add_user("ann")
        with openai.OpenAI(api_key=token, base_url=f"{running.url}/v1", max_retries=0) as sdk:
            listed = [model.id for model in sdk.models.list()]
            reply = sdk.chat.completions.create(model=NANO, messages=_body(NANO)["messages"])
            with pytest.raises(openai.NotFoundError) as caught:
                sdk.chat.completions.create(model="gpt-5", messages=_body(NANO)["messages"])
    finally:
        running.stop()

    assert listed == [MINI, NANO]  # OPENAI_MODEL (gpt-4o-mini offline) first, once
    assert reply.model == NANO
    assert caught.value.code == "model_not_found"
