"""The Redis store's one writer per session, across processes: the key
``<prefix>:lock:<id>``, a `redis.lock.Lock` whose lease is renewed while its turn lasts, and
whose value is its holder's token (the turn's `Fence`)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    contextmanager,
)
from functools import partial
from typing import TYPE_CHECKING

from chatchain._locks import apoll, busy_error, poll
from chatchain.stores._base import Fence
from chatchain.stores._redis._connection import _Connections

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    import redis.asyncio.lock
    import redis.commands.core
    import redis.lock


__all__ = ["_Locks"]


logger = logging.getLogger("chatchain")


# Turns of one process queue on SessionLocks; only turns of other processes poll the key.


def _fence(session_id: str, token: str | bytes | None) -> Fence:
    """The fence of a `redis.lock.Lock` held: its token, which is the lock key's value."""
    assert token is not None  # set by a successful acquire
    return Fence(session_id, token.decode() if isinstance(token, bytes) else token)


class _Locks(_Connections):
    """One writer per session across processes (`LockBackend`)."""

    def lock(self, session_id: str) -> AbstractContextManager[Fence]:
        return self._locked(session_id)

    def alock(self, session_id: str) -> AbstractAsyncContextManager[Fence]:
        return self._alocked(session_id)

    def _lost(self, session_id: str) -> None:
        logger.warning(
            "The lock of session %r expired while its turn was running (the process stalled "
            "for more than the %g s lease?): if another turn took the session meanwhile, this "
            "turn's messages are refused (SessionLockLostError).",
            session_id,
            self.lease,
        )

    def _unreleased(self, session_id: str, exc: Exception) -> None:
        logger.warning(
            "Could not release the lock of session %r on %s (%s); it frees itself within %g s.",
            session_id,
            self._where,
            exc,
            self.lease,
        )

    @contextmanager
    def _locked(self, session_id: str) -> Iterator[Fence]:
        from redis.exceptions import LockNotOwnedError, RedisError

        started = time.monotonic()
        with self._locks.locked(session_id):
            lease = self._client.lock(
                self._key("lock", session_id),
                timeout=self.lease,
                thread_local=False,  # the renewing thread must see the token
            )
            with self._failures():
                acquired = poll(partial(lease.acquire, blocking=False), started + self.lock_timeout)
            if not acquired:
                raise busy_error(session_id, self.lock_timeout, anywhere=True)
            done = threading.Event()
            renewer = threading.Thread(
                target=self._renew,
                args=(lease, done, session_id),
                name=f"chatchain-lease-{session_id[:40]}",
                daemon=True,
            )
            renewer.start()
            try:
                yield _fence(session_id, lease.local.token)
            finally:
                done.set()
                renewer.join()
                try:
                    lease.release()
                except LockNotOwnedError:
                    self._lost(session_id)
                except RedisError as exc:
                    self._unreleased(session_id, exc)

    def _renew(self, lease: redis.lock.Lock, done: threading.Event, session_id: str) -> None:
        from redis.exceptions import LockNotOwnedError, RedisError

        while not done.wait(self.lease / 3):
            try:
                lease.reacquire()
            except LockNotOwnedError:
                self._lost(session_id)
                return
            except RedisError as exc:  # the next renewal may get through in time
                logger.warning("Could not renew the lock of session %r: %s", session_id, exc)

    @asynccontextmanager
    async def _alocked(self, session_id: str) -> AsyncIterator[Fence]:
        from redis.exceptions import LockNotOwnedError, RedisError

        started = time.monotonic()
        async with self._locks.alocked(session_id):
            with self._failures():
                client = await self._aclient()
                lease = client.lock(
                    self._key("lock", session_id),
                    timeout=self.lease,
                    thread_local=False,
                )
                acquired = await apoll(
                    partial(lease.acquire, blocking=False), started + self.lock_timeout
                )
            if not acquired:
                raise busy_error(session_id, self.lock_timeout, anywhere=True)
            renewer = asyncio.create_task(self._arenew(lease, session_id))
            try:
                yield _fence(session_id, lease.local.token)
            finally:
                renewer.cancel()
                await asyncio.wait([renewer])  # unlike awaiting it, keeps our own cancellation
                try:
                    await lease.release()
                except LockNotOwnedError:
                    self._lost(session_id)
                except RedisError as exc:
                    self._unreleased(session_id, exc)

    async def _arenew(self, lease: redis.asyncio.lock.Lock, session_id: str) -> None:
        from redis.exceptions import LockNotOwnedError, RedisError

        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await lease.reacquire()
            except LockNotOwnedError:
                self._lost(session_id)
                return
            except RedisError as exc:
                logger.warning("Could not renew the lock of session %r: %s", session_id, exc)
