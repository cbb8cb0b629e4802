"""PostgreSQL for the store tests: a throwaway cluster on a free port, started once per run.

The cluster (`chatchain.testing.PostgresCluster`) lives in a temporary directory with trust
authentication on 127.0.0.1 only, and is stopped and removed at the end of the run. It never
touches the system cluster that the Debian package may have started on port 5432.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from chatchain.stores._postgres import PostgresStore
from chatchain.testing import PostgresCluster

__all__ = ["postgres_store", "postgres_url"]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL of a PostgreSQL server this test run started, on a free port of 127.0.0.1."""
    with PostgresCluster.running() as url:
        yield url


def wipe(url: str, prefix: str = "chatchain") -> None:
    """Drop every table a store of ``prefix`` creates (it recreates them when opened)."""
    tables = [
        "messages",
        "sessions",
        "migrations",
        "usage",
        "usage_totals",
        "budget_holds",
        "users",
        "usage_days",
        "pending_turns",
        "session_titles",
        "throttle",
    ]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS " + ", ".join(f"{prefix}_{t}" for t in tables))


@pytest.fixture
def postgres_store(postgres_url: str) -> Iterator[PostgresStore]:
    """A fresh, empty store (the default tables, as `open_store` opens them), dropped after."""
    wipe(postgres_url)  # also what earlier tests left through open_store(postgres_url)
    store = PostgresStore(postgres_url, lock_timeout=1.0)
    try:
        yield store
    finally:
        store.close()
        wipe(postgres_url)
