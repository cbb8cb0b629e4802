"""One streaming helper for every route: a turn's reply relayed as server-sent events.

`relay` does, in one place, what a streamed turn needs whatever API it answers:

1. it takes one of the user's stream slots and opens the turn;
2. it waits for the reply's first piece, the turn's error or the client leaving, whichever
   comes first: an error answers with its own HTTP status (as the JSON routes do); a client
   that left stops the turn (the user's message is kept, the empty reply marked
   interrupted, the call billed, the hold released) and is counted ``abandoned``;
3. it relays the pieces, all those ready together in one event (their text joined, in
   order), then the route's closing events, or an error event for a failure after the first
   piece; a client that leaves mid-stream stops the turn, the partial reply kept;
4. it gives the slot back.

A route gives only the format of its events (`Events`), as bytes ready to send.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Literal, Protocol

import anyio
from fastapi import Request, Response
from sse_starlette import EventSourceResponse
from starlette.types import Receive

from chatchain import AsyncReplyStream, ChatChainError, ToolFinished, ToolStarted
from chatchain.server import _metrics
from chatchain.server._errors import public_message, status_of
from chatchain.server._service import Service
from chatchain.server._throttle import StreamSlot
from chatchain.users import User

__all__ = ["Events", "Piece", "relay", "texts_joined"]

Piece = str | ToolStarted | ToolFinished
"""What a reply stream yields: text, or (with the server's tools) a tool event."""

PING_SECONDS = 15  # a comment this often keeps proxies from closing an idle stream

GATHER_SECONDS = 0.005
"""How long a relayed piece waits for those that follow it, to go out in one event: a fast
stream costs one send (and one event to parse) per few pieces, not per piece, and a person
sees no difference (a screen frame is 16 ms). The first piece never waits."""

Outcome = Literal["end", "error", "gone"]


class Events(Protocol):
    """How one API writes a streamed reply's events (whole SSE events, UTF-8)."""

    def start(self) -> bytes:
        """What opens the stream, before the first pieces (may be empty)."""
        ...

    def pieces(self, pieces: Sequence[Piece]) -> bytes:
        """The events of pieces that were ready together, in order (may be empty)."""
        ...

    def end(self, stream: AsyncReplyStream) -> bytes:
        """The events that close a reply that ended well (``stream.usage`` is set)."""
        ...

    def error(self, kind: str, status: int, message: str) -> bytes:
        """The event of a failure after the first piece."""
        ...


def texts_joined(pieces: Sequence[Piece]) -> list[Piece]:
    """``pieces`` with each run of text joined into one piece (tool events stay apart).

    Example:
        >>> texts_joined(["Hel", "lo", " there"])
        ['Hello there']
    """
    joined: list[Piece] = []
    run: list[str] = []
    for piece in pieces:
        if isinstance(piece, str):
            run.append(piece)
            continue
        if run:
            joined.append("".join(run))
            run = []
        joined.append(piece)
    if run:
        joined.append("".join(run))
    return joined


class _Pump:
    """Runs a reply stream in a task of its own, keeping the pieces ready to be sent.

    The response's task is cancelled when the client leaves (anyio cancels it, and keeps
    cancelling every await under it); the turn's own task is then cancelled once, as
    asyncio cancels, so the stream saves the partial reply, marked interrupted, exactly as
    `AsyncReplyStream.aclose` does.

    A cancellation can be lost on Python 3.11: ``asyncio.wait_for`` (langchain-openai wraps
    each streamed chunk in it) returns the chunk instead when both happen at once. The next
    piece then finds `stop` asked for and closes the stream itself, with the same effect.
    """

    def __init__(self, stream: AsyncReplyStream, receive: Receive, *, tools: bool) -> None:
        self.stream = stream
        self.outcome: Outcome | None = None
        self.error: Exception | None = None
        self._ready: list[Piece] = []
        self._wake = asyncio.Event()
        self._stopping = False
        self._task = asyncio.create_task(self._run(tools))
        self._listener = asyncio.create_task(self._listen(receive))

    async def _run(self, tools: bool) -> None:
        pieces = self.stream.events() if tools else self.stream
        try:
            async for piece in pieces:
                if self._stopping:  # the cancellation was lost: stop here instead
                    await self.stream.aclose()
                    return
                self._ready.append(piece)
                self._wake.set()
        except Exception as exc:
            self._end("error", exc)
        else:
            self._end("end")

    async def _listen(self, receive: Receive) -> None:
        # The body has been read: what comes next from the client can only be its leaving.
        while (await receive())["type"] != "http.disconnect":
            pass
        self._end("gone")

    def _end(self, outcome: Outcome, error: Exception | None = None) -> None:
        if self.outcome is None:
            self.outcome, self.error = outcome, error
        self._wake.set()

    async def take(self, gather: float = 0.0) -> list[Piece]:
        """The pieces ready now, waiting for some; ``[]`` once the turn ended (or the client
        left) and every piece was taken. With ``gather``, the pieces that come within that
        many seconds of the first are taken with it (unless the turn ends sooner)."""
        while not self._ready and self.outcome is None:
            self._wake.clear()
            await self._wake.wait()
        if gather and self.outcome is None:
            await asyncio.sleep(gather)
        ready, self._ready = self._ready, []
        return ready

    def stop_listening(self) -> None:
        """Leave the client to the response, which listens for its leaving itself."""
        self._listener.cancel()

    async def stop(self) -> bool:
        """Stop the turn if it still runs, and wait until it is saved; whether it was stopped."""
        self._listener.cancel()
        stopped = not self._task.done()
        if stopped:
            self._stopping = True
            self._task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.wait({self._task})
        return stopped


async def relay(
    request: Request,
    service: Service,
    user: User,
    open_stream: Callable[[], AsyncReplyStream],
    events: Events,
    *,
    tools: bool = False,
    on_failure: Callable[[Exception], None] | None = None,
) -> Response:
    """The reply of the turn that ``open_stream`` opens, as server-sent events.

    The answer waits for the first piece (or the turn's error): a turn refused before any
    text (bad input, budget, busy session, endpoint down) answers with its own HTTP status.
    A client that leaves before it stops the turn and gets no answer (204, unread).

    Args:
        request: The request, whose client may leave at any time.
        service: The app's service (the user's stream slots).
        user: The caller.
        open_stream: Opens the turn's stream (called once, after the slot is taken).
        events: The route's format.
        tools: Whether the server's tool events are relayed too.
        on_failure: Called with the error of a turn that failed (to log it).

    Raises:
        ChatChainError: The turn failed before its first piece.
        HTTPProblem: The user has no stream slot left (429).
    """
    slot = await service.throttle.aopen_stream(user)
    _metrics.OPEN_STREAMS.inc()
    pump: _Pump | None = None
    try:
        pump = _Pump(open_stream(), request.receive, tools=tools)
        first = await pump.take()
        if not first and pump.outcome == "gone":  # nobody to answer: the turn is stopped
            await pump.stop()
            _metrics.left_before_turn()  # (its turn's own end counts it, if it started)
            await _closed(slot)
            return Response(status_code=204)
        if not first and pump.error is not None:
            raise pump.error
        pump.stop_listening()
    except BaseException as exc:
        if pump is not None:
            await pump.stop()
        await _closed(slot)
        if isinstance(exc, ChatChainError) and on_failure is not None:
            on_failure(exc)
        raise
    body = _body(slot, pump, first, events, on_failure)
    # At shutdown the stream has the grace period to end, then is stopped (reply kept).
    grace = service.settings.server_shutdown_grace
    return EventSourceResponse(body, ping=PING_SECONDS, shutdown_grace_period=grace)


async def _body(
    slot: StreamSlot,
    pump: _Pump,
    first: list[Piece],
    events: Events,
    on_failure: Callable[[Exception], None] | None,
) -> AsyncIterator[bytes]:
    try:
        start = events.start()
        if start:
            yield start
        batch = first
        while batch:
            data = events.pieces(batch)
            if data:
                yield data
            batch = await pump.take(GATHER_SECONDS)
        if pump.error is not None:
            if on_failure is not None:
                on_failure(pump.error)
            yield _error_event(events, pump.error)
        elif pump.outcome == "end":
            stream = pump.stream
            assert stream.usage is not None  # set when the stream ended
            yield events.end(stream)
    finally:
        await pump.stop()  # if the client left mid-stream: the partial reply is kept
        await _closed(slot)


def _error_event(events: Events, exc: Exception) -> bytes:
    if isinstance(exc, ChatChainError):
        kind, status, message = type(exc).__name__, status_of(exc), public_message(exc)
    else:
        kind, status = "InternalError", 500
        message = "The server failed unexpectedly; see the server's log."
    _metrics.ERRORS.labels(kind).inc()
    return events.error(kind, status, message)


async def _closed(slot: StreamSlot) -> None:
    _metrics.OPEN_STREAMS.dec()
    await slot.close()
