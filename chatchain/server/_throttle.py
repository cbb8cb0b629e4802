"""The service's per-user throttle: requests per minute and streams open at once.

Over a store that counts them (`chatchain.stores.ThrottleBackend`: SQLite, Redis,
PostgreSQL), both limits hold across every worker and machine that shares the store:

- requests: a moving window of 60 s, checked and counted in one atomic step in the store;
- streams: each open stream holds a lease in the store that this process renews every third
  of `STREAM_LEASE_S` while the stream runs and gives back when it ends (finished, failed or
  left by its client). The slots of a process killed mid-stream come back by themselves
  within `STREAM_LEASE_S`.

Over the memory store (one process by definition), or a store without the capability, both
are counted in this process (the ``limits`` library's moving window, a counter for streams).
If the store fails while counting, the check falls back to this process's count for that
request with a logged warning (fail open to one worker's limit, never to none): the turn
itself needs the store and answers 503 on its own if the store is really down.

A user's own limits (`chatchain.users.User.requests_per_minute` and ``streams``, set by
``chatchain users add/caps``) replace the deployment's for that user; 0 is no limit.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass

import anyio
from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from chatchain.errors import StoreError
from chatchain.server._errors import HTTPProblem
from chatchain.stores import ThrottleBackend
from chatchain.users import User

__all__ = ["STREAM_LEASE_S", "Limit", "StreamSlot", "UserThrottle"]

_log = logging.getLogger("chatchain.server")

STREAM_LEASE_S = 15.0
"""How long a stream's slot outlives a process that died holding it, in seconds (renewed
every third of that while the stream runs)."""

WINDOW_S = 60.0
"""The window that requests per minute are counted over."""

# How long a client refused for too many open streams should wait: streams end on their own.
_STREAM_RETRY_S = 1


@dataclass(frozen=True)
class Limit:
    """One limit as it applies to a user.

    Attributes:
        amount: Requests per minute or streams at once; 0 for no limit.
        source: Where it comes from: the setting, or the user's own limit.
    """

    amount: int
    source: str


class StreamSlot:
    """One of a user's stream slots, held until `close`; renewed in the store meanwhile."""

    def __init__(self, throttle: UserThrottle, user: str, slot: str, shared: bool) -> None:
        self._throttle = throttle
        self.user = user
        self.slot = slot
        self.shared = shared  # held in the store (else in this process)
        self._renewer: asyncio.Task[None] | None = None
        self._closed = False

    def _start_renewing(self, lease: float) -> None:
        self._renewer = asyncio.get_running_loop().create_task(self._renew(lease))

    async def _renew(self, lease: float) -> None:
        backend = self._throttle.shared
        assert backend is not None
        while True:
            await asyncio.sleep(lease / 3)
            try:
                if not await backend.arenew_stream(self.user, self.slot, lease):
                    _log.warning(
                        "The stream slot of user %s expired before it was renewed (the store "
                        "was slow or out of reach for %.0f s); the stream goes on.",
                        self.user,
                        lease,
                    )
                    return
            except StoreError as exc:
                _log.warning("Could not renew a stream slot of user %s: %s", self.user, exc)

    async def close(self) -> None:
        """Give the slot back (once; later calls do nothing)."""
        if self._closed:
            return
        self._closed = True
        if self._renewer is not None:
            self._renewer.cancel()
        if not self.shared:
            self._throttle._local_close(self.user)
            return
        backend = self._throttle.shared
        assert backend is not None
        with anyio.CancelScope(shield=True):  # a client leaving must not keep the slot
            try:
                await backend.arelease_stream(self.user, self.slot)
            except StoreError as exc:
                _log.warning(
                    "Could not give back a stream slot of user %s (%s); it comes back by "
                    "itself within %.0f s.",
                    self.user,
                    exc,
                    self._throttle.lease,
                )


class UserThrottle:
    """Each user's requests per minute and streams open at once.

    Args:
        requests_per_minute: Requests a user may make in any 60 s; 0 for no limit.
        streams: Streams a user may have open at once; 0 for no limit.
        store: The service's store: when it is a `ThrottleBackend` the counts are kept there,
            for every process sharing it; otherwise in this process.
        lease: How long a stream's slot outlives a process that died holding it (seconds).

    Example:
        >>> import asyncio
        >>> from datetime import UTC, datetime
        >>> throttle = UserThrottle(requests_per_minute=1, streams=0)
        >>> ann = User("ann", datetime.now(UTC))
        >>> asyncio.run(throttle.arequest(ann))
        >>> asyncio.run(throttle.arequest(ann))
        Traceback (most recent call last):
        ...
        chatchain.server._errors.HTTPProblem: Too many requests: the limit is 1 per minute ...
    """

    def __init__(
        self,
        *,
        requests_per_minute: int,
        streams: int,
        store: object = None,
        lease: float = STREAM_LEASE_S,
    ) -> None:
        self.requests_per_minute = requests_per_minute
        self.streams = streams
        self.shared: ThrottleBackend | None = store if isinstance(store, ThrottleBackend) else None
        self.lease = lease
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._open: dict[str, int] = {}
        self._guard = threading.Lock()

    def request_limit(self, user: User) -> Limit:
        """The requests per minute that apply to ``user``: their own, or the deployment's."""
        if user.requests_per_minute is not None:
            own = f"user {user.name}'s own limit, set by chatchain users caps"
            return Limit(user.requests_per_minute, own)
        return Limit(self.requests_per_minute, "CHATCHAIN_SERVER_REQUESTS_PER_MINUTE")

    def stream_limit(self, user: User) -> Limit:
        """The streams at once that apply to ``user``: their own, or the deployment's."""
        if user.streams is not None:
            return Limit(user.streams, f"user {user.name}'s own limit, set by chatchain users caps")
        return Limit(self.streams, "CHATCHAIN_SERVER_STREAMS_PER_USER")

    async def arequest(self, user: User) -> None:
        """Count one request of ``user``.

        Raises:
            HTTPProblem: 429 with ``Retry-After`` when the user is over their limit.
        """
        limit = self.request_limit(user)
        if not limit.amount:
            return
        wait = await self._count(user.name, limit.amount)
        if wait is None:
            return
        seconds = max(1, math.ceil(wait))
        raise HTTPProblem(
            429,
            f"Too many requests: the limit is {limit.amount} per minute ({limit.source}). "
            f"Try again in {seconds} s.",
            headers={"Retry-After": str(seconds)},
        )

    async def _count(self, name: str, amount: int) -> float | None:
        if self.shared is not None:
            try:
                return await self.shared.acount_request(name, amount, WINDOW_S)
            except StoreError as exc:
                _log.warning(
                    "Could not count a request of user %s in the store (%s): counted in this "
                    "process only.",
                    name,
                    exc,
                )
        rate = RateLimitItemPerMinute(amount)
        if self._limiter.hit(rate, name):
            return None
        return self._limiter.get_window_stats(rate, name).reset_time - time.time()

    async def aopen_stream(self, user: User) -> StreamSlot:
        """Take one of ``user``'s stream slots; give it back with `StreamSlot.close`.

        Raises:
            HTTPProblem: 429 with ``Retry-After`` when all the user's slots are taken.
        """
        limit = self.stream_limit(user)
        if self.shared is not None and limit.amount:
            slot = StreamSlot(self, user.name, uuid.uuid4().hex, shared=True)
            try:
                taken = await self.shared.atake_stream(
                    user.name, slot.slot, limit.amount, self.lease
                )
            except StoreError as exc:
                _log.warning(
                    "Could not take a stream slot of user %s in the store (%s): counted in "
                    "this process only.",
                    user.name,
                    exc,
                )
            else:
                if not taken:
                    raise _too_many_streams(limit)
                slot._start_renewing(self.lease)
                return slot
        with self._guard:
            held = self._open.get(user.name, 0)
            if limit.amount and held >= limit.amount:
                raise _too_many_streams(limit)
            self._open[user.name] = held + 1
        return StreamSlot(self, user.name, "", shared=False)

    def _local_close(self, name: str) -> None:
        with self._guard:
            left = self._open.get(name, 1) - 1
            if left > 0:
                self._open[name] = left
            else:
                self._open.pop(name, None)


def _too_many_streams(limit: Limit) -> HTTPProblem:
    return HTTPProblem(
        429,
        f"Too many streams: {limit.amount} of yours are open, the limit is {limit.amount} "
        f"({limit.source}). "
        "Wait for one to end, or stop one.",
        headers={"Retry-After": str(_STREAM_RETRY_S)},
    )
