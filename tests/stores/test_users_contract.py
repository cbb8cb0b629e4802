"""The users half of the store contract (`UserBackend`), run against every store that keeps
users: memory, SQLite, Redis and PostgreSQL. The facade's own rules are in tests/test_users.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from chatchain import UserExistsError
from chatchain.stores import HistoryStore, UserBackend, open_store
from chatchain.users import User, Users, hash_token

USER_BACKENDS = ["memory", "sqlite", "redis", "postgres"]
T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


@pytest.fixture(params=USER_BACKENDS)
def store(request: pytest.FixtureRequest) -> HistoryStore:
    """A fresh, empty store of each backend that keeps users."""
    return request.getfixturevalue(f"{request.param}_store")  # type: ignore[no-any-return]


@pytest.fixture
def backend(store: HistoryStore) -> UserBackend:
    assert isinstance(store, UserBackend)
    return store


def test_users_round_trip_every_field(backend: UserBackend) -> None:
    alice = User("alice@example.com", T0, budget_usd=5.5, daily_usd=0.125, monthly_usd=None)
    bob = User("bob", T0 + timedelta(seconds=1), revoked=True)
    backend.add_user(alice, "a" * 64)
    backend.add_user(bob, "b" * 64)
    assert backend.get_user("alice@example.com") == alice
    assert backend.find_user("a" * 64) == (alice, "a" * 64)
    assert backend.find_user("b" * 64) == (bob, "b" * 64)  # revoked users are found too
    assert backend.find_user("c" * 64) is None
    assert backend.get_user("carol") is None
    assert backend.list_users() == [alice, bob]


def test_list_is_oldest_first_then_by_name(backend: UserBackend) -> None:
    for i, (name, offset) in enumerate([("c", 2), ("b", 0), ("a", 2)]):
        backend.add_user(User(name, T0 + timedelta(seconds=offset)), f"{i}" * 64)
    assert [u.name for u in backend.list_users()] == ["b", "a", "c"]


def test_adding_a_taken_name_changes_nothing(backend: UserBackend) -> None:
    first = User("alice", T0, daily_usd=1.0)
    backend.add_user(first, "a" * 64)
    with pytest.raises(UserExistsError, match="There is a user 'alice' already"):
        backend.add_user(User("alice", T0, daily_usd=9.0), "b" * 64)
    assert backend.get_user("alice") == first
    assert backend.find_user("b" * 64) is None
    assert backend.list_users() == [first]


def test_update_changes_fields_and_replaces_the_hash(backend: UserBackend) -> None:
    user = User("alice", T0, budget_usd=5.0, daily_usd=1.0)
    backend.add_user(user, "a" * 64)
    changed = backend.update_user(
        "alice", {"daily_usd": None, "monthly_usd": 2.0, "revoked": True}, token_hash="b" * 64
    )
    expected = replace(user, daily_usd=None, monthly_usd=2.0, revoked=True)
    assert changed == expected
    assert backend.find_user("a" * 64) is None  # the old token finds no one
    assert backend.find_user("b" * 64) == (expected, "b" * 64)
    assert backend.update_user("alice", {}) == expected
    assert backend.update_user("ghost", {"revoked": True}) is None
    assert backend.update_user("ghost", {}, token_hash="c" * 64) is None
    assert backend.find_user("c" * 64) is None


def test_update_refuses_fields_it_does_not_change(backend: UserBackend) -> None:
    backend.add_user(User("alice", T0), "a" * 64)
    with pytest.raises(ValueError, match="Cannot change"):
        backend.update_user("alice", {"name": "mallory"})


async def test_async_twins(backend: UserBackend) -> None:
    user = User("alice", T0)
    await backend.aadd_user(user, "a" * 64)
    assert await backend.aget_user("alice") == user
    assert await backend.afind_user("a" * 64) == (user, "a" * 64)
    assert await backend.alist_users() == [user]
    revoked = replace(user, revoked=True)
    assert await backend.aupdate_user("alice", {"revoked": True}) == revoked


def test_users_facade_over_each_store(store: HistoryStore) -> None:
    users = Users(store)
    token = users.add("alice", daily_usd=1.0)
    assert users.authenticate(token).name == "alice"  # type: ignore[union-attr]
    new = users.rotate("alice")
    assert users.authenticate(token) is None and users.authenticate(new) is not None
    assert asyncio.run(users.aauthenticate(new)) == users.authenticate(new)
    users.revoke("alice")
    assert users.authenticate(new) is None


def test_threads_adding_one_name_one_wins(backend: UserBackend) -> None:
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def add(i: int) -> None:
        barrier.wait()
        try:
            backend.add_user(User("racer", T0 + timedelta(seconds=i)), f"{i:02d}" * 32)
            outcomes.append(f"won {i}")
        except UserExistsError:
            outcomes.append("lost")

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (won,) = [o for o in outcomes if o.startswith("won")]
    assert outcomes.count("lost") == 7
    winner = int(won.split()[1])
    assert backend.find_user(f"{winner:02d}" * 32) is not None
    assert [backend.find_user(f"{i:02d}" * 32) for i in range(8) if i != winner] == [None] * 7


NAMES = 10


def _racer(url: str, worker: int, won: multiprocessing.Queue[tuple[str, str]]) -> None:
    store = open_store(url)
    try:
        users = Users(store)
        for i in range(NAMES):
            with contextlib.suppress(UserExistsError):
                won.put((f"racer-{i}", users.add(f"racer-{i}")))
    finally:
        store.close()


@pytest.mark.slow  # processes
@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
def test_processes_adding_one_name_one_wins(kind: str, request: pytest.FixtureRequest) -> None:
    request.getfixturevalue(f"{kind}_store")  # a fresh, empty store, wiped afterwards
    url = request.getfixturevalue(f"{kind}_url")
    context = multiprocessing.get_context("spawn")
    won: multiprocessing.Queue[tuple[str, str]] = context.Queue()
    processes = [context.Process(target=_racer, args=(url, w, won)) for w in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    winners = [won.get(timeout=5) for _ in range(NAMES)]
    assert won.empty()
    assert sorted(name for name, _ in winners) == sorted(f"racer-{i}" for i in range(NAMES))
    store = open_store(url)
    try:
        users = Users(store)
        for name, token in winners:  # the winner's token is the one stored
            assert users.authenticate(token).name == name  # type: ignore[union-attr]
        assert len(users.list()) == NAMES
    finally:
        store.close()


def test_only_the_hash_is_stored(store: HistoryStore, request: pytest.FixtureRequest) -> None:
    token = Users(store).add("alice")
    digest = hash_token(token)
    backend = request.node.callspec.params["store"]
    if backend == "redis":
        import redis

        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        read = {
            b"hash": client.hgetall,
            b"string": client.get,
            b"zset": lambda key: client.zrange(key, 0, -1),
        }
        dump = b"".join(
            key + repr(read[client.type(key)](key)).encode()  # type: ignore[operator]
            for key in client.keys("*")
        )
        assert token.encode() not in dump and digest.encode() in dump
    elif backend == "postgres":
        import psycopg

        with psycopg.connect(request.getfixturevalue("postgres_url")) as conn:
            rows = conn.execute("SELECT * FROM chatchain_users").fetchall()
        assert token not in repr(rows) and digest in repr(rows)
    else:
        assert token not in repr(vars(store))
