"""Async HTTP connections per event loop, for `ChatOpenAI` (langchain-ai/langchain#35783).

`ChatOpenAI` keeps one async client, over an HTTP client that langchain-openai caches for the
whole process. Its pooled connections belong to the event loop that opened them, so the second
``asyncio.run(bot.achat(...))`` of a script fails with ``RuntimeError: Event loop is closed``
(and the first loop's sockets are left open). Here each running loop gets one HTTP client of its
own, shared by every model as langchain-openai shares its one, and closed when the loop shuts
down its async generators, as ``asyncio.run`` and ``asyncio.Runner`` do before closing it.

The HTTP clients are kept by loop, not by model: a model that is garbage-collected while its
loop runs must not take open connections with it (Python would finalize them unclosed).

The stand-in for ``chat.completions`` also hands streamed chunks over as the endpoint's JSON
(`_Completions`): langchain-openai reads them as dicts anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import AsyncGenerator
from typing import Any, TypeVar

import openai
from langchain_openai.chat_models.base import BaseChatOpenAI

from chatchain import _deadline

__all__ = ["aclose_loop_client", "with_loop_clients"]

Model = TypeVar("Model", bound=BaseChatOpenAI)

_guard = threading.Lock()
# The HTTP client of each running loop, with the async generator that closes it at shutdown.
_http_clients: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, tuple[openai.DefaultAsyncHttpxClient, AsyncGenerator[None, None]]
] = weakref.WeakKeyDictionary()


def _http_client(loop: asyncio.AbstractEventLoop) -> openai.DefaultAsyncHttpxClient:
    with _guard:
        found = _http_clients.get(loop)
        if found is None:
            client = _deadline.async_http_client()
            closer = _close_at_shutdown(client)
            # Run it to its `yield` (it awaits nothing before): the loop now tracks it and
            # closes it, with the client, in `shutdown_asyncgens`.
            with contextlib.suppress(StopIteration):
                closer.asend(None).send(None)
            found = _http_clients[loop] = (client, closer)
    return found[0]


async def _close_at_shutdown(client: openai.DefaultAsyncHttpxClient) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        with _guard:  # a later call on this loop (if any) opens a new client
            _http_clients.pop(asyncio.get_running_loop(), None)
        await client.aclose()


async def aclose_loop_client() -> None:
    """Close the running loop's HTTP client now, rather than when the loop shuts down.

    For an owner of the loop's work that ends before the loop does (the service at its
    shutdown); a later call on this loop opens a new client.
    """
    with _guard:
        found = _http_clients.get(asyncio.get_running_loop())
    if found is not None:
        await found[1].aclose()  # runs `_close_at_shutdown`'s finally: forgets and closes


class _LoopClients:
    """Copies of one model's async OpenAI client, one per running loop, over its HTTP client."""

    def __init__(self, template: openai.AsyncOpenAI) -> None:
        self._template = template
        self._guard = threading.Lock()
        self._copies: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, openai.AsyncOpenAI]
        self._copies = weakref.WeakKeyDictionary()

    def current(self) -> openai.AsyncOpenAI:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not called from a coroutine: nothing is sent from here
            return self._template
        with self._guard:
            copy = self._copies.get(loop)
            if copy is None:
                copy = self._template.copy(http_client=_http_client(loop))
                self._copies[loop] = copy
        return copy


class _OnLoop:
    """Stands in for `ChatOpenAI`'s async client: each use goes to the running loop's copy."""

    def __init__(self, clients: _LoopClients, *path: str) -> None:
        self._clients = clients
        self._path = path

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy, pickle and friends probe for these
            raise AttributeError(name)
        return getattr(self._target(), name)

    def _target(self) -> Any:
        """What this stands in for, on the running loop's client."""
        target: Any = self._clients.current()
        for part in self._path:
            target = getattr(target, part)
        return target


class _Completions(_OnLoop):
    """`_OnLoop` for ``chat.completions``, whose streams yield each chunk as its JSON (a dict).

    langchain-openai turns every streamed chunk back into a dict (``model_dump``) as soon as it
    gets it, and reads it with ``.get``; the OpenAI client had built that typed
    `ChatCompletionChunk` out of the very same dict, walking its type annotations: together a
    third of the CPU a relayed chunk costs the service. The client's own custom parse type,
    ``AsyncStream[object]``, hands each chunk over as it came (its error events still raise
    `openai.APIError`, the response is still closed at the end), and langchain-openai takes
    the dict as it is. A call that does not stream is untouched.
    """

    def __init__(self, clients: _LoopClients) -> None:
        super().__init__(clients, "chat", "completions")

    async def create(self, **params: Any) -> Any:
        completions = self._target()
        if not params.get("stream"):
            return await completions.create(**params)
        raw = await completions.with_raw_response.create(**params)
        return raw.parse(to=openai.AsyncStream[object])


def with_loop_clients(model: Model) -> Model:
    """A copy of ``model`` whose async calls use an HTTP client of the running event loop.

    ``model`` itself is not changed. A model given its own ``http_async_client`` (or a
    proxy) keeps it: that client, and its loop, are its owner's.
    """
    root = model.root_async_client
    if model.http_async_client is not None or not isinstance(root, openai.AsyncOpenAI):
        return model
    clients = _LoopClients(root)
    return model.model_copy(
        update={
            "root_async_client": _OnLoop(clients),
            "async_client": _Completions(clients),
        }
    )
