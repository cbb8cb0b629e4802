"""A real redis-server for the run (`chatchain.testing.redis_server`), and a fresh store on it
for each test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from chatchain.stores._redis import RedisStore
from chatchain.testing import redis_server, redis_url_of

__all__ = ["redis_store", "redis_url"]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a redis-server this run started (and stops at its end)."""
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield redis_url_of(server)


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
