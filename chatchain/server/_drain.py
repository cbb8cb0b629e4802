"""An instance's graceful shutdown: draining, then its turns in flight finished or stopped.

On SIGTERM, under uvicorn (``chatchain serve``, or ``uvicorn --factory
chatchain.server:create_app``), an app goes through these steps:

1. **Draining** at once: ``/healthz`` answers 503 ``{"status": "draining"}`` so that a load
   balancer or an orchestrator takes the instance out; every request is still served.
2. After the drain delay (``CHATCHAIN_SERVER_DRAIN_DELAY``, 0 by default), uvicorn's own
   shutdown starts: the listening socket is closed (a new connection is refused: a proxy
   sends it to another instance, as nothing was sent), idle connections are closed, and
   each busy one closes after its response.
3. The turns in flight (streams included) get the grace period
   (``CHATCHAIN_SERVER_SHUTDOWN_GRACE``, 30 s by default) to finish as usual.
4. Those still running then are stopped the way a client that leaves stops them: the
   user's message and the reply so far are stored, the reply marked interrupted, the call
   billed, the budget hold and the session's lock released.
5. The app waits for those saves (`Drain.settled`), closes its store and exits.

A second SIGTERM during the drain delay skips the rest of it. SIGINT (Ctrl+C) is left to
uvicorn: no drain delay.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["Drain", "InFlight"]

logger = logging.getLogger("chatchain")

SETTLE_SECONDS = 15.0
"""How long the app's shutdown waits for the requests it stopped to store their turns."""

_Handler = Callable[[int, FrameType | None], Any]


class Drain:
    """One app's shutdown: whether it is draining, and its requests in flight.

    Attributes:
        delay: Seconds between SIGTERM and uvicorn's shutdown (``/healthz`` says draining).
        grace: Seconds the turns in flight get once uvicorn's shutdown started.
        draining: Whether SIGTERM came (``/healthz`` answers 503).
        in_flight: HTTP requests the app is answering now.

    Example:
        >>> drain = Drain(delay=0.0, grace=30.0)
        >>> drain.draining, drain.in_flight
        (False, 0)
    """

    def __init__(self, *, delay: float, grace: float) -> None:
        self.delay = delay
        self.grace = grace
        self.draining = False
        self.in_flight = 0
        self._idle: asyncio.Event | None = None
        self._previous: _Handler | None = None
        self._handler: _Handler | None = None

    def install(self) -> None:
        """Take SIGTERM from the server that runs the app (uvicorn's handler), to drain first.

        Done at the app's startup, when uvicorn has set its signal handlers. Nothing is done
        outside the main thread (a test client's app) or when no one handles SIGTERM (the
        app is not under a server that stops on it).
        """
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):
            return
        loop = asyncio.get_running_loop()

        def on_sigterm(sig: int, frame: FrameType | None) -> None:
            # A signal handler interrupts the loop anywhere: the work is handed to the loop.
            loop.call_soon_threadsafe(self._sigterm, loop, previous, sig)

        self._previous, self._handler = previous, on_sigterm
        signal.signal(signal.SIGTERM, on_sigterm)

    def uninstall(self) -> None:
        """Give SIGTERM back to the handler `install` took it from (if still ours)."""
        if self._handler is None or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is self._handler:
            signal.signal(signal.SIGTERM, self._previous)
        self._handler = None

    def _sigterm(self, loop: asyncio.AbstractEventLoop, server: _Handler, sig: int) -> None:
        if self.draining or self.delay <= 0:  # no delay, or a second SIGTERM: stop now
            self.draining = True
            logger.warning("SIGTERM: no longer taking requests (shutdown grace %g s).", self.grace)
            server(sig, None)
            return
        self.draining = True
        logger.warning(
            "SIGTERM: draining (/healthz answers 503) for %g s, then no longer taking requests "
            "(shutdown grace %g s).",
            self.delay,
            self.grace,
        )
        loop.call_later(self.delay, server, sig, None)

    def started(self) -> None:
        """A request came in."""
        self.in_flight += 1

    def ended(self) -> None:
        """A request was answered (or stopped, and what it had to store is stored)."""
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def settled(self) -> bool:
        """Wait until no request is in flight, at most `SETTLE_SECONDS`; whether none is.

        At the app's shutdown, uvicorn has stopped (cancelled) the requests still running
        after its grace period without waiting for them: each stores its turn as it stops.
        """
        if not self.in_flight:
            return True
        logger.info("Waiting for %d request(s) to store their turns.", self.in_flight)
        self._idle = asyncio.Event()  # made here: an Event belongs to the loop that waits
        try:
            async with asyncio.timeout(SETTLE_SECONDS):
                await self._idle.wait()
        except TimeoutError:
            logger.warning(
                "%d request(s) still running %g s after the shutdown; closing anyway.",
                self.in_flight,
                SETTLE_SECONDS,
            )
            return False
        return True


class InFlight:
    """ASGI middleware counting the app's HTTP requests in flight in its `Drain`."""

    def __init__(self, app: ASGIApp, *, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.drain.started()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.ended()
