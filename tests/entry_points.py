"""The library's ways of running one turn, shared by every test that runs a rule over them.

`LIBRARY` names the `Chatbot` entry points (``chat``, ``stream``, ``achat``, ``astream``);
`each_library_way` parametrizes a test over them, `turn` runs one turn the named way and
`asker` gives a function that does (the reply's text only). The parity suite
(tests/parity/) runs the rules of a turn over these and the service's HTTP routes; a test
elsewhere that needs only the library imports them from here instead of keeping a list of
its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import pytest

from chatchain import Chatbot, Usage

__all__ = [
    "LIBRARY",
    "STREAMS",
    "SYNC_ASYNC",
    "Turned",
    "asker",
    "each_library_way",
    "turn",
]

LIBRARY = ("chat", "stream", "achat", "astream")
"""The Chatbot's entry points of a turn."""

STREAMS = ("stream", "astream")
"""The entry points of `LIBRARY` that stream the reply."""

SYNC_ASYNC = ("sync", "async")
"""A turn's two drivers, for tests of what does not depend on streaming."""


def each_library_way(argname: str = "mode") -> pytest.MarkDecorator:
    """Parametrize a test over `LIBRARY` (ids are the method names)."""
    return pytest.mark.parametrize(argname, LIBRARY)


@dataclass(frozen=True)
class Turned:
    """What a turn run one way gave back: its text and what the reply (or stream) says."""

    text: str
    notices: tuple[str, ...]
    usage: Usage | None = None
    interrupted: bool = False


def turn(
    bot: Chatbot,
    way: str,
    text: str,
    *,
    session_id: str = "s",
    loop: asyncio.AbstractEventLoop | None = None,
    pieces: list[str] | None = None,
    **options: Any,
) -> Turned:
    """Run one turn on ``bot`` the ``way`` `LIBRARY` names, to its end.

    Errors are raised as the entry point raises them. ``loop``: run an async way on this
    event loop rather than a new one (``asyncio.run``); ``pieces``: a streamed way appends
    each piece of text to it as it arrives (so a test sees what came before an error);
    ``options`` go to the method (``user_id``, ``limits``, ``on_tool``, prompt variables).
    """

    def run(coroutine: Coroutine[Any, Any, Turned]) -> Turned:
        return asyncio.run(coroutine) if loop is None else loop.run_until_complete(coroutine)

    received = pieces if pieces is not None else []
    if way == "chat":
        reply = bot.chat(text, session_id=session_id, **options)
        return Turned(reply.text, reply.notices, reply.usage, reply.interrupted)
    if way == "achat":
        return run(_achat(bot, text, session_id, options))
    if way == "stream":
        stream = bot.stream(text, session_id=session_id, **options)
        for piece in stream:
            received.append(piece)
        return Turned(stream.text, stream.notices, stream.usage)
    if way != "astream":
        raise ValueError(f"no entry point {way!r}: one of {LIBRARY}")
    return run(_astream(bot, text, session_id, options, received))


async def _achat(bot: Chatbot, text: str, session_id: str, options: dict[str, Any]) -> Turned:
    reply = await bot.achat(text, session_id=session_id, **options)
    return Turned(reply.text, reply.notices, reply.usage, reply.interrupted)


async def _astream(
    bot: Chatbot, text: str, session_id: str, options: dict[str, Any], received: list[str]
) -> Turned:
    stream = bot.astream(text, session_id=session_id, **options)
    async for piece in stream:
        received.append(piece)
    return Turned(stream.text, stream.notices, stream.usage)


def asker(way: str) -> Callable[..., str]:
    """``ask(bot, text, session, user=None)``: the reply's text of one turn run ``way``."""

    def ask(bot: Chatbot, text: str, session: str, user: str | None = None) -> str:
        return turn(bot, way, text, session_id=session, user_id=user).text

    return ask
