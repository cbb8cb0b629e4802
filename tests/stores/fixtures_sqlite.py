"""SQLite fixtures: one database file for the run, emptied after each test."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from chatchain.stores import open_store
from chatchain.stores._sqlite import SQLiteStore, _path_from_url

__all__ = ["sqlite_store", "sqlite_url"]


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An absolute ``sqlite:////...`` URL of a file in this run's temporary folder."""
    # Absolute: the tests run from a fresh working directory each.
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'chatchain.db'}"


@pytest.fixture
def sqlite_store(sqlite_url: str) -> Iterator[SQLiteStore]:
    store = open_store(sqlite_url, lock_timeout=1.0)
    assert isinstance(store, SQLiteStore)
    yield store
    store.close()
    conn = sqlite3.connect(_path_from_url(sqlite_url))
    try:
        with conn:  # one transaction
            for table in ("messages", "sessions", "locks"):
                conn.execute(f"DELETE FROM {table}")
    finally:
        conn.close()
