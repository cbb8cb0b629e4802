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


def wipe(url: str) -> None:
    """Empty every table of the store's file but the migrations' record, in one transaction."""
    path = _path_from_url(url)
    if not path.exists():
        return
    conn = sqlite3.connect(path)
    try:
        with conn:
            tables = [
                name
                for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                if name != "_chatchain_migrations" and not name.startswith("sqlite_")
            ]
            for table in tables:
                conn.execute(f'DELETE FROM "{table}"')
    finally:
        conn.close()


@pytest.fixture
def sqlite_store(sqlite_url: str) -> Iterator[SQLiteStore]:
    wipe(sqlite_url)  # also what earlier tests left through open_store(sqlite_url)
    store = open_store(sqlite_url, lock_timeout=1.0)
    assert isinstance(store, SQLiteStore)
    yield store
    store.close()
    wipe(sqlite_url)
