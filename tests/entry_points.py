"""The library's ways of running one turn, shared by every test that runs a rule over them.

`LIBRARY` names the `Chatbot` entry points (``chat``, ``stream``, ``achat``, ``astream``) and
`CHAIN` the chain's (``invoke``, ``stream``, ``ainvoke``, ``astream``); `each_library_way` and
`each_chain_way` parametrize a test over them, and `turn` / `chain_turn` run one turn the
named way. The parity suite (tests/parity/) runs the rules of a turn over these and the
service's HTTP routes; a test elsewhere that needs only the library imports them from here
instead of keeping a list of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from langchain_core.runnables import Runnable

from chatchain import Chatbot
from chatchain._tools import ToolEvent

__all__ = [
    "CHAIN",
    "LIBRARY",
    "SYNC_ASYNC",
    "Turned",
    "chain_turn",
    "each_chain_way",
    "each_library_way",
    "turn",
]

LIBRARY = ("chat", "stream", "achat", "astream")
"""The Chatbot's entry points of a turn."""

CHAIN = ("invoke", "stream", "ainvoke", "astream")
"""The chain's entry points of a turn (``RunnableWithMessageHistory``'s)."""

SYNC_ASYNC = ("sync", "async")
"""A turn's two drivers, for tests of what does not depend on streaming."""


def each_library_way(argname: str = "mode") -> pytest.MarkDecorator:
    """Parametrize a test over `LIBRARY` (ids are the method names)."""
    return pytest.mark.parametrize(argname, LIBRARY)


def each_chain_way(argname: str = "mode") -> pytest.MarkDecorator:
    """Parametrize a test over `CHAIN` (ids are the method names)."""
    return pytest.mark.parametrize(argname, CHAIN)


@dataclass(frozen=True)
class Turned:
    """What a turn run one way gave back: its text and what the reply (or stream) says."""

    text: str
    notices: tuple[str, ...]
    interrupted: bool = False


def turn(
    bot: Chatbot,
    way: str,
    text: str,
    *,
    session_id: str = "s",
    on_tool: Callable[[ToolEvent], None] | None = None,
    **options: Any,
) -> Turned:
    """Run one turn on ``bot`` the ``way`` `LIBRARY` names, to its end.

    Errors are raised as the entry point raises them; ``options`` go to the method
    (``user_id``, ``limits``, prompt variables).
    """
    if way == "chat":
        reply = bot.chat(text, session_id=session_id, on_tool=on_tool, **options)
        return Turned(reply.text, reply.notices, reply.interrupted)
    if way == "achat":
        areply = asyncio.run(bot.achat(text, session_id=session_id, on_tool=on_tool, **options))
        return Turned(areply.text, areply.notices, areply.interrupted)
    if way == "stream":
        stream = bot.stream(text, session_id=session_id, on_tool=on_tool, **options)
        return Turned("".join(stream), stream.notices)
    if way != "astream":
        raise ValueError(f"no entry point {way!r}: one of {LIBRARY}")

    async def consume() -> Turned:
        astream = bot.astream(text, session_id=session_id, on_tool=on_tool, **options)
        return Turned("".join([piece async for piece in astream]), astream.notices)

    return asyncio.run(consume())


def chain_turn(
    chain: Runnable[Any, Any], way: str, inputs: Mapping[str, Any], config: Any
) -> list[Any]:
    """Run one turn of ``chain`` the ``way`` `CHAIN` names: the message, or the chunks."""
    if way == "invoke":
        return [chain.invoke(dict(inputs), config)]
    if way == "stream":
        return list(chain.stream(dict(inputs), config))
    if way == "ainvoke":
        return [asyncio.run(chain.ainvoke(dict(inputs), config))]
    if way != "astream":
        raise ValueError(f"no entry point {way!r}: one of {CHAIN}")

    async def consume() -> list[Any]:
        return [chunk async for chunk in chain.astream(dict(inputs), config)]

    return asyncio.run(consume())
