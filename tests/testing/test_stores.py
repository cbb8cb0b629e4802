"""chatchain.testing's Redis and PostgreSQL launchers: servers of a test's own, gone afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage

from chatchain.stores import open_store
from chatchain.testing import PostgresCluster, redis_server, redis_url_of

pytestmark = pytest.mark.services  # starts servers of its own


def _round_trip(url: str) -> list[str]:
    store = open_store(url)
    try:
        store.append("s", [HumanMessage("hi"), AIMessage("hello")])
        return [str(m.content) for m in store.load("s")]
    finally:
        store.close()


def test_redis_server_serves_a_store_and_removes_its_temporary_files() -> None:
    with redis_server() as server:
        url = redis_url_of(server)
        datadir = Path(server.unixsocket).parent
        assert url.startswith("redis://127.0.0.1:") and not url.endswith(":6379/0")
        assert _round_trip(url) == ["hi", "hello"]
    assert not server.running()
    assert not datadir.exists()


def test_postgres_cluster_serves_a_store_survives_a_crash_and_is_removed() -> None:
    cluster = PostgresCluster()
    try:
        cluster.start()
        assert ":5432/" not in cluster.url
        assert _round_trip(cluster.url) == ["hi", "hello"]
        cluster.stop("immediate")  # like a crash
        cluster.start()
        store = open_store(cluster.url)
        assert [str(m.content) for m in store.load("s")] == ["hi", "hello"]
        store.close()
    finally:
        cluster.destroy()
    assert not cluster.root.exists()
