"""The service's per-user throttle: requests per minute and streams open at once.

Both hold **per worker process**: each worker counts in its own memory (the ``limits``
library's moving window for requests, a counter for streams), so with ``--workers N`` a user
may reach up to N times each rate. They protect a worker from one user's flood; a throttle
across workers belongs in the reverse proxy in front (see the README), and money is capped
across workers anyway by the budget limits (`chatchain.budgets`), which the store enforces.
"""

from __future__ import annotations

import math
import threading
import time

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from chatchain.server._errors import HTTPProblem

__all__ = ["UserThrottle"]

# How long a client refused for too many open streams should wait: streams end on their own.
_STREAM_RETRY_S = 1


class UserThrottle:
    """The requests-per-minute and open-streams limits of each user, in this process.

    Args:
        requests_per_minute: Requests a user may make in any 60 s; 0 for no limit.
        streams: Streams a user may have open at once; 0 for no limit.

    Example:
        >>> throttle = UserThrottle(requests_per_minute=1, streams=0)
        >>> throttle.request("ann")
        >>> throttle.request("ann")
        Traceback (most recent call last):
        ...
        chatchain.server._errors.HTTPProblem: Too many requests: the limit is 1 per minute ...
    """

    def __init__(self, *, requests_per_minute: int, streams: int) -> None:
        self._rate = RateLimitItemPerMinute(requests_per_minute) if requests_per_minute else None
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._streams = streams
        self._open: dict[str, int] = {}
        self._guard = threading.Lock()

    def request(self, user: str) -> None:
        """Count one request of ``user``.

        Raises:
            HTTPProblem: 429 with ``Retry-After`` when the user is over the limit.
        """
        if self._rate is None or self._limiter.hit(self._rate, user):
            return
        reset_at = self._limiter.get_window_stats(self._rate, user).reset_time
        wait = max(1, math.ceil(reset_at - time.time()))
        raise HTTPProblem(
            429,
            f"Too many requests: the limit is {self._rate.amount} per minute "
            f"(CHATCHAIN_SERVER_REQUESTS_PER_MINUTE). Try again in {wait} s.",
            headers={"Retry-After": str(wait)},
        )

    def open_stream(self, user: str) -> None:
        """Take one of ``user``'s stream slots; give it back with `close_stream`.

        Raises:
            HTTPProblem: 429 with ``Retry-After`` when all the user's slots are taken.
        """
        with self._guard:
            held = self._open.get(user, 0)
            if self._streams and held >= self._streams:
                raise HTTPProblem(
                    429,
                    f"Too many streams: {held} of yours are open, the limit is {self._streams} "
                    "(CHATCHAIN_SERVER_STREAMS_PER_USER). Wait for one to end, or stop one.",
                    headers={"Retry-After": str(_STREAM_RETRY_S)},
                )
            self._open[user] = held + 1

    def close_stream(self, user: str) -> None:
        """Give back a slot that `open_stream` took."""
        with self._guard:
            left = self._open.get(user, 1) - 1
            if left > 0:
                self._open[user] = left
            else:
                self._open.pop(user, None)
