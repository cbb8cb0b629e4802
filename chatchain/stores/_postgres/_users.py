"""The PostgreSQL store's users (`chatchain.users`).

Users (`chatchain.users`) are rows of ``<prefix>_users``, keyed by name and found by the
unique index on their token's SHA-256 hash (the token itself is never stored); adding one is
``INSERT ... ON CONFLICT DO NOTHING``, so of two processes adding one name exactly one wins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from chatchain.stores._base import check_user_changes, user_exists
from chatchain.stores._postgres._connection import _Connections
from chatchain.stores._postgres._sql import _aware, _utc
from chatchain.users import User

__all__ = ["_Users"]


def _user(row: Sequence[Any]) -> tuple[User, str]:
    """The user of a ``users`` row, and their token's hash."""
    name, created, budget, daily, monthly, revoked, token_hash, per_minute, streams = row
    user = User(
        name,
        _utc(created),
        budget,
        daily,
        monthly,
        bool(revoked),
        requests_per_minute=per_minute,
        streams=streams,
    )
    return user, token_hash


class _Users(_Connections):
    """The users of a chat service (`UserBackend`)."""

    def add_user(self, user: User, token_hash: str) -> None:
        row = (
            user.name,
            _aware(user.created_at),
            user.budget_usd,
            user.daily_usd,
            user.monthly_usd,
            user.revoked,
            token_hash,
            user.requests_per_minute,
            user.streams,
        )
        if not self._fetch(self._sql.add_user, row):
            raise user_exists(user.name)

    def get_user(self, name: str) -> User | None:
        rows = self._fetch(self._sql.get_user, (name,))
        return _user(rows[0])[0] if rows else None

    def find_user(self, token_hash: str) -> tuple[User, str] | None:
        rows = self._fetch(self._sql.find_user, (token_hash,))
        return _user(rows[0]) if rows else None

    def list_users(self) -> list[User]:
        return [_user(row)[0] for row in self._fetch(self._sql.list_users)]

    def update_user(
        self, name: str, changes: Mapping[str, Any], *, token_hash: str | None = None
    ) -> User | None:
        check_user_changes(changes)
        values = dict(changes) if token_hash is None else {**changes, "token_hash": token_hash}
        with self._connection() as conn, conn.transaction():
            for column, value in values.items():
                conn.execute(self._sql.update_user[column], {"value": value, "name": name})
            row = conn.execute(self._sql.get_user, (name,)).fetchone()
        return None if row is None else _user(row)[0]
