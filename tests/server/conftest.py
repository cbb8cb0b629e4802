"""The chat service under test: real ``chatchain serve`` processes (uvicorn) over loopback.

`start_service` runs ``python -m chatchain serve`` on a free port of 127.0.0.1 over a store
(a SQLite file of the test's own by default), with the real ChatOpenAI pointed at an
`OpenAITestServer` of this process, so tests can queue faults on the endpoint. `Service`
adds users straight to the store (as ``chatchain users add`` does) and talks HTTP with httpx.

Fixtures: ``endpoint`` (the test server, one per module), ``service`` (one service per
module over its own SQLite file, with a short lock timeout and no retries), and ``user`` /
``other`` (a fresh user each test, as ``(name, token)``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatchain.stores import open_store
from chatchain.testing import OpenAITestServer
from chatchain.testing._stores import free_port
from chatchain.users import Users

__all__ = [
    "Service",
    "endpoint",
    "events",
    "other",
    "service",
    "start_service",
    "user",
]

# Settings of every service under test: the whole history is sent, no summaries, short waits.
BASE_ENV = {
    "OPENAI_API_KEY": "sk-test-0123456789abcdef",
    "OPENAI_MODEL": "gpt-4o-mini",
    "CHATCHAIN_WINDOW_TURNS": "1000",
    "CHATCHAIN_SUMMARIZE": "false",
    "CHATCHAIN_LOCK_TIMEOUT": "30",
}


@dataclass
class Service:
    """A running ``chatchain serve`` and the store it serves."""

    url: str
    store_url: str
    process: subprocess.Popen[bytes]
    log: Path
    clients: list[httpx.Client] = field(default_factory=list)

    def add_user(self, name: str | None = None, **caps: float) -> tuple[str, str]:
        """A new user in the service's store (``chatchain users add``): ``(name, token)``."""
        name = name or f"u{uuid.uuid4().hex[:10]}"
        with closing(open_store(self.store_url)) as store:
            return name, Users(store).add(name, **caps)

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        """An HTTP client of the service, with ``token`` as its bearer token."""
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)
        self.clients.append(client)
        return client

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_service(
    store_url: str,
    endpoint: OpenAITestServer | None,
    cwd: Path,
    *,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    port: int | None = None,
) -> Service:
    """Start ``chatchain serve`` over ``store_url`` and wait until ``/healthz`` answers 200.

    Without an ``endpoint``, the service runs ``--offline`` (and no ``OPENAI_*`` is set);
    ``args`` are more options of ``chatchain serve`` (``--tools MODULE``, say); ``port`` is
    a free one unless given (an instance started again where a proxy expects it).
    """
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CHATCHAIN_"))}
    clean.pop("PROMETHEUS_MULTIPROC_DIR", None)
    model = {} if endpoint is None else {**BASE_ENV, "OPENAI_BASE_URL": endpoint.base_url}
    full_env = {**clean, **model, **(env or {})}
    port = port or free_port()
    log = cwd / f"serve-{port}-{time.monotonic_ns()}.log"
    argv = [sys.executable, "-m", "chatchain", "serve", "--port", str(port)]
    argv += ["--store", store_url, "--workers", str(workers), *args]
    if endpoint is None:
        argv.append("--offline")
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=full_env, cwd=cwd, stdout=out, stderr=out)
    service = Service(f"http://127.0.0.1:{port}", store_url, process, log)
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise AssertionError(
                f"chatchain serve exited ({process.returncode}):\n{log.read_text()}"
            )
        try:
            if httpx.get(f"{service.url}/healthz", timeout=2).status_code == 200:
                return service
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            service.stop()
            raise AssertionError(f"chatchain serve did not start:\n{log.read_text()}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[OpenAITestServer]:
    """The model endpoint every service of the module talks to (faults cleared per test)."""
    with OpenAITestServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh_endpoint(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "endpoint" in request.fixturenames:
        request.getfixturevalue("endpoint").clear()


@pytest.fixture(scope="module")
def service(
    endpoint: OpenAITestServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """One service per module over a SQLite file of its own; no retries, 2 s timeouts, a
    lock timeout of 1 s (so a busy session answers 409 soon)."""
    folder = tmp_path_factory.mktemp("service")
    env = {"CHATCHAIN_MAX_RETRIES": "0", "CHATCHAIN_TIMEOUT": "2", "CHATCHAIN_LOCK_TIMEOUT": "1"}
    running = start_service(f"sqlite:///{folder / 'chat.db'}", endpoint, folder, env=env)
    yield running
    running.stop()


@pytest.fixture
def user(service: Service) -> tuple[str, str]:
    """A new user of the module's service: ``(name, token)``."""
    return service.add_user()


@pytest.fixture
def other(service: Service) -> tuple[str, str]:
    """A second new user of the module's service."""
    return service.add_user()


def events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """The server-sent events of a streamed response, as ``(event, data)`` pairs."""
    event, data = "message", []
    for line in response.iter_lines():
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:") :].removeprefix(" "))
