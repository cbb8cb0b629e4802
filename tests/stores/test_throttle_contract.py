"""The throttle half of the store contract (`ThrottleBackend`), run against every store that
counts limits for many processes: SQLite, Redis and PostgreSQL. The service's use of it is in
tests/server/test_shared_limits.py."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from datetime import UTC, datetime

import pytest

from chatchain.stores import HistoryStore, MemoryStore, ThrottleBackend, open_store
from chatchain.users import User, Users

THROTTLE_BACKENDS = ["sqlite", "redis", "postgres"]


@pytest.fixture(params=THROTTLE_BACKENDS)
def store(request: pytest.FixtureRequest) -> HistoryStore:
    """A fresh, empty store of each backend that counts limits."""
    return request.getfixturevalue(f"{request.param}_store")  # type: ignore[no-any-return]


@pytest.fixture
def backend(store: HistoryStore) -> ThrottleBackend:
    assert isinstance(store, ThrottleBackend)
    return store


def test_the_memory_store_counts_nothing_for_other_processes() -> None:
    # One process by definition: the service counts in its own memory over it.
    assert not isinstance(MemoryStore(), ThrottleBackend)


def test_requests_are_counted_up_to_the_limit_per_user(backend: ThrottleBackend) -> None:
    assert [backend.count_request("ann", 3, 60) for _ in range(3)] == [None, None, None]
    start = time.time()
    wait = backend.count_request("ann", 3, 60)
    assert wait is not None and 59 <= wait <= 60  # the first request leaves in ~60 s
    assert backend.count_request("ann", 3, 60) is not None  # a refusal is not counted...
    assert backend.count_request("bob", 3, 60) is None  # ...and other users are apart
    assert backend.count_request("ann", 4, 60) is None  # a higher limit lets one more in
    assert time.time() - start < 5


def test_requests_leave_the_window(backend: ThrottleBackend) -> None:
    assert backend.count_request("ann", 2, 0.5) is None
    time.sleep(0.25)
    assert backend.count_request("ann", 2, 0.5) is None
    wait = backend.count_request("ann", 2, 0.5)
    assert wait is not None and 0.1 <= wait <= 0.3  # the first one leaves first
    time.sleep(wait + 0.05)
    assert backend.count_request("ann", 2, 0.5) is None
    assert backend.count_request("ann", 2, 0.5) is not None  # the second is still in


def test_threads_counting_at_once_let_exactly_the_limit_through(
    backend: ThrottleBackend,
) -> None:
    passed: list[bool] = []
    start = threading.Barrier(8)

    def client() -> None:
        start.wait()
        for _ in range(5):
            passed.append(backend.count_request("ann", 20, 60) is None)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert passed.count(True) == 20 and len(passed) == 40


def _counter(url: str, start: float, passed: multiprocessing.Queue[tuple[int, int]]) -> None:
    store = open_store(url)
    try:
        assert isinstance(store, ThrottleBackend)
        time.sleep(max(0.0, start - time.time()))  # every process starts at the same moment
        requests = sum(store.count_request("ann", 20, 60) is None for _ in range(10))
        streams = sum(store.take_stream("ann", f"{id(store)}-{i}", 3, 30) for i in range(3))
        passed.put((requests, streams))
    finally:
        store.close()


@pytest.mark.slow  # processes
@pytest.mark.parametrize("kind", THROTTLE_BACKENDS)
def test_processes_counting_at_once_let_exactly_the_limit_through(
    kind: str, request: pytest.FixtureRequest
) -> None:
    request.getfixturevalue(f"{kind}_store")  # a fresh, empty store, wiped afterwards
    url = request.getfixturevalue(f"{kind}_url")
    context = multiprocessing.get_context("spawn")
    passed: multiprocessing.Queue[tuple[int, int]] = context.Queue()
    start = time.time() + 3
    processes = [context.Process(target=_counter, args=(url, start, passed)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    counts = [passed.get(timeout=5) for _ in processes]
    assert sum(requests for requests, _ in counts) == 20  # of 40
    assert sum(streams for _, streams in counts) == 3  # of 12


def test_stream_slots_are_taken_up_to_the_limit_and_given_back(
    backend: ThrottleBackend,
) -> None:
    assert backend.take_stream("ann", "s1", 2, 30)
    assert backend.take_stream("ann", "s2", 2, 30)
    assert not backend.take_stream("ann", "s3", 2, 30)
    assert backend.take_stream("bob", "s4", 2, 30)  # per user
    backend.release_stream("ann", "s1")
    backend.release_stream("ann", "s1")  # twice does nothing
    assert backend.take_stream("ann", "s3", 2, 30)
    assert not backend.take_stream("ann", "s5", 2, 30)


def test_a_slot_not_renewed_comes_back_by_itself(backend: ThrottleBackend) -> None:
    assert backend.take_stream("ann", "kept", 2, 0.6)
    assert backend.take_stream("ann", "dead", 2, 0.6)  # its holder was killed: never renewed
    time.sleep(0.4)
    assert backend.renew_stream("ann", "kept", 0.6)
    assert not backend.take_stream("ann", "new", 2, 0.6)
    time.sleep(0.35)  # "dead" expired, "kept" was renewed
    assert not backend.renew_stream("ann", "dead", 0.6)  # an expired slot is not taken again
    assert backend.take_stream("ann", "new", 2, 0.6)
    assert not backend.take_stream("ann", "more", 2, 0.6)  # "kept" is still held


def test_the_async_twins_count_in_the_same_place(backend: ThrottleBackend) -> None:
    async def main() -> None:
        assert await backend.acount_request("ann", 1, 60) is None
        assert await backend.acount_request("ann", 1, 60) is not None
        assert await backend.atake_stream("ann", "s1", 1, 30)
        assert not await backend.atake_stream("ann", "s2", 1, 30)
        assert await backend.arenew_stream("ann", "s1", 30)
        await backend.arelease_stream("ann", "s1")
        assert await backend.atake_stream("ann", "s2", 1, 30)

    asyncio.run(main())
    assert backend.count_request("ann", 1, 60) is not None  # seen by the sync side too


def test_a_users_own_limits_are_kept_with_them(store: HistoryStore) -> None:
    users = Users(store)
    users.add("ann", requests_per_minute=5, streams=0)
    users.add("bob")
    ann = users.get("ann")
    assert ann is not None and (ann.requests_per_minute, ann.streams) == (5, 0)
    assert users.get("bob") == User("bob", users.get("bob").created_at)  # type: ignore[union-attr]
    changed = users.set_caps("ann", requests_per_minute=None, streams=2)
    assert (changed.requests_per_minute, changed.streams) == (None, 2)
    assert users.list()[0] == changed
    assert Users(store).authenticate(users.rotate("ann")) == changed


def test_a_limit_must_be_a_whole_number() -> None:
    users = Users(MemoryStore())
    for wrong in (-1, 1.5, True, "5"):
        with pytest.raises(Exception, match="whole number"):
            users.add("ann", requests_per_minute=wrong)  # type: ignore[arg-type]
    assert users.list() == []
    users.add("ann", streams=3)
    assert users.get("ann").streams == 3  # type: ignore[union-attr]
    assert users.get("ann").created_at <= datetime.now(UTC)  # type: ignore[union-attr]
