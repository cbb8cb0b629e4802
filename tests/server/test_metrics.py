"""``/healthz`` and ``/metrics`` over a real ``chatchain serve``, with one worker and with
two (prometheus-client's multiprocess mode adds up both workers' counts)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, generate_latest

from chatchain import Chatbot, Settings
from chatchain.server import create_app
from chatchain.stores import MemoryStore
from chatchain.testing import FakeChatModel, Fault, OpenAITestServer
from chatchain.users import Users
from tests.server.conftest import Service, start_service
from tests.test_hooks import _server_error


def sample(text: str, name: str, labels: str = "") -> float:
    """The value of one sample of the exposition ``text`` (0 when absent)."""
    pattern = rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.slow  # in process: test_app.py; and every start_service asks /healthz
def test_healthz_needs_no_token_and_says_ok(service: Service) -> None:
    answer = httpx.get(f"{service.url}/healthz")

    assert answer.status_code == 200
    assert answer.json() == {"status": "ok"}


def test_metrics_count_turns_tokens_cost_latency_and_errors_by_class(
    service: Service, user: tuple[str, str], endpoint: OpenAITestServer
) -> None:
    before = httpx.get(f"{service.url}/metrics").text
    client = service.client(user[1])
    replies = [client.post("/v1/sessions/m/messages", json={"text": f"q{i}"}) for i in range(3)]
    endpoint.add_fault(Fault(status=500))
    client.post("/v1/sessions/m/messages", json={"text": "fails"})
    with client.stream(
        "POST",
        "/v1/sessions/m/messages",
        json={"text": "a b c"},
        headers={"Accept": "text/event-stream"},
    ) as streamed:
        streamed.read()

    after = httpx.get(f"{service.url}/metrics").text

    def grew(name: str, labels: str = "") -> float:
        return sample(after, name, labels) - sample(before, name, labels)

    assert grew("chatchain_turns_total", 'outcome="ok",route="native"') == 4
    assert grew("chatchain_turns_total", 'outcome="error",route="native"') == 1
    assert grew("chatchain_errors_total", 'type="ServerError"') == 1
    prompt = sum(r.json()["usage"]["prompt_tokens"] for r in replies)
    assert grew("chatchain_tokens_total", 'kind="prompt"') > prompt  # and the streamed turn's
    assert grew("chatchain_cost_usd_total") > 0
    assert grew("chatchain_turn_seconds_count") == 4
    assert grew("chatchain_first_token_seconds_count") == 1
    assert sample(after, "chatchain_open_streams") == 0


@pytest.fixture(scope="module")
def two_workers(
    endpoint: OpenAITestServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    folder = tmp_path_factory.mktemp("two")
    running = start_service(f"sqlite:///{folder / 'chat.db'}", endpoint, folder, workers=2)
    yield running
    running.stop()


@pytest.mark.slow
def test_with_two_workers_every_metrics_answer_counts_the_turns_of_both(
    two_workers: Service,
) -> None:
    _, token = two_workers.add_user()
    turns = 12
    for i in range(turns):
        # A new connection each time, so that both workers take turns.
        with two_workers.client(token) as client:
            assert client.post(f"/v1/sessions/s{i}/messages", json={"text": "hi"}).is_success

    counts = set()
    for _ in range(6):  # new connections: whichever worker answers
        with httpx.Client(base_url=two_workers.url) as client:
            text = client.get("/metrics").text
        counts.add(sample(text, "chatchain_turns_total", 'outcome="ok",route="native"'))

    assert counts == {turns}


# In this process (FastAPI's TestClient): the turn metrics come from the turns' own events
# (`chatchain.server._metrics.TurnMetrics`, turn hooks the app adds to its Chatbot).


def test_turns_are_counted_by_their_own_end_by_route_and_only_for_requests() -> None:
    store = MemoryStore()
    users = Users(store)
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(Settings(api_key="sk-test", server_requests_per_minute=0), llm=fake, store=store)
    token = users.add("ann")
    create_app(bot, users=users)  # a second app on the same bot: its turns still count once
    before = generate_latest(REGISTRY).decode()
    with TestClient(create_app(bot, users=users), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        assert client.post("/v1/sessions/s/messages", json={"text": "hi"}).status_code == 200
        openai = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        assert client.post("/v1/chat/completions", json=openai).status_code == 200
        fake.errors.append(_server_error())
        fake.model_post_init(None)
        assert client.post("/v1/sessions/s/messages", json={"text": "no"}).status_code == 502
        # Refused before its turn ran: an error answer, not a turn.
        assert client.post("/v1/sessions/s/messages", json={"text": " "}).status_code == 422
    bot.chat("a turn of the library's, not of the service", session_id="lib")
    after = generate_latest(REGISTRY).decode()

    def grew(name: str, labels: str = "") -> float:
        return sample(after, name, labels) - sample(before, name, labels)

    assert grew("chatchain_turns_total", 'outcome="ok",route="native"') == 1
    assert grew("chatchain_turns_total", 'outcome="ok",route="openai"') == 1
    assert grew("chatchain_turns_total", 'outcome="error",route="native"') == 1
    assert grew("chatchain_turn_seconds_count") == 2
    assert grew("chatchain_errors_total", 'type="InvalidInputError"') == 1
