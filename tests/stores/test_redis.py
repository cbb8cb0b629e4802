"""What only the Redis store has to get right: its keys, its leases, a server that fails."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import port_for
import pytest
import redis
from langchain_core.messages import AIMessage, HumanMessage

from chatchain.errors import ConfigurationError, SessionBusyError, StoreError
from chatchain.stores import Summary, open_store
from chatchain.stores._redis import RedisStore
from tests.stores.fixtures_redis import redis_server, url_of
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
        assert len(keys) == 2 * len(ids) + 2  # msgs and meta per session, two sorted sets
        session_keys = keys - {"chatchain:created", "chatchain:updated"}
        # No glob metacharacter nor extra ':' can reach a key: the id is percent-encoded.
        assert all(
            re.fullmatch(r"chatchain:(msgs|meta):[\w%.~-]*", k, re.ASCII) for k in session_keys
        )
        redis_store.delete("a*")
        assert len(set(client.scan_iter())) == len(keys) - 2
    for sid in ids:
        assert contents(redis_store, sid) == ([] if sid == "a*" else [sid])
    assert sorted(redis_store.sessions()) == sorted(set(ids) - {"a*"})


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


HOLD_AND_DIE = """
import os, sys
from chatchain.stores._redis import RedisStore
store = RedisStore(sys.argv[1], lease=1.5)
held = store.lock("s")  # kept referenced: a collected context manager would release
held.__enter__()
print("held", flush=True)
os._exit(0)  # dies holding the lock, never releasing it
"""


def test_lease_frees_a_session_whose_holder_died(redis_url: str) -> None:
    output, _ = run_python(HOLD_AND_DIE, redis_url).communicate(timeout=30)
    assert output == "held\n"
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


def test_server_killed_mid_turn_then_restarted(tmp_path: Path) -> None:
    with redis_server(tmp_path, appendonly=True) as server:
        url = url_of(server)
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
