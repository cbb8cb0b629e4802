"""The users of a chat service: names, bearer tokens and spending caps, kept in the store.

`Users` is the facade over a store's `chatchain.stores.UserBackend`: every worker process
that opens the same store sees the same users. A token is shown once, when it is made
(`Users.add`, `Users.rotate`); the store keeps only its SHA-256 hash.

Example:
    >>> from chatchain.stores import MemoryStore
    >>> users = Users(MemoryStore())
    >>> token = users.add("alice", daily_usd=1.0)
    >>> users.authenticate(token).name
    'alice'
    >>> users.authenticate("cc_not-a-token") is None
    True
    >>> [(limit.label, limit.max_usd) for limit in users.limits(users.get("alice"))]
    [("user alice's daily cap", 1.0)]
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import math
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from types import EllipsisType
from typing import TYPE_CHECKING, Any

from chatchain._flow import Flow, arun, call, run
from chatchain.budgets import BudgetLimit
from chatchain.errors import ConfigurationError, InvalidInputError, UnknownUserError

if TYPE_CHECKING:
    from chatchain.stores import HistoryStore, UserBackend

__all__ = ["TOKEN_PREFIX", "User", "Users", "hash_token", "validate_name"]

TOKEN_PREFIX = "cc_"
"""How every token starts (so a leaked one is easy to recognise and to scan for)."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
# "cc_" + secrets.token_urlsafe(32): 43 characters of URL-safe base64.
_TOKEN = re.compile(r"cc_[A-Za-z0-9_-]{43}")
_CAPS = ("budget_usd", "daily_usd", "monthly_usd")


@dataclass(frozen=True)
class User:
    """A user of the chat service.

    Attributes:
        name: Letters, digits and ``_ . @ -``, starting with a letter or digit, at most 64
            characters (no ``:``, which separates the user from the session in store ids).
        created_at: When the user was added (UTC).
        budget_usd: The most the user may spend in all, or ``None`` for no cap.
        daily_usd: The most the user may spend per UTC calendar day, or ``None``.
        monthly_usd: The most the user may spend per UTC calendar month, or ``None``.
        revoked: Whether the user's token was revoked (it authenticates no more).
        requests_per_minute: The user's own requests per minute in the chat service (``0``
            for no limit), or ``None`` for the deployment's
            (``CHATCHAIN_SERVER_REQUESTS_PER_MINUTE``).
        streams: The user's own streams open at once (``0`` for no limit), or ``None`` for
            the deployment's (``CHATCHAIN_SERVER_STREAMS_PER_USER``).
    """

    name: str
    created_at: datetime
    budget_usd: float | None = None
    daily_usd: float | None = None
    monthly_usd: float | None = None
    revoked: bool = False
    requests_per_minute: int | None = None
    streams: int | None = None


def hash_token(token: str) -> str:
    """The SHA-256 hex digest of a token: what the store keeps instead of the token.

    Tokens are 256 bits from `secrets`, so they cannot be guessed or brute-forced from the
    hash: a slow password hash (bcrypt, argon2) would add nothing but cost per request.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _new_token() -> str:
    """A fresh bearer token: ``"cc_"`` and 256 random bits, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def validate_name(name: object) -> str:
    """Return ``name`` if it can name a user, else raise `InvalidInputError`."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise InvalidInputError(
            f"{name!r} cannot name a user: use 1 to 64 letters, digits and _ . @ -, "
            "starting with a letter or digit (e.g. alice or alice@example.com)."
        )
    return name


def _validate_rate(field: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(
            f"The {field} limit must be a whole number, 0 (no limit) or more, not {value!r}."
        )
    return value


def _validate_cap(field: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInputError(f"The {field} cap must be a number of USD, not {value!r}.")
    if value < 0:
        raise InvalidInputError(f"The {field} cap must be 0 or more USD, not {value!r}.")
    return float(value)


class Users:
    """The users of a store: add, authenticate, revoke, rotate and cap them.

    Args:
        store: A store that keeps users (`MemoryStore`, `SQLiteStore`, `RedisStore`,
            `PostgresStore`).

    Raises:
        ConfigurationError: The store keeps no users.
    """

    def __init__(self, store: HistoryStore) -> None:
        from chatchain.stores import UserBackend

        if not isinstance(store, UserBackend):
            raise ConfigurationError(
                f"The store {type(store).__name__} keeps no users: use memory://, "
                "sqlite:///path, redis://... or postgresql://... (CHATCHAIN_STORE), or a "
                "store that implements UserBackend."
            )
        self.store: UserBackend = store

    def add(
        self,
        name: str,
        *,
        budget_usd: float | None = None,
        daily_usd: float | None = None,
        monthly_usd: float | None = None,
        requests_per_minute: int | None = None,
        streams: int | None = None,
    ) -> str:
        """Add a user; return their token (the only time it is shown).

        ``requests_per_minute`` and ``streams`` override the chat service's limits for this
        user (``0``: no limit; ``None``: the deployment's).

        Raises:
            InvalidInputError: The name, a cap or a limit is unusable.
            UserExistsError: A user of that name exists (also when another process added it
                at the same moment: exactly one of them wins).
        """
        user = User(
            validate_name(name),
            datetime.now(UTC),
            budget_usd=_validate_cap("budget_usd", budget_usd),
            daily_usd=_validate_cap("daily_usd", daily_usd),
            monthly_usd=_validate_cap("monthly_usd", monthly_usd),
            requests_per_minute=_validate_rate("requests_per_minute", requests_per_minute),
            streams=_validate_rate("streams", streams),
        )
        token = _new_token()
        self.store.add_user(user, hash_token(token))
        return token

    def authenticate(self, token: str) -> User | None:
        """The user a bearer token belongs to; ``None`` when it is unknown, malformed or
        revoked."""
        return run(self._authenticate_flow(token))

    async def aauthenticate(self, token: str) -> User | None:
        """`authenticate` for async callers."""
        return await arun(self._authenticate_flow(token))

    def _authenticate_flow(self, token: str) -> Flow[User | None]:
        digest = _digest(token)
        if digest is None:
            return None
        return _check((yield call(self.store, "find_user", digest)), digest)

    def get(self, name: str) -> User | None:
        """The user of that name, or ``None``."""
        return self.store.get_user(name)

    def list(self) -> list[User]:
        """Every user, oldest first."""
        return self.store.list_users()

    def revoke(self, name: str) -> None:
        """Stop the user's token from working (`rotate` gives them a new one).

        Raises:
            UnknownUserError: No user of that name.
        """
        self._update(name, {"revoked": True})

    def rotate(self, name: str) -> str:
        """Give the user a new token and return it; the old one stops working at once.
        A revoked user is active again.

        Raises:
            UnknownUserError: No user of that name.
        """
        token = _new_token()
        self._update(name, {"revoked": False}, hash_token(token))
        return token

    def set_caps(
        self,
        name: str,
        *,
        budget_usd: float | EllipsisType | None = ...,
        daily_usd: float | EllipsisType | None = ...,
        monthly_usd: float | EllipsisType | None = ...,
        requests_per_minute: int | EllipsisType | None = ...,
        streams: int | EllipsisType | None = ...,
    ) -> User:
        """Change a user's caps and limits: a number sets one, ``None`` removes it (a limit
        then falls back to the deployment's), one not passed stays as it is. Returns the user
        as changed.

        Raises:
            InvalidInputError: A cap or limit is unusable.
            UnknownUserError: No user of that name.
        """
        given = {"budget_usd": budget_usd, "daily_usd": daily_usd, "monthly_usd": monthly_usd}
        changes: dict[str, Any] = {
            field: _validate_cap(field, value)
            for field, value in given.items()
            if value is not Ellipsis
        }
        rates = {"requests_per_minute": requests_per_minute, "streams": streams}
        changes |= {
            field: _validate_rate(field, value)
            for field, value in rates.items()
            if value is not Ellipsis
        }
        return self._update(name, changes)

    def limits(self, user: User, now: datetime | None = None) -> builtins.list[BudgetLimit]:
        """The user's caps as budget limits on the ``"user"`` scope: lifetime, then the
        current UTC day's and month's (pass them as a turn's ``limits``).

        Args:
            user: The user (as `authenticate` returned it).
            now: The moment whose day and month count (default: now). Naive times are UTC.
        """
        moment = datetime.now(UTC) if now is None else _utc(now)
        day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        limits = []
        for cap, since, period in (
            (user.budget_usd, None, "budget"),
            (user.daily_usd, day, "daily cap"),
            (user.monthly_usd, day.replace(day=1), "monthly cap"),
        ):
            if cap is not None:
                label = f"user {user.name}'s {period}"
                limits.append(BudgetLimit("user", user.name, cap, since=since, label=label))
        return limits

    def _update(self, name: str, changes: dict[str, Any], token_hash: str | None = None) -> User:
        user = self.store.update_user(name, changes, token_hash=token_hash)
        if user is None:
            raise UnknownUserError(
                f"There is no user {name!r}: see chatchain users list, or add them with "
                f"chatchain users add {name}."
            )
        return user


def _digest(token: object) -> str | None:
    if not isinstance(token, str) or _TOKEN.fullmatch(token) is None:
        return None
    return hash_token(token)


def _check(found: tuple[User, str] | None, digest: str) -> User | None:
    if found is None:
        return None
    user, stored = found
    # The store found the row by its hash already; comparing in constant time as well keeps
    # a store's lookup from ever being the only check.
    if not hmac.compare_digest(stored, digest) or user.revoked:
        return None
    return user


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
