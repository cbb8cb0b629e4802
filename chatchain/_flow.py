"""Rules written once, I/O in thin drivers: the turn's logic as generators of effects.

A *flow* is a generator holding a rule of the turn (how a hold is taken, how a turn is
saved...). Where it needs I/O it yields an *effect* that says what to do, and receives the
result (httpx's ``Auth.auth_flow`` shape): `run` executes each effect in the caller's thread,
`arun` awaits its async form. A failing effect's exception is thrown into the flow where it
yielded, so ``try``/``except`` inside a flow reads and works as in plain code::

    def _release_flow(self):
        if self._hold is not None:
            hold, self._hold = self._hold, None
            yield call(self.spec.ledger, "release", hold)   # ledger.release / arelease

    def release(self):
        run(self._release_flow())

    async def arelease(self):
        await arun(self._release_flow())

A *stream flow* also yields the items its caller reads (anything that is not an `Effect`);
`stream` and `astream` drive it. When the caller stops early, the driver throws
``GeneratorExit`` (or, async, the ``asyncio.CancelledError`` of the cancelled wait) into the
flow where it stands and still executes the effects the flow yields while it cleans up (saving
the partial reply), exactly as a plain generator's ``finally`` would run its calls.

A flow yields cleanup effects only where a driver runs it: one that a caller may abandon to
the garbage collector (LangChain does so with the streams it stops reading) can be closed
before its driver, and a generator that yields while it is closed is an error.
"""

from __future__ import annotations

import asyncio
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
)
from typing import Any, TypeVar

__all__ = ["END", "Do", "Effect", "Flow", "Pull", "arun", "astream", "blocking", "call", "run"]

T = TypeVar("T")

Flow = Generator["Effect", Any, T]
"""A rule of the turn: yields effects, receives their results, returns its own."""


class Effect:
    """Something a flow needs done: `run` does it in the caller's thread, `arun` awaits it."""

    __slots__ = ()

    def run(self) -> Any:
        raise NotImplementedError

    async def arun(self) -> Any:
        raise NotImplementedError


class Do(Effect):
    """The general effect: ``sync()`` for sync callers, ``await async_()`` for async ones."""

    __slots__ = ("_async", "_sync")

    def __init__(self, sync: Callable[[], Any], async_: Callable[[], Awaitable[Any]]) -> None:
        self._sync = sync
        self._async = async_

    def run(self) -> Any:
        return self._sync()

    async def arun(self) -> Any:
        return await self._async()


class _Call(Effect):
    __slots__ = ("_args", "_kwargs", "_name", "_obj")

    def __init__(self, obj: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]):
        self._obj, self._name, self._args, self._kwargs = obj, name, args, kwargs

    def run(self) -> Any:
        return getattr(self._obj, self._name)(*self._args, **self._kwargs)

    async def arun(self) -> Any:
        return await getattr(self._obj, _async_name(self._name))(*self._args, **self._kwargs)


def _async_name(name: str) -> str:
    """The async twin's name: ``commit_turn`` → ``acommit_turn``, ``_take_hold`` →
    ``_atake_hold`` (stores, ledgers and histories follow this naming)."""
    bare = name.lstrip("_")
    return f"{name[: len(name) - len(bare)]}a{bare}"


def call(obj: Any, name: str, *args: Any, **kwargs: Any) -> Effect:
    """``obj.name(*args, **kwargs)`` for sync callers, ``await obj.aname(...)`` for async."""
    return _Call(obj, name, args, kwargs)


class _Blocking(Effect):
    __slots__ = ("_args", "_fn")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._fn, self._args = fn, args

    def run(self) -> Any:
        return self._fn(*self._args)

    async def arun(self) -> Any:
        return await asyncio.to_thread(self._fn, *self._args)


def blocking(fn: Callable[..., Any], *args: Any) -> Effect:
    """``fn(*args)``, a blocking call: in the caller's thread, or off the event loop."""
    return _Blocking(fn, args)


class _End:
    __slots__ = ()

    def __repr__(self) -> str:
        return "END"


END: Any = _End()
"""What `Pull` returns once its stream has ended."""


class Pull(Effect):
    """The next item of a stream, or `END`: one object yielded again for every item (a
    streamed chunk costs no allocation). The stream is opened on the first pull, as
    ``open_sync()`` or ``open_async()`` according to the driver."""

    __slots__ = ("_aopen", "_items", "_open")

    def __init__(
        self,
        open_sync: Callable[[], Iterator[Any]],
        open_async: Callable[[], AsyncIterator[Any]],
    ) -> None:
        self._open, self._aopen = open_sync, open_async
        self._items: Any = None

    def run(self) -> Any:
        items = self._items
        if items is None:
            items = self._items = self._open()
        return next(items, END)

    async def arun(self) -> Any:
        items = self._items
        if items is None:
            items = self._items = self._aopen()
        return await anext(items, END)

    def close(self) -> Effect:
        """The effect closing the stream (nothing if it was never opened)."""
        return Do(self._close, self._aclose)

    def _close(self) -> None:
        close = getattr(self._items, "close", None)
        if close is not None:
            close()

    async def _aclose(self) -> None:
        aclose = getattr(self._items, "aclose", None)
        if aclose is not None:
            await aclose()


def run(flow: Flow[T]) -> T:
    """Drive ``flow`` in the caller's thread; its return value."""
    try:
        effect = next(flow)
        while True:
            try:
                result = effect.run()
            except BaseException as exc:
                effect = flow.throw(exc)
            else:
                effect = flow.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def arun(flow: Flow[T]) -> T:
    """Drive ``flow``, awaiting each effect; its return value."""
    try:
        effect = next(flow)
        while True:
            try:
                result = await effect.arun()
            except BaseException as exc:
                effect = flow.throw(exc)
            else:
                effect = flow.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def stream(flow: Generator[Any, Any, None]) -> Generator[Any, None, None]:
    """Drive a stream flow: execute its effects, yield its other items to the caller.

    An exception at the caller's ``yield`` (``GeneratorExit`` when it closes the stream) is
    thrown into the flow, whose cleanup effects are still executed.
    """
    try:
        item = next(flow)
        while True:
            if isinstance(item, Effect):
                try:
                    result = item.run()
                except BaseException as exc:
                    item = flow.throw(exc)
                else:
                    item = flow.send(result)
                continue
            try:
                yield item
            except BaseException as exc:
                item = flow.throw(exc)
            else:
                item = next(flow)
    except StopIteration:
        return


async def astream(flow: Generator[Any, Any, None]) -> AsyncGenerator[Any, None]:
    """`stream` for async callers: effects are awaited (a cancelled wait throws
    ``asyncio.CancelledError`` into the flow)."""
    try:
        item = next(flow)
        while True:
            if isinstance(item, Effect):
                try:
                    result = await item.arun()
                except BaseException as exc:
                    item = flow.throw(exc)
                else:
                    item = flow.send(result)
                continue
            try:
                yield item
            except BaseException as exc:
                item = flow.throw(exc)
            else:
                item = next(flow)
    except StopIteration:
        return
