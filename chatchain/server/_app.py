"""`create_app`: the FastAPI app of ``chatchain serve`` over one Chatbot."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatchain import Chatbot, Settings, __version__, aclose_loop_client
from chatchain.server import _metrics, _native, _openai, _ops
from chatchain.server._docs import install_docs
from chatchain.server._drain import Drain, InFlight
from chatchain.server._errors import (
    error_body,
    install_error_handlers,
    is_openai_path,
    openai_error,
)
from chatchain.server._page import install_page
from chatchain.server._service import AppState, Service
from chatchain.server._throttle import UserThrottle
from chatchain.users import Users

__all__ = ["TOOLS_ENV", "create_app"]

TOOLS_ENV = "CHATCHAIN_SERVE_TOOLS"
"""The ``--tools MODULE`` of ``chatchain serve``, for its workers: ``chatchain serve`` always
sets it (empty without the option), and `create_app` loads the tools of what it names."""


def create_app(
    bot: Chatbot | None = None, *, settings: Settings | None = None, users: Users | None = None
) -> FastAPI:
    """The chat service as an ASGI app: the native API, ``/healthz``, ``/metrics``, ``/docs``.

    With no arguments (as ``uvicorn --factory chatchain.server:create_app`` and each worker
    of ``chatchain serve`` call it) the settings come from the environment and ``.env``, and
    the app builds its Chatbot over the store they name and closes it at shutdown; its tools
    are those of the module that ``CHATCHAIN_SERVE_TOOLS`` names (``chatchain serve --tools
    MODULE`` sets it), none when it is unset or empty.

    Args:
        bot: The Chatbot to serve (yours stays yours: the app does not close it).
        settings: The ``CHATCHAIN_SERVER_*`` settings (and the bot's, when it builds one);
            ``bot.settings`` when a bot is given.
        users: The users and tokens; by default those kept in the bot's store.

    Returns:
        The app; add routers to it with ``app.include_router``.

    Raises:
        ConfigurationError: A setting cannot work, or the store keeps no users.

    Example:
        >>> from chatchain.testing import FakeChatModel
        >>> app = create_app(Chatbot(llm=FakeChatModel()))
        >>> sorted(app.openapi()["paths"])[:4]
        ['/healthz', '/metrics', '/v1/chat/completions', '/v1/me']
    """
    owned = bot is None
    if bot is None:
        bot = Chatbot(settings or Settings.load(), tools=_tools_from_environment())
    settings = settings or bot.settings
    bot.add_hooks(_metrics.HOOKS)  # the turns' metrics, from the turns' own events
    service = Service(
        bot=bot,
        users=users or Users(bot.store),
        settings=settings,
        throttle=UserThrottle(
            requests_per_minute=settings.server_requests_per_minute,
            streams=settings.server_streams_per_user,
            store=bot.store,
        ),
    )

    drain = Drain(delay=settings.server_drain_delay, grace=settings.server_shutdown_grace)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[AppState]:
        _recover_in_background(service.bot)
        drain.install()  # SIGTERM: draining first (see chatchain.server._drain)
        try:
            yield {"service": service, "started": int(time.time()), "drain": drain}
        finally:
            await drain.settled()  # the turns stopped at the grace's end, stored
            drain.uninstall()
            _metrics.process_exited()
            if owned:
                await service.bot.aclose()
                await aclose_loop_client()  # the endpoint's connections, opened on this loop

    app = FastAPI(
        title="chatchain",
        version=__version__,
        summary="A chat service over chatchain: sessions per user, streamed replies, usage.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load from a CDN: /docs is served from the package
        redoc_url=None,
    )
    install_error_handlers(app)
    app.include_router(_native.router)
    app.include_router(_openai.router)
    app.include_router(_ops.router)
    install_page(app)  # the chat page at /
    install_docs(app)  # the API's docs at /docs
    if settings.server_cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.server_cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Accept", "X-Session-Id"],
        )
    app.add_middleware(BodyLimit, max_bytes=settings.server_max_body_bytes)
    app.add_middleware(InFlight, drain=drain)  # outermost: counts every request to its end
    return app


def _tools_from_environment() -> list[Any]:
    spec = os.environ.get(TOOLS_ENV, "")
    if not spec:
        return []
    from chatchain.cli import load_tools  # rich, of the cli extra that serve needs

    return load_tools(spec)


class BodyLimit:
    """Refuses a request body over ``max_bytes`` with 413 before the app sees any of it.

    The body is read here (up to the limit) and handed on whole: a ``Content-Length`` over
    the limit is refused at once, and a chunked body as soon as it passes the limit.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                await self.app(scope, _replay([message], receive), send)
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        whole: Message = {"type": "http.request", "body": bytes(body), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        _metrics.ERRORS.labels("PayloadTooLarge").inc()
        message = (
            f"The request body is over {self.max_bytes} bytes "
            "(CHATCHAIN_SERVER_MAX_BODY_BYTES): send less."
        )
        if is_openai_path(scope["path"]):
            status, body, headers = openai_error(413, "PayloadTooLarge", message)
            response = JSONResponse(body, status_code=status, headers=headers)
        else:
            response = JSONResponse(error_body("PayloadTooLarge", message), status_code=413)
        await response(scope, receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


def _recover_in_background(bot: Chatbot) -> None:
    """Close the turns a killed worker or instance left in the store, without delaying the
    start (`Chatbot.recover_crashed_turns`; a session's next turn does it too)."""

    def sweep() -> None:
        try:
            recovered = bot.recover_crashed_turns()
        except Exception as exc:  # the service runs without it: each session recovers its own
            logging.getLogger("chatchain").warning(
                "Could not store the turns of crashed processes now (%s); each is stored by "
                "its session's next turn.",
                exc,
            )
            return
        if recovered:
            logging.getLogger("chatchain").warning(
                "Stored %d turn(s) cut off by a crashed process, marked interrupted.",
                len(recovered),
            )

    threading.Thread(target=sweep, name="chatchain-recover", daemon=True).start()
