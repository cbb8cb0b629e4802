"""What every route shares: the service's state, the caller (bearer token), session ids.

Routers (the native API, the OpenAI-compatible one, the page) take these as FastAPI
dependencies: ``user: Caller`` authenticates the request (401 otherwise) and counts it
against the user's requests per minute (429); ``service: ServiceDep`` is the `Service`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, TypedDict, cast

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from chatchain import MAX_SESSION_ID_LENGTH, Chatbot, InvalidInputError, validate_session_id
from chatchain.server._drain import Drain
from chatchain.server._errors import HTTPProblem
from chatchain.server._throttle import UserThrottle
from chatchain.settings import Settings
from chatchain.users import User, Users

__all__ = [
    "AppState",
    "Caller",
    "Service",
    "ServiceDep",
    "app_state",
    "caller",
    "get_service",
    "own_id",
    "session_header",
    "session_key",
    "session_key_prefix",
]

_SEPARATOR = ":"  # user names cannot hold it, so "ann:x" is always ann's session "x"


@dataclass(frozen=True)
class Service:
    """One app's Chatbot, users and per-user throttle (one per worker process).

    Attributes:
        bot: The Chatbot every turn runs on (its store is shared by the workers).
        users: The users and their tokens, kept in the same store.
        settings: The bot's settings (``CHATCHAIN_SERVER_*`` included).
        throttle: Each user's requests per minute and open streams (in the store when it
            counts them, so across workers and machines; else in this process).
    """

    bot: Chatbot
    users: Users
    settings: Settings
    throttle: UserThrottle


class AppState(TypedDict):
    """What the app's lifespan hands every request (Starlette's lifespan state).

    Attributes:
        service: The app's `Service`.
        started: When the app started (Unix seconds): the ``created`` of ``/v1/models``.
        drain: The app's shutdown (whether it is draining).
    """

    service: Service
    started: int
    drain: Drain


def app_state(request: Request) -> AppState:
    """The lifespan state of the app that received ``request``."""
    return cast(AppState, request.scope["state"])


def get_service(request: Request) -> Service:
    """The `Service` of the app that received ``request``."""
    return app_state(request)["service"]


_bearer = HTTPBearer(
    auto_error=False,
    bearerFormat="cc_...",
    description="A token from `chatchain users add NAME` (or `users rotate NAME`).",
)

_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


async def caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> User:
    """The user whose bearer token the request carries; the request is counted for them.

    Raises:
        HTTPProblem: 401 for a missing, malformed, unknown, revoked or replaced token; 429
            when the user is over their requests per minute.
    """
    if credentials is None:
        raise HTTPProblem(
            401,
            "Missing bearer token: send the header 'Authorization: Bearer <token>' with the "
            "token that `chatchain users add NAME` printed.",
            headers=_UNAUTHORIZED,
        )
    service = get_service(request)
    user = await service.users.aauthenticate(credentials.credentials)
    if user is None:
        raise HTTPProblem(
            401,
            "The bearer token is not valid (wrong, revoked or replaced by `users rotate`): "
            "ask the operator for a current token.",
            headers=_UNAUTHORIZED,
        )
    await service.throttle.arequest(user)
    return user


Caller = Annotated[User, Depends(caller)]
"""The authenticated user of a request, as a route parameter's type."""

ServiceDep = Annotated[Service, Depends(get_service)]
"""The app's `Service`, as a route parameter's type."""


def session_key(user: User, session_id: str) -> str:
    """The key of ``user``'s session ``session_id`` in the shared store: ``"name:session_id"``.

    The caller names a session by its own id; the `Chatbot` (and so the store) is given this
    key as its ``session_id``, so that users sharing a store never share a session.

    Raises:
        InvalidInputError: ``session_id`` cannot key a session (empty, control characters,
            or too long once prefixed with the user's name).

    Example:
        >>> from datetime import UTC, datetime
        >>> session_key(User("ann", datetime.now(UTC)), "trip")
        'ann:trip'
    """
    validate_session_id(session_id)
    key = f"{user.name}{_SEPARATOR}{session_id}"
    if len(key) > MAX_SESSION_ID_LENGTH:
        room = MAX_SESSION_ID_LENGTH - len(user.name) - len(_SEPARATOR)
        raise InvalidInputError(
            f"The session id is {len(session_id)} characters long; yours may have up to "
            f"{room}. Use a shorter id (a UUID or a hash of yours)."
        )
    return key


def session_header(value: str | None, name: str = "X-Session-Id") -> str | None:
    """The session id a header names, read as UTF-8 (as a session id in a URL path is).

    HTTP carries header values as bytes, which Starlette hands over decoded as latin-1: a
    client's UTF-8 ``café`` would be ``cafÃ©``, another session than the one the native
    API's ``/v1/sessions/caf%C3%A9/...`` names. The bytes are decoded as UTF-8 here, and
    bytes that are not UTF-8 (``café`` sent as latin-1) are refused rather than guessed.

    Raises:
        HTTPProblem: 400 when the value is not UTF-8.

    Example:
        >>> session_header("café".encode().decode("latin-1")), session_header(None)
        ('café', None)
    """
    if value is None or value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:  # latin-1 bytes (or any other encoding): not guessed
        raise HTTPProblem(
            400,
            f"The {name} header is not UTF-8: send the session id's UTF-8 bytes, as the "
            "session's URL path does (percent-decoded), or use an ASCII id.",
        ) from None


def session_key_prefix(user: User) -> str:
    """What every session key of ``user``'s sessions starts with (and no other user's).

    Example:
        >>> from datetime import UTC, datetime
        >>> session_key_prefix(User("ann", datetime.now(UTC)))
        'ann:'
    """
    return f"{user.name}{_SEPARATOR}"


def own_id(user: User, key: str) -> str | None:
    """The caller's own session id in a session key, or ``None`` when it is another user's.

    Example:
        >>> from datetime import UTC, datetime
        >>> ann = User("ann", datetime.now(UTC))
        >>> own_id(ann, "ann:trip"), own_id(ann, "annie:trip"), own_id(ann, "trip")
        ('trip', None, None)
    """
    prefix = session_key_prefix(user)
    return key[len(prefix) :] if key.startswith(prefix) else None
