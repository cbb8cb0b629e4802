"""A real redis-server for the run, and a fresh store on it for each test.

The server is pytest-redis's `RedisExecutor` (a mirakuru executor that starts
/usr/bin/redis-server and waits for its port) on a free port, started here rather than
through the plugin's ``redis_proc`` fixture so that this module's two fixtures are all a
test needs, and so that `redis_server` can start more servers for tests that stop them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import port_for
import pytest
import redis
from pytest_redis.executor import RedisExecutor

from chatchain.stores._redis import RedisStore

__all__ = ["redis_store", "redis_url"]


@contextmanager
def redis_server(datadir: Path, *, appendonly: bool = False) -> Iterator[RedisExecutor]:
    """A redis-server on a free port of 127.0.0.1, keeping its files in ``datadir``.

    With ``appendonly``, every acknowledged write survives a kill -9, as in production.
    """
    executable = shutil.which("redis-server") or "/usr/bin/redis-server"
    server = RedisExecutor(
        executable=executable,
        databases=2,
        redis_timeout=0,
        loglevel="warning",
        host="127.0.0.1",
        port=port_for.select_random(),
        datadir=datadir,
        appendonly="yes" if appendonly else "no",
        startup_timeout=30,
    )
    with server:
        yield server


def url_of(server: RedisExecutor) -> str:
    return f"redis://{server.host}:{server.port}/0"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a redis-server this run started (and stops at its end)."""
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield url_of(server)


def _flush(url: str) -> None:
    with redis.Redis.from_url(url) as client:
        client.flushdb()


@pytest.fixture
def redis_store(redis_url: str) -> Iterator[RedisStore]:
    """A fresh, empty `RedisStore` on the run's server, wiped afterwards."""
    _flush(redis_url)
    store = RedisStore(redis_url, lock_timeout=1.0)
    yield store
    store.close()
    _flush(redis_url)
