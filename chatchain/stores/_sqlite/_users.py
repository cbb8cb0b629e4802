"""The SQLite store's users (`chatchain.users`): rows of ``users``, keyed by name and
found by their token's SHA-256 hash (the token itself is never stored)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from chatchain.stores._base import check_user_changes, user_exists
from chatchain.stores._sqlite._connection import _Connections, _stamp
from chatchain.users import User

__all__ = ["_Users"]


_USER_COLUMNS = (
    "name, created_at, budget_usd, daily_usd, monthly_usd, revoked, token_hash, "
    "requests_per_minute, streams"
)


def _user(row: Sequence[Any]) -> tuple[User, str]:
    """The user of a ``users`` row (`_USER_COLUMNS`), and their token's hash."""
    name, created, budget, daily, monthly, revoked, token_hash, per_minute, streams = row
    user = User(
        name,
        datetime.fromisoformat(created),
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
        with self._write("add a user") as conn:
            added = conn.execute(
                f"INSERT INTO users ({_USER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (name) DO NOTHING",
                (
                    user.name,
                    _stamp(user.created_at),
                    user.budget_usd,
                    user.daily_usd,
                    user.monthly_usd,
                    int(user.revoked),
                    token_hash,
                    user.requests_per_minute,
                    user.streams,
                ),
            ).rowcount
        if added != 1:
            raise user_exists(user.name)

    def get_user(self, name: str) -> User | None:
        with self._connection("read a user") as conn:
            row = conn.execute(
                f"SELECT {_USER_COLUMNS} FROM users WHERE name = ?", (name,)
            ).fetchone()
        return None if row is None else _user(row)[0]

    def find_user(self, token_hash: str) -> tuple[User, str] | None:
        with self._connection("find a user") as conn:
            row = conn.execute(
                f"SELECT {_USER_COLUMNS} FROM users WHERE token_hash = ?", (token_hash,)
            ).fetchone()
        return None if row is None else _user(row)

    def list_users(self) -> list[User]:
        with self._connection("list users") as conn:
            rows = conn.execute(
                f"SELECT {_USER_COLUMNS} FROM users ORDER BY created_at, name"
            ).fetchall()
        return [_user(row)[0] for row in rows]

    def update_user(
        self, name: str, changes: Mapping[str, Any], *, token_hash: str | None = None
    ) -> User | None:
        check_user_changes(changes)  # so only known column names go into the SQL
        values = {k: int(v) if k == "revoked" else v for k, v in changes.items()}
        if token_hash is not None:
            values["token_hash"] = token_hash
        with self._write("change a user") as conn:
            if values:
                conn.execute(
                    f"UPDATE users SET {', '.join(f'{k} = :{k}' for k in values)} "
                    "WHERE name = :name",
                    {**values, "name": name},
                )
            row = conn.execute(
                f"SELECT {_USER_COLUMNS} FROM users WHERE name = ?", (name,)
            ).fetchone()
        return None if row is None else _user(row)[0]
