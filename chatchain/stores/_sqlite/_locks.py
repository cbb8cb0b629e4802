"""The SQLite store's one writer per session, across processes: leases.

One writer per session across processes is a lease: a row of the ``locks`` table naming its
holder and when it expires. A live holder renews it in the background, so a long turn keeps
it; a crashed one stops renewing, so its session frees itself within `SQLiteStore.lease`
seconds. SQLite has no row locks, and holding a write transaction for a turn would stall
every other session, hence the table.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial

from chatchain._locks import apoll, busy_error, poll
from chatchain.errors import StoreError
from chatchain.stores._base import Fence
from chatchain.stores._sqlite._connection import _Connections

__all__ = ["_Locks"]


logger = logging.getLogger("chatchain")


class _Locks(_Connections):
    """One writer per session across processes (`LockBackend`)."""

    @contextmanager
    def lock(self, session_id: str) -> Iterator[Fence]:
        deadline = time.monotonic() + self._lock_timeout
        with self._locks.locked(session_id):  # threads of this process queue here, not in SQL
            owner = self._new_owner()
            if not poll(partial(self._take_lease, session_id, owner), deadline):
                raise busy_error(session_id, self._lock_timeout, anywhere=True)
            try:
                yield Fence(session_id, owner)
            finally:
                self._drop_lease(session_id, owner)

    @asynccontextmanager
    async def alock(self, session_id: str) -> AsyncIterator[Fence]:
        deadline = time.monotonic() + self._lock_timeout
        async with self._locks.alocked(session_id):
            owner = self._new_owner()
            if not await apoll(partial(self._atake_lease, session_id, owner), deadline):
                raise busy_error(session_id, self._lock_timeout, anywhere=True)
            try:
                yield Fence(session_id, owner)
            finally:
                # Runs to the end in its thread even if this task is being cancelled.
                await asyncio.to_thread(self._drop_lease, session_id, owner)

    async def _atake_lease(self, session_id: str, owner: str) -> bool:
        outcome: concurrent.futures.Future[bool] = concurrent.futures.Future()

        def attempt() -> bool:
            taken = False
            try:
                taken = self._take_lease(session_id, owner)
                return taken
            finally:
                outcome.set_result(taken)

        try:
            return await asyncio.to_thread(attempt)
        except asyncio.CancelledError:
            # The attempt goes on in its thread, and may take the lease after all: give it
            # back then, or no one would release it (and our renewer would keep it alive).
            def give_back(done: concurrent.futures.Future[bool]) -> None:
                if done.result():
                    threading.Thread(target=self._drop_lease, args=(session_id, owner)).start()

            outcome.add_done_callback(give_back)
            raise

    @staticmethod
    def _new_owner() -> str:
        # Names the holder for whoever inspects the locks table; the uuid makes it unique.
        return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"

    def _take_lease(self, session_id: str, owner: str) -> bool:
        """Take the session's lease if it is free or expired; True if we now hold it."""
        with self._write("lock a session") as conn:
            now = time.time()  # once we may write: a wait for the write lock must not age it
            taken = conn.execute(
                """
                INSERT INTO locks (session_id, owner, expires_at) VALUES (?, ?, ?)
                ON CONFLICT (session_id) DO UPDATE SET
                    owner = excluded.owner, expires_at = excluded.expires_at
                WHERE locks.expires_at < ?
                """,
                (session_id, owner, now + self.lease, now),
            ).rowcount
        if taken != 1:
            return False
        with self._guard:
            self._leased.add((session_id, owner))
            if self._renewer is None and not self._closed:
                self._renewer = threading.Thread(
                    target=self._renew_leases, name="chatchain-sqlite-leases", daemon=True
                )
                self._renewer.start()
        return True

    def _drop_lease(self, session_id: str, owner: str) -> None:
        with self._guard:
            self._leased.discard((session_id, owner))
        try:
            with self._write("unlock a session") as conn:
                conn.execute(
                    "DELETE FROM locks WHERE session_id = ? AND owner = ?", (session_id, owner)
                )
        except StoreError as exc:
            # The turn itself is done; the lease expires on its own, so don't fail it.
            logger.warning("Could not release session %r (it frees itself): %s", session_id, exc)

    def _renew_leases(self) -> None:
        """Push back the expiry of the leases this store holds until none is left."""
        while not self._stop.wait(self.lease / 3):
            with self._guard:
                if not self._leased:
                    self._renewer = None  # the next lease taken starts a new renewer
                    return
            try:
                with self._write("renew session locks") as conn:
                    # Read what we hold only under the write lock: a turn that gives its lease
                    # back in between has then left both, and is not taken for one that expired.
                    with self._guard:
                        leased = sorted(self._leased)
                    renewed = conn.executemany(
                        "UPDATE locks SET expires_at = ? WHERE session_id = ? AND owner = ?",
                        [(time.time() + self.lease, sid, owner) for sid, owner in leased],
                    ).rowcount
                if renewed < len(leased):  # this process stalled for longer than a lease
                    logger.warning(
                        "A session lock expired while its turn was still running (the process "
                        "was paused for more than %g s); if another turn took its session "
                        "meanwhile, its messages are refused (SessionLockLostError).",
                        self.lease,
                    )
            except StoreError as exc:  # try again next round, well before the leases expire
                if not self._stop.is_set():
                    logger.warning("Could not renew session locks: %s", exc)
