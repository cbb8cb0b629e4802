"""Throwaway redis-server and PostgreSQL servers for the benchmarks, on free ports of 127.0.0.1.

Both come from the test suite's own launchers, so benchmarks and tests run the servers the
same way:

- `redis_url`: ``tests.stores.fixtures_redis.redis_server`` (pytest-redis's executor running
  /usr/bin/redis-server, no persistence to disk);
- `postgres_url`: ``tests.stores.fixtures_postgres.PostgresCluster`` (``initdb`` in a temporary
  directory, trust authentication on 127.0.0.1 only, run as the ``postgres`` user when we are
  root, with ``fsync``, ``synchronous_commit`` and ``full_page_writes`` off).

Each is a context manager that stops its server and removes its files on the way out, even
after an error. Neither touches a system service on 5432 or 6379.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A script's sys.path starts with its own folder, not the working directory: the launchers
# live in the repository's `tests` package, so put the repository root at the end.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

__all__ = ["postgres_url", "postgres_version", "redis_url", "redis_version"]


@contextmanager
def redis_url() -> Iterator[str]:
    """A redis-server of our own; yields its ``redis://`` URL."""
    import redis

    from tests.stores.fixtures_redis import redis_server, url_of

    with (
        tempfile.TemporaryDirectory(prefix="chatchain-bench-redis-") as datadir,
        redis_server(Path(datadir)) as server,
    ):
        url = url_of(server)
        # Redis's default snapshot rules would fork a background save in the middle of the
        # measurements (the 100,000-message pre-fill crosses "10000 changes in 60 s").
        with redis.Redis.from_url(url) as client:
            client.config_set("save", "")
        yield url


@contextmanager
def postgres_url() -> Iterator[str]:
    """A PostgreSQL cluster of our own; yields its ``postgresql://`` URL."""
    from tests.stores.fixtures_postgres import PostgresCluster

    with PostgresCluster.running() as url:
        yield url


def redis_version(url: str) -> str:
    import redis

    with redis.Redis.from_url(url) as client:
        return str(client.info("server")["redis_version"])


def postgres_version(url: str) -> str:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]).split()[0] if row else "unknown"
