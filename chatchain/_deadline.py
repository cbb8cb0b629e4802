"""A whole-turn deadline (``CHATCHAIN_TURN_DEADLINE``) over blocking and async model calls.

``CHATCHAIN_TIMEOUT`` bounds each read only: an endpoint that sends an SSE comment every
second, or its body a byte a second, never trips it. The deadline bounds the turn as a whole.

Async calls are bounded by `asyncio.timeout_at`, which cancels them. A blocking call cannot be
cancelled from outside, so it runs in a worker thread of its own that the turn waits for until
the deadline, then abandons: the turn ends, its lock is released, and the worker ends by itself
when the endpoint stops or its next read fails. Whatever it does after that is fenced by the
turn (see `Turn.sending`): it takes no budget hold, sends no new request and writes nothing.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

__all__ = ["abounded", "call", "iterate"]

T = TypeVar("T")

_END = object()


class _Outcome:
    """What a worker produced: a value, or the exception it raised."""

    __slots__ = ("error", "value")

    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None


def _remaining(at: float) -> float:
    return max(0.0, at - time.monotonic())


def call(fn: Callable[[], T], at: float | None, expired: Callable[[], Exception]) -> T:
    """``fn()``, run in a worker thread and given up on at ``at`` (`time.monotonic`).

    Raises:
        Exception: What ``fn`` raised, or ``expired()`` once ``at`` has passed.
    """
    if at is None:
        return fn()
    outcome = _Outcome()
    done = threading.Event()
    context = contextvars.copy_context()  # LangChain's callbacks and tracing live in context

    def work() -> None:
        try:
            outcome.value = context.run(fn)
        except BaseException as exc:  # handed to the waiting thread
            outcome.error = exc
        finally:
            done.set()

    threading.Thread(target=work, name="chatchain-turn", daemon=True).start()
    if not done.wait(_remaining(at)):
        raise expired()
    if outcome.error is not None:
        raise outcome.error
    return outcome.value  # type: ignore[no-any-return]


def iterate(
    items: Generator[T, None, None], at: float | None, expired: Callable[[], Exception]
) -> Generator[T, None, None]:
    """``items``, pulled by a worker thread and given up on at ``at`` (`time.monotonic`).

    The worker pulls one item each time the caller asks for one, never ahead: stopping early
    closes ``items`` (and the model's stream) at once, as a plain loop would. When the deadline
    ends a pull, the worker is left to finish it, then closes ``items`` by itself.

    Raises:
        Exception: What ``items`` raised, or ``expired()`` once ``at`` has passed.
    """
    if at is None:
        yield from items
        return
    wanted = threading.Semaphore(0)
    passed: queue.SimpleQueue[tuple[object, Any]] = queue.SimpleQueue()
    stop = threading.Event()
    closed = _Outcome()
    finished = threading.Event()

    def produce() -> None:
        try:
            while wanted.acquire() and not stop.is_set():
                try:
                    item = next(items)
                except StopIteration:
                    passed.put((_END, None))
                    return
                except BaseException as exc:  # handed to the consuming thread
                    passed.put((exc, None))
                    return
                passed.put((None, item))
        finally:
            try:
                items.close()
            except BaseException as exc:  # raised by the consumer, if it waits for the close
                closed.error = exc
            finished.set()

    context = contextvars.copy_context()  # LangChain's callbacks and tracing live in context
    worker = threading.Thread(target=context.run, args=(produce,), name="chatchain-stream")
    worker.daemon = True
    worker.start()
    pulling = False
    try:
        while True:
            wanted.release()
            pulling = True
            try:
                kind, item = passed.get(timeout=_remaining(at))
            except queue.Empty:
                raise expired() from None
            pulling = False
            if kind is _END:
                return
            if isinstance(kind, BaseException):
                raise kind
            yield item
    finally:
        stop.set()
        wanted.release()
        if not pulling:  # the worker is idle: let it close the stream before going on
            finished.wait()
            if closed.error is not None:
                raise closed.error


@asynccontextmanager
async def abounded(at: float | None, expired: Callable[[], Exception]) -> AsyncIterator[None]:
    """Cancel the block at ``at`` (`time.monotonic`) and raise ``expired()`` instead.

    Raises:
        Exception: ``expired()`` if ``at`` passed inside the block.
    """
    if at is None:
        yield
        return
    loop = asyncio.get_running_loop()
    # The event loop's clock is time.monotonic by default; convert in case it is not.
    timeout = asyncio.timeout_at(loop.time() + at - time.monotonic())
    try:
        async with timeout:
            yield
    except TimeoutError as exc:
        if timeout.expired():
            raise expired() from exc
        raise
