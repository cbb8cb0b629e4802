"""The `store` fixture: every backend, each against a real server or file.

Each backend's fixture lives in its own plugin module (fixtures_<backend>.py), which starts
what it needs (a temporary SQLite file, a redis-server, a PostgreSQL cluster) once per run.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from chatchain.stores import HistoryStore, MemoryStore, as_store
from tests.stores.example_store import TinyStore
from tests.stores.fixtures_postgres import postgres_store, postgres_url
from tests.stores.fixtures_redis import redis_store, redis_url
from tests.stores.fixtures_sqlite import sqlite_store, sqlite_url

# Each backend's fixtures, registered here by name.
__all__ = [
    "example_store",
    "memory_store",
    "postgres_store",
    "postgres_url",
    "redis_store",
    "redis_url",
    "sqlite_store",
    "sqlite_url",
    "store",
]

# "example": the third-party store of docs/writing-a-store.md, completed by `as_store`.
BACKENDS = ["memory", "sqlite", "redis", "postgres", "example"]


@pytest.fixture
def memory_store() -> Iterator[HistoryStore]:
    store = MemoryStore(lock_timeout=1.0)
    yield store
    store.close()


@pytest.fixture
def example_store() -> Iterator[HistoryStore]:
    store = as_store(TinyStore(), lock_timeout=1.0)
    yield store
    store.close()


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest) -> HistoryStore:
    """A fresh, empty store of each backend, built with ``lock_timeout=1.0``."""
    return request.getfixturevalue(f"{request.param}_store")  # type: ignore[no-any-return]
