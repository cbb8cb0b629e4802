"""The deployment the README documents: its nginx configuration, run by Debian's nginx in front
of two ``chatchain serve`` instances over one PostgreSQL and over one Redis.

The configuration is the README's ```nginx block (see `tests/server/nginx.py`), with the
instances' ports in its upstream and a plain-HTTP listen port instead of TLS. Through it:
isolation between users, a stream that arrives piece by piece, a budget that holds across both
instances, a rolling restart under load without a failed request, and kill -9 of the instance
serving a stream.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from chatchain.testing import OpenAITestServer
from tests.server.conftest import Service, events, start_service
from tests.server.nginx import Nginx, for_test, free_ports, readme_config
from tests.stores.fixtures_postgres import postgres_url, wipe
from tests.stores.fixtures_redis import redis_url

__all__ = ["endpoint", "postgres_url", "redis_url"]

pytestmark = pytest.mark.slow

WORDS = 40  # a streamed reply of 40 chunks, 50 ms apart: about 2 s
STORY = " ".join(f"word{i}" for i in range(WORDS))
# No per-user throttle here (four clients turn as fast as they can); budgets stay on.
ENV = {"CHATCHAIN_SERVER_REQUESTS_PER_MINUTE": "100000", "CHATCHAIN_SERVER_STREAMS_PER_USER": "100"}


@pytest.fixture(scope="module")
def endpoint() -> Iterator[OpenAITestServer]:
    """The model endpoint: streamed replies come a chunk every 50 ms, as from a real model."""
    with OpenAITestServer(chunk_interval=0.05) as server:
        yield server


@dataclass
class Deployment:
    """Two instances on fixed ports behind nginx, over one store."""

    store_url: str
    endpoint: OpenAITestServer
    folder: Path
    ports: list[int]
    listen: int
    proxy: Nginx
    instances: list[Service] = field(default_factory=list)
    clients: list[httpx.Client] = field(default_factory=list)

    def launch(self, index: int) -> Service:
        """Start instance ``index`` on its port; wait until it answers."""
        return start_service(
            self.store_url, self.endpoint, self.folder, env=ENV, port=self.ports[index]
        )

    def start(self, index: int) -> Service:
        """Start instance ``index`` again, in its place."""
        self.instances[index] = service = self.launch(index)
        return service

    def running(self) -> None:
        """Start again any instance a test stopped or killed."""
        for index, service in enumerate(self.instances):
            if service.process.poll() is not None:
                self.start(index)

    def client(self, token: str, **kwargs: Any) -> httpx.Client:
        """A client of the proxy with ``token`` as its bearer token."""
        headers = {"Authorization": f"Bearer {token}"}
        client = httpx.Client(base_url=self.proxy.url, headers=headers, **{"timeout": 60, **kwargs})
        self.clients.append(client)
        return client

    def add_user(self, **caps: float) -> tuple[str, str]:
        return self.instances[0].add_user(**caps)

    def rotate(self, down: Collection[int] = ()) -> None:
        """Reload nginx with the instances of ``down`` (indexes) taken out of rotation."""
        ports = {self.ports[index] for index in down}
        self.proxy.reload(for_test(readme_config(), self.ports, self.listen, down=ports))
        time.sleep(0.5)  # the new workers take over; the old ones finish their requests

    def port_of(self, upstream: str) -> int:
        return int(upstream.rsplit(":", 1)[1])


@pytest.fixture(scope="module", params=["postgres", "redis"])
def deployment(
    request: pytest.FixtureRequest,
    endpoint: OpenAITestServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    store_url = request.getfixturevalue(f"{request.param}_url")
    if request.param == "postgres":
        wipe(store_url)
    else:
        with redis.Redis.from_url(store_url) as client:
            client.flushdb()
    folder = tmp_path_factory.mktemp(f"nginx-{request.param}")
    *ports, listen = free_ports(3)
    proxy = Nginx(for_test(readme_config(), ports, listen), folder, listen)
    found = Deployment(store_url, endpoint, folder, ports, listen, proxy)
    try:
        # Both at once: a Python process takes seconds to start on a busy machine.
        with ThreadPoolExecutor(2) as pool:
            launched = [pool.submit(found.launch, index) for index in (0, 1)]
        found.instances = [f.result() for f in launched if f.exception() is None]
        for future in launched:
            future.result()  # the first failure, once those that started will be stopped
        proxy.start()
        yield found
    finally:
        for client in found.clients:
            client.close()
        proxy.stop()
        for service in found.instances:
            service.stop()


@pytest.fixture
def deployed(deployment: Deployment) -> Deployment:
    """The module's deployment with both instances up (a test may have stopped one)."""
    deployment.running()
    return deployment


def _turn(client: httpx.Client, session: str, text: str) -> httpx.Response:
    return client.post(f"/v1/sessions/{session}/messages", json={"text": text})


# -- the configuration ------------------------------------------------------------------------


def test_the_readme_block_is_what_runs() -> None:
    config = for_test(readme_config(), [7001, 7002], 7000)

    assert "server 127.0.0.1:7001 max_fails=1 fail_timeout=5s;" in config
    assert "server 127.0.0.1:7002 max_fails=1 fail_timeout=5s;" in config
    assert "listen 127.0.0.1:7000;" in config and "ssl" not in config
    for setting in (
        "proxy_buffering off;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_next_upstream error timeout;",
    ):
        assert setting in config
    assert "non_idempotent" not in config.split("proxy_next_upstream ", 1)[1].split(";")[0]


# -- through the proxy ------------------------------------------------------------------------


def test_users_are_isolated_through_the_proxy(deployed: Deployment) -> None:
    _, ann_token = deployed.add_user()
    _, bob_token = deployed.add_user()
    ann, bob = deployed.client(ann_token), deployed.client(bob_token)

    assert _turn(ann, "plans", "ann's secret").status_code == 200
    reads = [ann.get("/v1/sessions/plans/messages") for _ in range(4)]
    theirs = [bob.get("/v1/sessions/plans/messages") for _ in range(4)]
    listed = [bob.get("/v1/sessions").json() for _ in range(2)]

    assert [r.status_code for r in reads] == [200] * 4
    assert all(r.json()["messages"][0]["text"] == "ann's secret" for r in reads)
    assert {r.headers["x-upstream"] for r in reads} == {
        f"127.0.0.1:{port}" for port in deployed.ports
    }  # both instances served ann's session
    assert [r.status_code for r in theirs] == [404] * 4
    assert {r.headers["x-upstream"] for r in theirs} == {f"127.0.0.1:{p}" for p in deployed.ports}
    assert all("plans" not in str(page) for page in listed)


def test_a_stream_arrives_piece_by_piece_not_buffered(deployed: Deployment) -> None:
    _, token = deployed.add_user()
    deployed.endpoint.queue_replies(STORY)
    client = deployed.client(token)
    arrivals: list[float] = []
    started = time.monotonic()
    with client.stream(
        "POST",
        "/v1/sessions/story/messages",
        json={"text": "a story"},
        headers={"Accept": "text/event-stream"},
    ) as answer:
        assert answer.status_code == 200
        kinds = []
        for kind, _ in events(answer):
            kinds.append(kind)
            if kind == "text":
                arrivals.append(time.monotonic() - started)

    assert kinds[-1] == "done"
    # 40 chunks 50 ms apart: the first reaches the client long before the last is sent, and
    # the others one by one (buffered, they would come together at the end).
    assert arrivals[-1] - arrivals[0] > 1.0, arrivals
    assert len({round(t, 2) for t in arrivals}) > WORDS // 2, arrivals


def test_a_budget_holds_across_both_instances(deployed: Deployment) -> None:
    _, probe = deployed.add_user()
    one = _turn(deployed.client(probe), "probe", "q0").json()["usage"]["cost_usd"]
    budget = one * 4.5
    _, token = deployed.add_user(budget_usd=budget)
    client = deployed.client(token)

    answers = [_turn(client, "spend", f"q{i}") for i in range(10)]

    statuses = [a.status_code for a in answers]
    assert 1 <= statuses.count(200) <= 4, statuses
    first = statuses.index(402)
    assert statuses[first:] == [402] * (len(statuses) - first), statuses
    assert {a.json()["error"]["type"] for a in answers[first:]} == {"BudgetExceeded"}
    spent = client.get("/v1/usage").json()["total"]["cost_usd"]
    assert spent <= budget
    served = {a.headers["x-upstream"] for a in answers[:first]}
    refused = {a.headers["x-upstream"] for a in answers[first:]}
    assert len(served) == len(refused) == 2  # both instances spent from, and refused by, one cap


def test_a_users_requests_per_minute_hold_across_both_instances(deployed: Deployment) -> None:
    _, token = deployed.add_user(requests_per_minute=20)
    client = deployed.client(token)

    answers = [client.get("/v1/sessions") for _ in range(40)]

    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == 20 and statuses.count(429) == 20, statuses
    refused = [a for a in answers if a.status_code == 429]
    assert all(1 <= int(a.headers["retry-after"]) <= 60 for a in refused)
    served = {a.headers["x-upstream"] for a in answers if a.status_code == 200}
    assert len(served) == 2 and {a.headers["x-upstream"] for a in refused} == served


def _under_load(deployed: Deployment, restart: Callable[[], None]) -> list[int | str]:
    """Run ``restart`` while 4 clients send turns through the proxy, each on its own session
    and as fast as they are answered; every answer's status (or exception's name)."""
    users = [deployed.add_user() for _ in range(4)]
    statuses: list[list[int | str]] = [[] for _ in users]
    stop = threading.Event()

    def client_loop(index: int, token: str) -> None:
        client = deployed.client(token, timeout=60)
        turn = 0
        while not stop.is_set():
            try:
                answer = _turn(client, f"load{index}", f"q{turn}")
                statuses[index].append(answer.status_code)
            except httpx.HTTPError as exc:
                statuses[index].append(type(exc).__name__)
            turn += 1

    threads = [
        threading.Thread(target=client_loop, args=(i, token)) for i, (_, token) in enumerate(users)
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        restart()
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    for index, (_, token) in enumerate(users):  # every answered turn is stored, once
        history = deployed.client(token).get(f"/v1/sessions/load{index}/messages").json()
        assert len(history["messages"]) == 2 * statuses[index].count(200)
    return [status for each in statuses for status in each]


def _stop_and_start(deployed: Deployment, index: int) -> None:
    service = deployed.instances[index]
    service.process.send_signal(signal.SIGTERM)
    service.process.wait(30)
    deployed.start(index)  # and wait until its /healthz answers


def test_a_rolling_restart_as_documented_fails_no_request(deployed: Deployment) -> None:
    def restart() -> None:
        for index in (0, 1):  # the README's steps, one instance at a time
            deployed.rotate(down=[index])
            _stop_and_start(deployed, index)
            deployed.rotate(down=[])

    statuses = _under_load(deployed, restart)

    assert len(statuses) > 40
    assert [s for s in statuses if s != 200] == [], deployed.proxy.errors()[-3000:]


def test_kill_9_of_the_instance_serving_a_stream(deployed: Deployment) -> None:
    _, token = deployed.add_user()
    client = deployed.client(token, timeout=30)
    deployed.endpoint.queue_replies(STORY)
    kinds: list[str] = []
    cut: Exception | None = None
    with client.stream(
        "POST",
        "/v1/sessions/crash/messages",
        json={"text": "a story"},
        headers={"Accept": "text/event-stream"},
    ) as answer:
        victim = deployed.port_of(answer.headers["x-upstream"])
        try:
            for kind, _ in events(answer):
                kinds.append(kind)
                if kinds.count("text") == 3:
                    index = deployed.ports.index(victim)
                    deployed.instances[index].process.send_signal(signal.SIGKILL)
        except httpx.HTTPError as exc:
            cut = exc

    assert "done" not in kinds  # the client sees the stream cut, never a finished reply
    assert cut is not None or kinds[-1] == "error", kinds
    started = time.monotonic()
    after = _turn(client, "crash", "still there?")
    assert after.status_code == 200, after.text
    assert after.headers["x-upstream"] != f"127.0.0.1:{victim}"
    waited = time.monotonic() - started
    assert waited < 15, waited  # at most the dead instance's lock lease (10 s on Redis)
    # The killed turn is not lost: its message, and the reply so far marked interrupted.
    history = client.get("/v1/sessions/crash/messages").json()["messages"]
    assert [(m["role"], m["text"]) for m in history[0::2]] == [
        ("user", "a story"),
        ("user", "still there?"),
    ]
    # (the reply so far is saved every second: this one was killed before its first save)
    assert history[1]["interrupted"] and STORY.startswith(history[1]["text"])
    assert not history[3]["interrupted"]
