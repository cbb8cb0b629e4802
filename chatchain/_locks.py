"""One writer per session inside a process: a lock per session id for threads and tasks.

A turn holds its session's lock from loading the history to saving the reply, so that
concurrent turns on one session run one after the other and each sees the one before. Locks
exist only while a turn holds or waits for them, so a million sessions cost nothing at rest.

Threads block on a `threading.Lock`; asyncio tasks poll it without blocking the event loop,
which lets threads and tasks (and several event loops) share one session safely.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

from chatchain.errors import SessionBusyError

__all__ = ["SessionLocks", "apoll", "busy_error", "poll"]

# Poll quickly at first (an uncontended turn ends in milliseconds), then back off: a fixed
# 50 ms poll made processes sharing a session wait ten turns for each one.
_FIRST_POLL_S = 0.001
_MAX_POLL_S = 0.05  # between processes; in this process a lock comes free sooner
_MAX_LOCAL_POLL_S = 0.02


def poll(attempt: Callable[[], bool], deadline: float, *, most: float = _MAX_POLL_S) -> bool:
    """Call ``attempt`` until it succeeds or the ``time.monotonic()`` ``deadline`` passes,
    waiting 1 ms after the first try and twice as long after each next one, up to ``most``
    seconds. True if it succeeded.

    Example:
        >>> tries = iter([False, False, True])
        >>> poll(lambda: next(tries), time.monotonic() + 1.0)
        True
    """
    pause = _FIRST_POLL_S
    while not attempt():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, most)
    return True


async def apoll(
    attempt: Callable[[], Awaitable[bool]], deadline: float, *, most: float = _MAX_POLL_S
) -> bool:
    """`poll` for asyncio tasks: waits without blocking the event loop."""
    pause = _FIRST_POLL_S
    while not await attempt():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, most)
    return True


def busy_error(session_id: str, timeout: float, *, anywhere: bool = False) -> SessionBusyError:
    """The error for a turn that waited ``timeout`` seconds for its session in vain.

    Args:
        session_id: The session.
        timeout: How long the turn waited.
        anywhere: The holder may be another process (shared stores), not only this one.
    """
    where = " (in this or another process)" if anywhere else ""
    return SessionBusyError(
        f"Session {session_id!r} is busy: another turn{where} has held it for more than "
        f"{timeout:g} s. Wait for that turn to finish, or raise CHATCHAIN_LOCK_TIMEOUT."
    )


@dataclass
class _Entry:
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0  # turns holding or waiting; the entry is dropped at zero
    owner: object = None  # the thread or task that holds it


class SessionLocks:
    """A registry of per-session locks.

    Example:
        >>> locks = SessionLocks(timeout=5.0)
        >>> with locks.locked("session-1"):
        ...     pass  # load, call the model, save
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._guard = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def _join(self, session_id: str, me: object) -> _Entry:
        with self._guard:
            entry = self._entries.get(session_id)
            if entry is None:
                entry = self._entries[session_id] = _Entry()
            elif entry.owner is me:
                raise SessionBusyError(
                    f"Session {session_id!r} already has a turn open in this same thread or task "
                    "(probably a stream that was started and not finished). Finish the stream, "
                    "or close() it, before starting another turn on this session."
                )
            entry.users += 1
            return entry

    def _leave(self, session_id: str, entry: _Entry) -> None:
        with self._guard:
            entry.users -= 1
            if entry.users == 0:
                del self._entries[session_id]

    @contextmanager
    def locked(self, session_id: str) -> Iterator[None]:
        """Take the session's lock in this thread, waiting up to the timeout.

        Raises:
            SessionBusyError: The lock did not come free in time, or this thread holds it.
        """
        me = threading.current_thread()
        entry = self._join(session_id, me)
        try:
            if not entry.lock.acquire(timeout=self.timeout):
                raise busy_error(session_id, self.timeout)
            entry.owner = me
            try:
                yield
            finally:
                entry.owner = None
                entry.lock.release()
        finally:
            self._leave(session_id, entry)

    @asynccontextmanager
    async def alocked(self, session_id: str) -> AsyncIterator[None]:
        """Take the session's lock in this task without blocking the event loop.

        Raises:
            SessionBusyError: The lock did not come free in time, or this task holds it.
        """
        me = asyncio.current_task()
        entry = self._join(session_id, me)
        try:

            async def attempt() -> bool:
                return entry.lock.acquire(blocking=False)

            deadline = time.monotonic() + self.timeout
            if not await apoll(attempt, deadline, most=_MAX_LOCAL_POLL_S):
                raise busy_error(session_id, self.timeout)
            entry.owner = me
            try:
                yield
            finally:
                entry.owner = None
                entry.lock.release()
        finally:
            self._leave(session_id, entry)

    def __len__(self) -> int:
        """How many sessions have a turn running or waiting."""
        with self._guard:
            return len(self._entries)
