"""What only the Redis store has to get right: its keys, its leases, a server that fails."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import port_for
import pytest
import redis
from langchain_core.messages import AIMessage, HumanMessage

from chatchain.budgets import BudgetHold, BudgetLimit
from chatchain.errors import ConfigurationError, SessionBusyError, StoreError
from chatchain.stores import Summary, open_store
from chatchain.stores._redis import RedisStore
from chatchain.testing import redis_server, redis_url_of
from chatchain.usage import UsageEntry, total_of
from tests.stores.test_contract import conversation

REPO = Path(__file__).resolve().parents[2]


def raw(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


def contents(store: RedisStore, session_id: str) -> list[str]:
    return [str(m.content) for m in store.load(session_id)]


def run_python(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )


def test_tricky_ids_get_keys_of_their_own(redis_store: RedisStore, redis_url: str) -> None:
    ids = ["a", "a*", "*", "a?", "[a]", "a:b", "a%3Ab", "msgs:a", "created", "", "a b", "名前 🙂"]
    for sid in ids:
        redis_store.append(sid, [HumanMessage(sid)])
    with raw(redis_url) as client:
        keys = set(client.scan_iter())
        assert len(keys) == 2 * len(ids) + 3  # msgs and meta per session, three sorted sets
        session_keys = keys - {"chatchain:created", "chatchain:updated", "chatchain:ids"}
        # No glob metacharacter nor extra ':' can reach a key: the id is percent-encoded.
        assert all(
            re.fullmatch(r"chatchain:(msgs|meta):[\w%.~-]*", k, re.ASCII) for k in session_keys
        )
        redis_store.delete("a*")
        assert len(set(client.scan_iter())) == len(keys) - 2
    for sid in ids:
        assert contents(redis_store, sid) == ([] if sid == "a*" else [sid])
    assert sorted(redis_store.sessions()) == sorted(set(ids) - {"a*"})
    listed = [info.session_id for info in redis_store.session_infos()]
    assert sorted(listed) == sorted(set(ids) - {"a*"})
    assert {info.session_id for info in redis_store.session_infos("a")} == {
        "a",
        "a?",
        "a:b",
        "a%3Ab",
        "a b",
    }


def test_prune_and_delete_leave_no_keys_behind(redis_store: RedisStore, redis_url: str) -> None:
    redis_store.append("old", conversation(2))
    redis_store.set_summary("old", Summary("s", 1))
    redis_store.append("gone", conversation(2))
    cutoff = redis_store.info("gone").updated_at  # type: ignore[union-attr]
    time.sleep(0.01)
    redis_store.append("new", conversation(2))
    redis_store.delete("gone")
    assert redis_store.prune(cutoff) == ["old"]
    with raw(redis_url) as client:
        assert set(client.scan_iter()) == {
            "chatchain:msgs:new",
            "chatchain:meta:new",
            "chatchain:created",
            "chatchain:updated",
            "chatchain:ids",
        }


def test_prefixes_keep_stores_apart(redis_url: str) -> None:
    one, two = RedisStore(redis_url, prefix="one"), RedisStore(redis_url, prefix="two")
    try:
        one.append("s", conversation(2))
        assert (one.count("s"), two.count("s"), two.sessions()) == (2, 0, [])
    finally:
        one.delete("s")
        one.close()
        two.close()
    with pytest.raises(ConfigurationError, match="prefix 'a:b'"):
        RedisStore(redis_url, prefix="a:b")


def test_open_store_and_a_bad_url(redis_url: str) -> None:
    store = open_store(redis_url, lock_timeout=3.0)
    assert isinstance(store, RedisStore)
    assert store.lock_timeout == 3.0
    store.close()
    with pytest.raises(ConfigurationError, match="Invalid Redis URL"):
        RedisStore("redis://127.0.0.1:notaport/0")


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ConfigurationError, match=re.escape("pip install 'chatchain[redis]'")):
        RedisStore()


def test_load_and_count_read_only_what_they_return(redis_store: RedisStore, redis_url: str) -> None:
    redis_store.append("big", conversation(100_000))
    with raw(redis_url) as client:

        def sent() -> int:
            return int(client.info("stats")["total_net_output_bytes"])

        baseline = sent()
        baseline = sent() - baseline  # the INFO reply itself
        before = sent()
        window = redis_store.load("big", -20)
        assert redis_store.count("big") == 100_000
        read = sent() - before - baseline
    assert [m.content for m in window] == [m.content for m in conversation(100_000)[-20:]]
    assert read < 5_000  # the whole session is about 10 MB


def test_unreadable_data_is_a_store_error(redis_store: RedisStore, redis_url: str) -> None:
    with raw(redis_url) as client:
        client.rpush("chatchain:msgs:s", "not json")
    with pytest.raises(StoreError, match="did not write"):
        redis_store.load("s")


def test_append_is_all_or_none_when_the_connection_drops(
    redis_store: RedisStore, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_store.append("s", conversation(2))
    before = redis_store.info("s")

    send = redis.Connection.send_packed_command
    exec_ = b"*1\r\n$4\r\nEXEC\r\n"

    def send_all_but_exec(self: Any, command: Any, check_health: bool = True) -> None:
        data = b"".join(command) if isinstance(command, list) else bytes(command)
        if not data.endswith(exec_):  # the handshake of a new connection
            send(self, command, check_health)
            return
        self._sock.sendall(data[: -len(exec_)])  # all of the transaction but its EXEC
        raise redis.ConnectionError("connection cut by the test")

    with monkeypatch.context() as patch:
        patch.setattr(redis.Connection, "send_packed_command", send_all_but_exec)
        with pytest.raises(StoreError, match="cut by the test"):
            redis_store.append("s", [HumanMessage("q"), AIMessage("a")])
        with pytest.raises(StoreError):
            redis_store.append("fresh", [HumanMessage("q")])
    assert redis_store.info("s") == before
    assert redis_store.sessions() == ["s"]
    with raw(redis_url) as client:
        assert client.exists("chatchain:meta:fresh", "chatchain:msgs:fresh") == 0


def test_out_of_memory_is_a_store_error_and_writes_nothing(
    redis_store: RedisStore, redis_url: str
) -> None:
    redis_store.append("s", conversation(2))
    with raw(redis_url) as client:
        client.config_set("maxmemory", "1")
        try:
            with pytest.raises(StoreError, match="maxmemory"):
                redis_store.append("s", conversation(2))
        finally:
            client.config_set("maxmemory", "0")
    assert redis_store.count("s") == 2


def test_errors_never_show_the_password() -> None:
    port = port_for.select_random()  # nothing listens there
    for url in (
        f"redis://bob:s3cret@127.0.0.1:{port}/0",
        f"redis://127.0.0.1:{port}/0?password=s3cret",
    ):
        store = RedisStore(url)
        with pytest.raises(StoreError, match="Could not reach") as caught:
            store.count("s")
        assert f"127.0.0.1:{port}/0" in str(caught.value)
        assert "s3cret" not in str(caught.value) + repr(store)
        store.close()


LOCK_AND_DIE = """
import os, sys
from chatchain.stores._redis import RedisStore
store = RedisStore(sys.argv[1], lease=1.5)
lock = store.lock("s")  # kept referenced: a collected context manager would release
lock.__enter__()
print("locked", flush=True)
os._exit(0)  # dies with the lock taken, never releasing it
"""


def test_lease_frees_a_session_whose_holder_died(redis_url: str) -> None:
    output, _ = run_python(LOCK_AND_DIE, redis_url).communicate(timeout=30)
    assert output == "locked\n"
    impatient = RedisStore(redis_url, lock_timeout=0.1)
    patient = RedisStore(redis_url, lock_timeout=10.0)
    try:
        with pytest.raises(SessionBusyError, match="another process"), impatient.lock("s"):
            pass
        started = time.monotonic()
        with patient.lock("s"):
            assert time.monotonic() - started < 2.0  # the lease ran out; no 10 s wait
    finally:
        impatient.close()
        patient.close()


def test_lease_is_renewed_while_a_long_turn_runs(redis_url: str) -> None:
    holder = RedisStore(redis_url, lease=0.3)
    other = RedisStore(redis_url, lock_timeout=1.2)  # another store: as if another process
    inside, release = threading.Event(), threading.Event()

    def long_turn() -> None:
        with holder.lock("s"):
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=long_turn)
    thread.start()
    try:
        assert inside.wait(5)
        with pytest.raises(SessionBusyError), other.lock("s"):  # four leases' worth of waiting
            pass
    finally:
        release.set()
        thread.join()
    with other.lock("s"):  # released at once when the turn ended
        pass
    holder.close()
    other.close()


TURNS = """
import sys
from langchain_core.messages import HumanMessage
from chatchain.stores import open_store
store = open_store(sys.argv[1], lock_timeout=30)
for _ in range(10):
    with store.lock("s"):
        seen = store.count("s")
        store.append("s", [HumanMessage(f"{sys.argv[2]}:{seen}")])
store.close()
"""


def test_turns_in_several_processes_take_turns(redis_store: RedisStore, redis_url: str) -> None:
    workers = [run_python(TURNS, redis_url, str(w)) for w in range(3)]
    for worker in workers:
        worker.communicate(timeout=30)
    assert [w.returncode for w in workers] == [0, 0, 0]
    seen = [int(c.split(":")[1]) for c in contents(redis_store, "s")]
    assert seen == list(range(30))  # every turn saw all the turns before it


def test_async_clients_close_with_their_event_loop(redis_store: RedisStore) -> None:
    async def turn(i: int) -> list[str]:
        async with redis_store.alock("s"):
            await redis_store.aappend("s", [HumanMessage(f"q{i}")])
            return [str(m.content) for m in await redis_store.aload("s")]

    for i in range(3):
        assert asyncio.run(turn(i)) == [f"q{j}" for j in range(i + 1)]
        assert redis_store._aclients == {}  # closed when asyncio.run shut its loop down
    gc.collect()  # an unclosed connection would warn here, and warnings are errors


def test_waiting_for_a_busy_session_does_not_block_the_loop(
    redis_store: RedisStore, redis_url: str
) -> None:
    other = RedisStore(redis_url)
    inside, release = threading.Event(), threading.Event()

    def turn_elsewhere() -> None:
        with other.lock("s"):
            inside.set()
            release.wait(5)

    async def run() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        asyncio.get_running_loop().call_later(0.3, release.set)
        async with redis_store.alock("s"):
            ticker.cancel()
        return ticks

    thread = threading.Thread(target=turn_elsewhere)
    thread.start()
    try:
        assert inside.wait(5)
        assert asyncio.run(run()) >= 10
    finally:
        release.set()
        thread.join()
        other.close()


@pytest.mark.services  # starts a server of its own
def test_server_killed_mid_turn_then_restarted(tmp_path: Path) -> None:
    with redis_server(tmp_path, appendonly=True) as server:
        url = redis_url_of(server)
        store = RedisStore(url, lock_timeout=5.0, lease=1.0)
        store.append("s", conversation(4))
        store.set_summary("s", Summary("greetings", 2))
        with pytest.raises(StoreError, match="Could not reach") as caught, store.lock("s"):
            assert len(store.load("s", -2)) == 2
            server.kill()  # kill -9, in the middle of the turn
            store.append("s", [HumanMessage("q"), AIMessage("a")])
        assert url in str(caught.value)
        with pytest.raises(StoreError, match="Could not reach"):
            asyncio.run(store.aappend("s", [HumanMessage("q")]))

        server.start()
        assert contents(store, "s") == [str(m.content) for m in conversation(4)]
        assert store.get_summary("s") == Summary("greetings", 2)
        with store.lock("s"):  # the dead turn's lease runs out within a second
            store.append("s", [HumanMessage("q"), AIMessage("a")])
        assert asyncio.run(store.acount("s")) == 6
        store.close()


# -- the usage ledger ---------------------------------------------------------------------------

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def spend(session: str, *, user: str | None = None, tokens: int = 10, **kw: Any) -> UsageEntry:
    values: dict[str, Any] = {"cost_usd": tokens / 1e6, "latency_s": 0.1, "at": T0, **kw}
    return UsageEntry(
        session,
        "gpt-4o-mini",
        prompt_tokens=tokens,
        total_tokens=tokens,
        requests=1,
        user_id=user,
        **values,
    )


def budget_hold(session: str, *, user: str | None = None, tokens: int = 10) -> BudgetHold:
    expires = datetime.now(UTC) + timedelta(minutes=1)
    return BudgetHold(session, tokens, tokens / 1e6, expires, user_id=user)


def snapshot(url: str) -> dict[str, bytes | None]:
    """Every key of the database and its serialized value."""
    with redis.Redis.from_url(url) as client:
        return {key.decode(): client.dump(key) for key in client.scan_iter()}  # type: ignore[misc]


def test_ledger_survives_a_new_store_object(redis_store: RedisStore, redis_url: str) -> None:
    recorded = [
        spend("a", user="u", tokens=10),
        spend("a", user="u", tokens=20, summary=True, at=T0 + timedelta(hours=1)),
        spend("b", tokens=30, cost_usd=None, at=T0 + timedelta(days=1)),
    ]
    for e in recorded:
        redis_store.record_usage(e)
    kept = budget_hold("a", user="u", tokens=40)
    limit = BudgetLimit("user", "u", max_tokens=100)
    assert redis_store.hold_budget(kept, [limit]) is None
    totals = {
        scope: redis_store.usage_total(*scope)
        for scope in [("session", "a"), ("session", "b"), ("user", "u"), ("all", "")]
    }
    redis_store.close()

    again = RedisStore(redis_url)  # as after a restart, or in another process
    try:
        assert {scope: again.usage_total(*scope) for scope in totals} == totals
        assert totals["session", "a"].cost_usd == pytest.approx(30e-6)
        assert totals["all", ""].cost_usd is None and totals["all", ""].unpriced == 1
        assert again.usage_entries() == recorded
        assert again.usage_entries(user_id="u", since=T0 + timedelta(minutes=1)) == recorded[1:2]
        # The other store's hold counts here: 30 spent + 40 held + 40 > 100.
        refusal = again.hold_budget(budget_hold("a", user="u", tokens=40), [limit])
        assert refusal is not None and (refusal.spent_tokens, refusal.held_tokens) == (30, 40)
        again.record_usage(spend("a", user="u", tokens=5), release=kept.id)
        assert again.hold_budget(budget_hold("a", user="u", tokens=65), [limit]) is None
    finally:
        again.close()


def test_a_refused_hold_stores_nothing(redis_store: RedisStore, redis_url: str) -> None:
    redis_store.record_usage(spend("a", user="u", tokens=50))
    first = budget_hold("a", user="u", tokens=30)
    limits = [BudgetLimit("session", "a", max_tokens=1000), BudgetLimit("user", "u", 0.0001, 100)]
    assert redis_store.hold_budget(first, limits) is None
    before = snapshot(redis_url)
    assert set(before) >= {
        "chatchain:holds",
        "chatchain:holds:expiry",
        "chatchain:holds:session:a",
        "chatchain:holds:user:u",
    }
    refused = budget_hold("a", user="u", tokens=30)  # 50 + 30 + 30 > 100
    refusal = redis_store.hold_budget(refused, limits)
    assert refusal is not None and refusal.limit == limits[1]
    assert (refusal.spent_tokens, refusal.held_tokens) == (50, 30)
    assert refusal.spent_usd == pytest.approx(50e-6) and refusal.held_usd == pytest.approx(30e-6)
    assert snapshot(redis_url) == before
    with raw(redis_url) as client:
        assert client.hkeys("chatchain:holds") == [first.id]
        assert client.smembers("chatchain:holds:user:u") == {first.id}


def test_ledger_keys_are_percent_encoded_and_holds_leave_none(
    redis_store: RedisStore, redis_url: str
) -> None:
    ids = ["a", "a*", "*", "a:b", "a%3Ab", "", "a b", "名前 🙂"]
    for sid in ids:
        h = budget_hold(sid, user=sid)
        assert redis_store.hold_budget(h, [BudgetLimit("session", sid, max_tokens=99)]) is None
        with raw(redis_url) as client:
            assert client.exists(f"chatchain:holds:user:{quote(sid, safe='')}") == 1
        redis_store.record_usage(spend(sid, user=sid), release=h.id)
    ledger = re.compile(r"chatchain:usage:(at|total|days):(all|session|user):[\w%.~-]*", re.ASCII)
    with raw(redis_url) as client:
        keys = set(client.scan_iter())
        assert {k for k in keys if not ledger.fullmatch(k)} == {
            "chatchain:usage:entries",
            "chatchain:usage:seq",
        }  # no hold key is left once every hold is released
        assert len(keys) == 2 + 3 + 6 * len(ids)  # "all", and session and user per id
    for sid in ids:
        assert [e.user_id for e in redis_store.usage_entries(session_id=sid)] == [sid]
        assert redis_store.usage_total("user", sid).turns == 1


def test_entries_of_one_microsecond_keep_their_order(redis_store: RedisStore) -> None:
    same = [spend("a", tokens=t) for t in (5, 3, 9, 1)]
    for e in same:
        redis_store.record_usage(e)
    assert redis_store.usage_entries() == same
    assert redis_store.usage_entries(since=T0, until=T0 + timedelta(microseconds=1)) == same
    assert redis_store.usage_entries(until=T0) == []


def test_totals_add_up_as_python_adds_floats(redis_store: RedisStore) -> None:
    rng = random.Random(7)
    for i in range(300):
        cost = rng.random() * 1e-4
        latency = rng.random() * 3
        redis_store.record_usage(
            spend("a", cost_usd=cost, latency_s=latency, at=T0 + timedelta(seconds=i))
        )
    total = redis_store.usage_total("session", "a")
    assert total == replace(total_of(redis_store.usage_entries()), model=None)  # bit for bit
    assert isinstance(total.cost_usd, float) and isinstance(total.latency_s, float)


def test_ledger_out_of_memory_is_a_store_error_and_writes_nothing(
    redis_store: RedisStore, redis_url: str
) -> None:
    redis_store.record_usage(spend("a"))
    h = budget_hold("a", tokens=10)
    assert redis_store.hold_budget(h, []) is None
    before = snapshot(redis_url)
    with raw(redis_url) as client:
        client.config_set("maxmemory", "1")
        try:
            with pytest.raises(StoreError, match="maxmemory"):
                redis_store.record_usage(spend("a", tokens=20), release=h.id)
            with pytest.raises(StoreError, match="maxmemory"):
                redis_store.hold_budget(budget_hold("b"), [])
            with pytest.raises(StoreError, match="maxmemory"):
                asyncio.run(redis_store.arecord_usage(spend("a", tokens=20), release=h.id))
        finally:
            client.config_set("maxmemory", "0")
    assert snapshot(redis_url) == before  # the hold was not dropped without its entry
    redis_store.record_usage(spend("a", tokens=20), release=h.id)
    assert redis_store.usage_total("session", "a").total_tokens == 30


def test_ledger_without_a_server_is_a_store_error() -> None:
    store = RedisStore(f"redis://127.0.0.1:{port_for.select_random()}/0")
    limit = [BudgetLimit("all", "", max_tokens=1)]
    calls: list[Callable[[], object]] = [
        lambda: store.record_usage(spend("a")),
        lambda: store.usage_total("all", ""),
        lambda: store.usage_entries(),
        lambda: store.hold_budget(budget_hold("a"), limit),
        lambda: store.release_budget("h"),
        lambda: asyncio.run(store.arecord_usage(spend("a"))),
        lambda: asyncio.run(store.ahold_budget(budget_hold("a"), limit)),
        lambda: asyncio.run(store.arelease_budget("h")),
    ]
    for call in calls:
        with pytest.raises(StoreError, match="Could not reach"):
            call()
    store.close()


def test_scripts_are_sent_again_to_a_server_that_lost_them(
    redis_store: RedisStore, redis_url: str
) -> None:
    limit = [BudgetLimit("session", "a", max_tokens=100)]

    async def twins(h: BudgetHold) -> None:
        assert await redis_store.ahold_budget(h, limit) is None
        await redis_store.arecord_usage(spend("a", tokens=10), release=h.id)
        await redis_store.arelease_budget(h.id)

    for spent in (0, 20):
        with raw(redis_url) as client:
            client.script_flush()  # as after a restart without persistence of scripts
        h = budget_hold("a", tokens=90 - spent)
        assert redis_store.hold_budget(h, limit) is None
        redis_store.record_usage(spend("a", tokens=10), release=h.id)
        redis_store.release_budget(h.id)
        with raw(redis_url) as client:
            client.script_flush()
        asyncio.run(twins(budget_hold("a", tokens=80 - spent)))
    assert redis_store.usage_total("session", "a").total_tokens == 40


def test_holds_of_separate_stores_cannot_overspend(redis_url: str) -> None:
    stores = [RedisStore(redis_url) for _ in range(4)]  # separate pools, as if processes
    limit = [BudgetLimit("user", "u", max_tokens=100)]
    kept: list[BudgetHold] = []
    barrier = threading.Barrier(len(stores))

    def worker(store: RedisStore, i: int) -> None:
        barrier.wait()
        for j in range(10):
            h = budget_hold(f"s{i}-{j}", user="u", tokens=10)
            if store.hold_budget(h, limit) is None:
                kept.append(h)

    threads = [threading.Thread(target=worker, args=(s, i)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(kept) == 10
        for h in kept:
            stores[0].release_budget(h.id)
        with raw(redis_url) as client:
            assert client.exists("chatchain:holds", "chatchain:holds:user:u") == 0
    finally:
        for s in stores:
            s.close()
