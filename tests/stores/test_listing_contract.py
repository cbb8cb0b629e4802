"""`HistoryStore.session_infos`: the sessions of one id prefix, newest first, on every store
(the example store gets the base class's default); and that the built-in stores read an index
range, not every session."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from langchain_core.messages import AIMessage, HumanMessage

from chatchain.stores import HistoryStore, SQLiteStore, Summary
from chatchain.stores._base import prefix_end
from chatchain.stores._postgres import PostgresStore
from chatchain.stores._sqlite import _session_infos_sql

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)

# Ids that share a beginning with the prefixes below without being in their range, and ids
# with LIKE's wildcards and non-ASCII characters (astral ones too).
IDS = [
    "al:1",
    "al:2",
    "al:",
    "alice:1",
    "al",
    "al;x",
    "ak:z",
    "AL:1",
    "a%:1",
    "ab:1",
    "a_:1",
    "zö:日本",
    "zo:1",
    "zö:",
    "🙂:1",
    "🙃:1",
    "x\uffff:1",
    "x\U00010000:1",
]


def fill(store: HistoryStore, ids: list[str]) -> None:
    """Each id holds two messages; the later in the list, the later written."""
    for i, session_id in enumerate(ids):
        store.replace_session(
            session_id,
            [HumanMessage(f"q {session_id}"), AIMessage("a")],
            created_at=T0,
            updated_at=T0 + timedelta(minutes=i),
        )


def listed(store: HistoryStore, prefix: str, limit: int | None = None) -> list[str]:
    return [info.session_id for info in store.session_infos(prefix, limit)]


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("al:", ["al:", "al:2", "al:1"]),
        ("alice:", ["alice:1"]),
        ("al", ["al;x", "al", "alice:1", "al:", "al:2", "al:1"]),
        ("a%", ["a%:1"]),
        ("a_", ["a_:1"]),
        ("zö:", ["zö:", "zö:日本"]),
        ("🙂", ["🙂:1"]),
        ("x\uffff", ["x\uffff:1"]),
        ("nobody:", []),
    ],
)
def test_session_infos_lists_exactly_the_ids_that_start_with_the_prefix(
    store: HistoryStore, prefix: str, expected: list[str]
) -> None:
    fill(store, IDS)
    assert listed(store, prefix) == expected
    assert all(info.session_id.startswith(prefix) for info in store.session_infos(prefix))


def test_session_infos_without_a_prefix_lists_every_session_newest_first(
    store: HistoryStore,
) -> None:
    fill(store, IDS)
    assert listed(store, "") == IDS[::-1]


def test_session_infos_gives_what_info_gives(store: HistoryStore) -> None:
    fill(store, ["ann:a", "ann:b"])
    store.append("ann:a", [HumanMessage("more")])
    assert store.session_infos("ann:") == [store.info("ann:a"), store.info("ann:b")]
    assert store.session_infos("ann:")[0].message_count == 3


def test_session_infos_keeps_the_newest_up_to_the_limit_ties_by_id(store: HistoryStore) -> None:
    for session_id in ("u:c", "u:a", "u:b"):  # one time for all three: ordered by id
        store.replace_session(session_id, [HumanMessage("q")], updated_at=T0)
    store.replace_session("u:old", [HumanMessage("q")], updated_at=T0 - timedelta(days=1))
    store.replace_session("u:new", [HumanMessage("q")], updated_at=T0 + timedelta(days=1))
    assert listed(store, "u:") == ["u:new", "u:a", "u:b", "u:c", "u:old"]
    assert listed(store, "u:", limit=2) == ["u:new", "u:a"]
    assert listed(store, "u:", limit=0) == []


def test_session_infos_leaves_out_deleted_and_empty_sessions(store: HistoryStore) -> None:
    fill(store, ["ann:gone", "ann:kept"])
    store.delete("ann:gone")
    store.set_summary("ann:summary-only", Summary("no messages", 0))
    store.replace_session("ann:emptied", [])
    assert listed(store, "ann:") == ["ann:kept"]


def test_prefix_end_bounds_exactly_the_ids_that_start_with_the_prefix() -> None:
    assert prefix_end("ann:") == "ann;"
    assert prefix_end("a\U0010ffff") == "b"
    assert prefix_end("\U0010ffff") is None
    assert prefix_end("") is None
    assert prefix_end("a\ud7ff") == "a\ue000"  # past the surrogates, which UTF-8 cannot hold
    for prefix in ("al:", "zö:", "x\uffff", "🙂"):
        end = prefix_end(prefix)
        assert end is not None
        inside = [i for i in IDS if prefix <= i < end]
        assert inside == [i for i in IDS if i.startswith(prefix)]


def test_sqlite_session_infos_reads_a_range_of_the_primary_key(tmp_path: Path) -> None:
    path = tmp_path / "plan.db"
    store = SQLiteStore(path)
    try:
        fill(store, [f"user{n}:s{i}" for n in range(20) for i in range(5)])
        # Realistic statistics too: the planner must still take the id range, not the
        # updated_at index (which would read every session to fill the LIMIT).
        for analyzed in (False, True):
            with closing(sqlite3.connect(path)) as conn:  # sqlite3's own `with` does not close
                if analyzed:
                    conn.execute("ANALYZE")
                plan = " | ".join(
                    row[3]
                    for row in conn.execute(
                        "EXPLAIN QUERY PLAN " + _session_infos_sql(bounded=True),
                        ("user3:", prefix_end("user3:"), 500),
                    )
                )
            assert "SEARCH sessions USING INDEX sqlite_autoindex_sessions_1" in plan, plan
            assert "(session_id>? AND session_id<?)" in plan, plan
            assert "SCAN" not in plan, plan
        assert len(store.session_infos("user3:")) == 5
    finally:
        store.close()


def test_redis_session_infos_indexes_a_store_written_before_the_index(
    redis_store: HistoryStore,
) -> None:
    fill(redis_store, ["ann:1", "ann:2", "bob:1"])
    client = redis_store._client  # type: ignore[attr-defined]
    client.delete(redis_store._ids)  # type: ignore[attr-defined]  # as an older version left it
    assert listed(redis_store, "ann:") == ["ann:2", "ann:1"]
    assert client.zcard(redis_store._ids) == 3  # type: ignore[attr-defined]


def test_postgres_session_infos_can_use_the_id_index(postgres_store: HistoryStore) -> None:
    fill(postgres_store, [f"user{n}:s{i}" for n in range(20) for i in range(5)])
    sql = postgres_store._sql  # type: ignore[attr-defined]
    with postgres_store._connection() as conn, conn.transaction():  # type: ignore[attr-defined]
        conn.execute("SET LOCAL enable_seqscan = off")  # a table this small is read whole
        rows = conn.execute(
            b"EXPLAIN " + sql.session_infos.as_bytes(conn),
            {"low": "user3:", "high": prefix_end("user3:"), "limit": 500},
        ).fetchall()
    plan = "\n".join(row[0] for row in rows)
    assert "Index" in plan and "Seq Scan" not in plan, plan
    assert len(postgres_store.session_infos("user3:")) == 5


def test_postgres_session_infos_is_by_code_point_whatever_the_collation(
    postgres_url: str,
) -> None:
    # Under a linguistic collation "al:x" sorts between "al" and "alice" (punctuation counts
    # last), so a range in the database's own collation would mix users' sessions.
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS listing_icu")
        conn.execute(
            "CREATE DATABASE listing_icu TEMPLATE template0 ENCODING 'UTF8' "
            "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
        )
    url = postgres_url.rsplit("/", 1)[0] + "/listing_icu"
    store = PostgresStore(url, lock_timeout=1.0)
    try:
        fill(store, IDS)
        assert listed(store, "al:") == ["al:", "al:2", "al:1"]
        assert listed(store, "zö:") == ["zö:", "zö:日本"]
        assert listed(store, "") == IDS[::-1]
    finally:
        store.close()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute("DROP DATABASE listing_icu")
