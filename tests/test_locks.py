import asyncio
import threading

import pytest

from chatchain import SessionBusyError
from chatchain._locks import SessionLocks


def test_entries_exist_only_while_a_turn_holds_or_waits() -> None:
    locks = SessionLocks(timeout=1.0)
    with locks.locked("a"):
        assert len(locks) == 1
    assert len(locks) == 0
    for i in range(1000):
        with locks.locked(f"session-{i}"):
            pass
    assert len(locks) == 0


def test_a_thread_waits_for_the_holder() -> None:
    locks = SessionLocks(timeout=2.0)
    order: list[str] = []
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with locks.locked("s"):
            order.append("holder in")
            held.set()
            release.wait(1.0)
            order.append("holder out")

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(5.0)
    release.set()
    with locks.locked("s"):
        order.append("waiter in")
    thread.join()
    assert order == ["holder in", "holder out", "waiter in"]


def test_timeout_raises_session_busy() -> None:
    locks = SessionLocks(timeout=0.05)
    ready, done = threading.Event(), threading.Event()

    def holder() -> None:
        with locks.locked("s"):
            ready.set()
            done.wait(1.0)

    thread = threading.Thread(target=holder)
    thread.start()
    ready.wait(1.0)
    with pytest.raises(SessionBusyError, match="busy"), locks.locked("s"):
        pass

    async def waiter() -> None:
        async with locks.alocked("s"):
            pass

    with pytest.raises(SessionBusyError, match="busy"):
        asyncio.run(waiter())
    done.set()
    thread.join()
    assert len(locks) == 0


async def test_a_cancelled_waiter_leaves_no_trace() -> None:
    locks = SessionLocks(timeout=5.0)
    async with locks.alocked("s"):
        waiter = asyncio.create_task(locks.alocked("s").__aenter__())
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert len(locks) == 0
    async with locks.alocked("s"):
        pass
