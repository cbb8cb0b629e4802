"""The Redis store's users, those of a chat service (`chatchain.users`):

- ``<prefix>:user:<name>``: HASH of ``name``, ``created`` (microseconds since the epoch),
  ``budget``, ``daily``, ``monthly`` (USD, ``''`` for no cap), ``revoked`` (``0``/``1``),
  ``hash`` (the SHA-256 of the user's token; the token itself is never stored) and
  ``requests_per_minute``, ``streams`` (the user's own limits, ``''`` for the deployment's);
- ``<prefix>:token:<hash>``: STRING, the key of the user the token belongs to;
- ``<prefix>:users``: ZSET of names scored by creation, for listing.

Adding and changing a user are Lua scripts, so two processes adding one name cannot both win
and a rotated token's old hash is gone in the same step as the new one appears.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from chatchain.errors import StoreError
from chatchain.stores._base import check_user_changes, user_exists
from chatchain.stores._redis._connection import _Connections, _micros, _moment
from chatchain.users import User

if TYPE_CHECKING:
    from chatchain.stores._redis._connection import _Pipeline


__all__ = ["_ADD_USER", "_FIND_USER", "_UPDATE_USER", "_Users"]


# Add a user unless the name is taken. KEYS: user, token, users. ARGV: name, created (us),
# budget, daily, monthly, revoked, token hash, requests per minute, streams. Returns 1 when
# added, 0 when the name is taken.
_ADD_USER = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'name', ARGV[1], 'created', ARGV[2], 'budget', ARGV[3],
  'daily', ARGV[4], 'monthly', ARGV[5], 'revoked', ARGV[6], 'hash', ARGV[7],
  'requests_per_minute', ARGV[8], 'streams', ARGV[9])
redis.call('SET', KEYS[2], KEYS[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
"""

# Change a user. KEYS: user. ARGV: start of token keys, new token hash ('' to keep it), then
# (field, value) pairs. Returns the user's fields (HGETALL), or nil for no such user.
_UPDATE_USER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if ARGV[2] ~= '' then
  local old = redis.call('HGET', KEYS[1], 'hash')
  if old then redis.call('DEL', ARGV[1] .. old) end
  redis.call('SET', ARGV[1] .. ARGV[2], KEYS[1])
  redis.call('HSET', KEYS[1], 'hash', ARGV[2])
end
for a = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[a], ARGV[a + 1]) end
return redis.call('HGETALL', KEYS[1])
"""

# The user a token hash names. KEYS: token. Returns the user's fields, or nil.
_FIND_USER = """
local user = redis.call('GET', KEYS[1])
if not user then return false end
return redis.call('HGETALL', user)
"""


def _cap(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _rate(value: int | None) -> str:
    return "" if value is None else str(int(value))


def _user_fields(value: object) -> str:
    """A `User` field as a user HASH keeps it."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return _rate(value)
    return _cap(value)  # type: ignore[arg-type]


def _user(fields: list[str] | dict[str, str] | None) -> tuple[User, str] | None:
    """The user of a user HASH (HGETALL's reply), and their token's hash."""
    if not fields:
        return None
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))

    def cap(name: str) -> float | None:
        return float(fields[name]) if fields.get(name) else None

    def rate(name: str) -> int | None:
        return int(fields[name]) if fields.get(name) else None

    user = User(
        fields["name"],
        _moment(fields["created"]),
        budget_usd=cap("budget"),
        daily_usd=cap("daily"),
        monthly_usd=cap("monthly"),
        revoked=fields.get("revoked") == "1",
        requests_per_minute=rate("requests_per_minute"),
        streams=rate("streams"),
    )
    return user, fields["hash"]


# `User` fields -> user HASH fields.
_USER_FIELDS = {
    "budget_usd": "budget",
    "daily_usd": "daily",
    "monthly_usd": "monthly",
    "revoked": "revoked",
    "requests_per_minute": "requests_per_minute",
    "streams": "streams",
}


class _Users(_Connections):
    """The users of a chat service (`UserBackend`)."""

    def _token_key(self, token_hash: str) -> str:
        return f"{self.prefix}:token:{token_hash}"

    def _user_failures(self, fields: Any) -> tuple[User, str] | None:
        try:
            return _user(fields)
        except (KeyError, ValueError, TypeError) as exc:
            raise StoreError(
                f"A user in the Redis history store at {self._where} holds data chatchain did "
                f"not write ({exc!r}). Check what else writes keys under {self.prefix!r}:user."
            ) from exc

    def add_user(self, user: User, token_hash: str) -> None:
        keys = [self._key("user", user.name), self._token_key(token_hash), self._users]
        args = [
            user.name,
            str(_micros(user.created_at)),
            _cap(user.budget_usd),
            _cap(user.daily_usd),
            _cap(user.monthly_usd),
            _user_fields(user.revoked),
            token_hash,
            _rate(user.requests_per_minute),
            _rate(user.streams),
        ]
        if not int(self._eval(self._add_user_script, keys, args)):
            raise user_exists(user.name)

    def get_user(self, name: str) -> User | None:
        key = self._key("user", name)
        [fields] = self._run(lambda pipe: pipe.hgetall(key), transaction=False)
        found = self._user_failures(fields)
        return None if found is None else found[0]

    def find_user(self, token_hash: str) -> tuple[User, str] | None:
        fields = self._eval(self._find_user_script, [self._token_key(token_hash)], [])
        return self._user_failures(fields)

    def list_users(self) -> list[User]:
        [names] = self._run(lambda pipe: pipe.zrange(self._users, 0, -1), transaction=False)

        def queue(pipe: _Pipeline) -> None:
            for name in names:
                pipe.hgetall(self._key("user", name))

        users = [self._user_failures(fields) for fields in self._run(queue, transaction=False)]
        return [found[0] for found in users if found is not None]

    def update_user(
        self, name: str, changes: Mapping[str, Any], *, token_hash: str | None = None
    ) -> User | None:
        check_user_changes(changes)
        args = [self._token_key(""), token_hash or ""]
        for field, value in changes.items():
            args += [_USER_FIELDS[field], _user_fields(value)]
        fields = self._eval(self._update_user_script, [self._key("user", name)], args)
        found = self._user_failures(fields)
        return None if found is None else found[0]
