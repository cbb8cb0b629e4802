"""Per-user limits that hold across instances: two apps over one real store (SQLite, Redis,
PostgreSQL) count requests per minute and open streams together; a user's own limits
replace the deployment's; a store that fails while counting falls back to this process's
count. The store-level contract is tests/stores/test_throttle_contract.py."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import ExitStack, closing
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from chatchain import Chatbot, Settings
from chatchain.errors import StoreError
from chatchain.server import create_app
from chatchain.server._errors import HTTPProblem
from chatchain.server._throttle import UserThrottle
from chatchain.stores import HistoryStore, MemoryStore, ThrottleBackend, open_store
from chatchain.testing import FakeChatModel, Fault, OpenAITestServer
from chatchain.users import User, Users
from tests.server.conftest import events, start_service
from tests.stores.fixtures_postgres import postgres_store, postgres_url
from tests.stores.fixtures_redis import redis_store, redis_url
from tests.stores.fixtures_sqlite import sqlite_store, sqlite_url

__all__ = [
    "postgres_store",
    "postgres_url",
    "redis_store",
    "redis_url",
    "sqlite_store",
    "sqlite_url",
]

SHARED = ["sqlite", "redis", "postgres"]


@pytest.fixture(params=SHARED)
def store_url(request: pytest.FixtureRequest) -> str:
    """The URL of a fresh, empty store of each shared backend (wiped after the test)."""
    request.getfixturevalue(f"{request.param}_store")
    return request.getfixturevalue(f"{request.param}_url")  # type: ignore[no-any-return]


def _instances(url: str, stack: ExitStack, count: int = 2, **settings: int) -> list[TestClient]:
    """``count`` apps, each over a store of its own opened at ``url`` (as instances are)."""
    clients = []
    for _ in range(count):
        store = open_store(url)
        stack.callback(store.close)
        bot = Chatbot(Settings(api_key="sk-test", **settings), llm=FakeChatModel(), store=store)
        client = TestClient(create_app(bot), raise_server_exceptions=False)
        clients.append(stack.enter_context(client))
    return clients


def _send(clients: list[TestClient], token: str, count: int, path: str) -> list[httpx.Response]:
    """``count`` GETs of ``path``, from a thread per client at once, spread over the clients."""
    answers: list[httpx.Response] = []
    start = threading.Barrier(len(clients))

    def run(client: TestClient) -> None:
        start.wait()
        for _ in range(count // len(clients)):
            answers.append(client.get(path, headers={"Authorization": f"Bearer {token}"}))

    threads = [threading.Thread(target=run, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def test_two_instances_let_exactly_the_limit_through(store_url: str) -> None:
    with ExitStack() as stack:
        clients = _instances(store_url, stack, server_requests_per_minute=20)
        with closing(open_store(store_url)) as store:
            token = Users(store).add("ann")
            other = Users(store).add("bob")
        started = time.time()
        answers = _send(clients, token, 40, "/v1/sessions")
        openai = clients[1].get("/v1/models", headers={"Authorization": f"Bearer {token}"})
        fresh = clients[0].get("/v1/sessions", headers={"Authorization": f"Bearer {other}"})

    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == 20 and statuses.count(429) == 20
    refused = next(a for a in answers if a.status_code == 429)
    # The first request leaves the window 60 s after it came: the wait says so, rounded up.
    waited = time.time() - started
    assert 60 - waited - 1 <= int(refused.headers["retry-after"]) <= 60
    error = refused.json()["error"]
    assert error["type"] == "TooManyRequests"
    assert "the limit is 20 per minute (CHATCHAIN_SERVER_REQUESTS_PER_MINUTE)" in error["message"]
    # The OpenAI-compatible routes: the same 429 and Retry-After, in OpenAI's shape.
    assert openai.status_code == 429 and 1 <= int(openai.headers["retry-after"]) <= 60
    assert "CHATCHAIN_SERVER_REQUESTS_PER_MINUTE" in openai.json()["error"]["message"]
    assert openai.json()["error"]["code"] == "rate_limit_exceeded"
    assert fresh.status_code == 200  # counted per user


def test_a_users_own_limits_replace_the_deployments_on_every_instance(store_url: str) -> None:
    with ExitStack() as stack:
        clients = _instances(
            store_url, stack, server_requests_per_minute=2, server_streams_per_user=1
        )
        with closing(open_store(store_url)) as store:
            users = Users(store)
            few = users.add("few", requests_per_minute=3)
            free = users.add("free", requests_per_minute=0, streams=5)
        few_answers = _send(clients, few, 6, "/v1/sessions")
        free_answers = _send(clients, free, 10, "/v1/sessions")
        me = clients[0].get("/v1/me", headers={"Authorization": f"Bearer {free}"}).json()

    statuses = [a.status_code for a in few_answers]
    assert statuses.count(200) == 3 and statuses.count(429) == 3
    message = next(a for a in few_answers if a.status_code == 429).json()["error"]["message"]
    assert "the limit is 3 per minute (user few's own limit, set by chatchain users caps)" in (
        message
    )
    assert [a.status_code for a in free_answers] == [200] * 10  # 0: no limit
    assert me["limits"] == {"requests_per_minute": 0, "streams": 5}


def test_me_shows_the_deployments_limits_to_a_user_without_their_own() -> None:
    store = MemoryStore()
    token = Users(store).add("ann")
    settings = Settings(api_key="sk-test", server_requests_per_minute=7, server_streams_per_user=2)
    bot = Chatbot(settings, llm=FakeChatModel(), store=store)
    with TestClient(create_app(bot)) as client:
        me = client.get("/v1/me", headers={"Authorization": f"Bearer {token}"}).json()
    assert me["limits"] == {"requests_per_minute": 7, "streams": 2}


def test_stream_slots_are_shared_and_a_dead_holders_come_back(store_url: str) -> None:
    ann = User("ann", datetime.now(UTC))

    async def main(first: HistoryStore, second: HistoryStore) -> None:
        one = UserThrottle(requests_per_minute=0, streams=2, store=first, lease=0.6)
        two = UserThrottle(requests_per_minute=0, streams=2, store=second, lease=0.6)
        live = await one.aopen_stream(ann)
        dead = await one.aopen_stream(ann)
        assert live.shared and dead.shared
        with pytest.raises(HTTPProblem) as refused:
            await two.aopen_stream(ann)  # the other instance sees both
        assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "1"}
        assert "the limit is 2 (CHATCHAIN_SERVER_STREAMS_PER_USER)" in refused.value.message
        # The holder of ``dead`` is killed: nothing renews or gives back its slot.
        assert dead._renewer is not None
        dead._renewer.cancel()
        await asyncio.sleep(1.0)  # > the lease: the live one was renewed meanwhile
        third = await two.aopen_stream(ann)
        with pytest.raises(HTTPProblem):
            await two.aopen_stream(ann)  # the live one still holds its slot
        await live.close()
        await two.aopen_stream(ann)  # given back at once on its end
        await third.close()

    with closing(open_store(store_url)) as first, closing(open_store(store_url)) as second:
        asyncio.run(main(first, second))


class _Down(MemoryStore, ThrottleBackend):
    """A store whose throttle fails (the store out of reach while counting)."""

    def count_request(self, user: str, limit: int, window: float) -> float | None:
        raise StoreError("Could not reach the store")

    def take_stream(self, user: str, slot: str, limit: int, lease: float) -> bool:
        raise StoreError("Could not reach the store")

    def renew_stream(self, user: str, slot: str, lease: float) -> bool:
        raise StoreError("Could not reach the store")

    def release_stream(self, user: str, slot: str) -> None:
        raise StoreError("Could not reach the store")


def test_a_store_failing_while_counting_falls_back_to_this_processs_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = _Down()
    token = Users(store).add("ann")
    settings = Settings(api_key="sk-test", server_requests_per_minute=3, server_streams_per_user=1)
    bot = Chatbot(settings, llm=FakeChatModel(), store=store)
    with caplog.at_level(logging.WARNING), TestClient(create_app(bot)) as client:
        answers = [
            client.get("/v1/sessions", headers={"Authorization": f"Bearer {token}"})
            for _ in range(4)
        ]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]  # fail open, to 1 worker
    assert "Could not count a request of user ann in the store" in caplog.text

    async def streams() -> None:
        throttle = UserThrottle(requests_per_minute=0, streams=1, store=store)
        ann = User("ann", datetime.now(UTC))
        slot = await throttle.aopen_stream(ann)
        assert not slot.shared
        with pytest.raises(HTTPProblem):
            await throttle.aopen_stream(ann)
        await slot.close()
        await throttle.aopen_stream(ann)

    asyncio.run(streams())


# -- two `chatchain serve` processes over one store, one killed mid-stream ----------------------


@pytest.mark.slow  # two real services, and a lease to run out
@pytest.mark.parametrize("backend", SHARED)
# A known, open defect (issue 21): about one run in eight, over any store, the second
# instance grants a second stream while the first holds the user's only slot (200, not the
# 429 below). Two app instances in one process (test_stream_slots_are_shared_and_a_dead_
# holders_come_back) never do, so the hole is in the served process's path, not the stores'
# scripts. Not strict: the test still runs its whole course, and a pass is reported (XPASS).
@pytest.mark.xfail(
    reason="intermittent second stream slot across instances (issue 21)", strict=False
)
def test_a_killed_instances_stream_slot_comes_back_on_the_other(
    backend: str, request: pytest.FixtureRequest, endpoint: OpenAITestServer, tmp_path: Path
) -> None:
    if backend == "sqlite":
        store_url = f"sqlite:///{tmp_path / 'chat.db'}"
    else:
        request.getfixturevalue(f"{backend}_store")  # wiped before and after
        store_url = request.getfixturevalue(f"{backend}_url")
    env = {"CHATCHAIN_SERVER_STREAMS_PER_USER": "1"}
    first = start_service(store_url, endpoint, tmp_path, env=env)
    second = start_service(store_url, endpoint, tmp_path, env=env)
    try:
        _, token = first.add_user()
        endpoint.add_fault(Fault(keep_alive=60, stall_after=1, interval=0.05))
        ask = {"json": {"text": "hi there"}, "headers": {"Accept": "text/event-stream"}}
        with first.client(token).stream("POST", "/v1/sessions/a/messages", **ask) as held:  # type: ignore[arg-type]
            assert next(events(held))[0] == "text"
            refused = second.client(token).post("/v1/sessions/b/messages", **ask)  # type: ignore[arg-type]
            first.process.kill()  # kill -9 mid-stream: the slot is never given back
            first.process.wait()
        killed = time.monotonic()
        assert refused.status_code == 429, first.log.read_text() + second.log.read_text()
        assert "CHATCHAIN_SERVER_STREAMS_PER_USER" in refused.json()["error"]["message"]
        while True:
            answer = second.client(token).post("/v1/sessions/c/messages", **ask)  # type: ignore[arg-type]
            if answer.status_code != 429 or time.monotonic() - killed > 30:
                break
            time.sleep(0.5)
        came_back = time.monotonic() - killed
    finally:
        first.stop()
        second.stop()
    assert answer.status_code == 200, answer.text
    assert came_back <= 15 + 2  # STREAM_LEASE_S, and the polling's step


@pytest.mark.slow  # a real service over a SQLite file
def test_a_stream_gives_its_slot_back_when_its_client_leaves_or_it_fails(
    endpoint: OpenAITestServer, tmp_path: Path
) -> None:
    env = {"CHATCHAIN_SERVER_STREAMS_PER_USER": "1"}
    service = start_service(f"sqlite:///{tmp_path / 'chat.db'}", endpoint, tmp_path, env=env)
    try:
        _, token = service.add_user()
        client = service.client(token)
        ask = {"json": {"text": "hi there"}, "headers": {"Accept": "text/event-stream"}}
        endpoint.add_fault(Fault(keep_alive=60, stall_after=1, interval=0.05))
        with client.stream("POST", "/v1/sessions/a/messages", **ask) as left:  # type: ignore[arg-type]
            assert next(events(left))[0] == "text"
        # The client left mid-stream: its slot is back as soon as the server sees it gone,
        # well before a lease could run out.
        left_at = time.monotonic()
        endpoint.add_fault(Fault(cut_after=2))  # the next stream fails after its first text
        failed = client.post("/v1/sessions/b/messages", **ask)  # type: ignore[arg-type]
        while failed.status_code == 429 and time.monotonic() - left_at < 30:
            time.sleep(0.2)
            failed = client.post("/v1/sessions/b/messages", **ask)  # type: ignore[arg-type]
        after_failure = client.post("/v1/sessions/c/messages", **ask)  # type: ignore[arg-type]
        waited = time.monotonic() - left_at
    finally:
        service.stop()
    assert failed.status_code == 200 and "event: error" in failed.text, failed.text
    assert after_failure.status_code == 200 and "event: error" not in after_failure.text
    assert waited < 10  # no lease ran out (15 s): each slot was given back at its end
    assert endpoint.requests  # (the fault was used by the failed stream, not by a refusal)
