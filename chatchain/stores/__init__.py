"""History stores: where sessions live. One module per backend; drivers are extras.

Pick one by URL with `open_store`:

- ``memory://``: this process's memory (the library's default);
- ``sqlite:///path/to/chat.db``: one embedded, persistent file (the terminal chat's default);
- ``redis://host:6379/0``: Redis, for many processes or machines (``chatchain[redis]``);
- ``postgresql://user@host/db``: PostgreSQL, likewise (``chatchain[postgres]``).
"""

from __future__ import annotations

from chatchain import errors
from chatchain.stores._base import Fence, HistoryStore, SessionInfo, StoreHistory, Summary
from chatchain.stores._memory import MemoryStore

__all__ = [
    "Fence",
    "HistoryStore",
    "MemoryStore",
    "SessionInfo",
    "StoreHistory",
    "Summary",
    "open_store",
]


def open_store(url: str, *, lock_timeout: float = 120.0) -> HistoryStore:
    """The store a URL names.

    Raises:
        ConfigurationError: The URL's scheme is unknown, or its driver is not installed
            (the message says which ``pip install`` fixes it).

    Example:
        >>> open_store("memory://")  # doctest: +ELLIPSIS
        <chatchain.stores._memory.MemoryStore object at ...>
    """
    scheme = url.split(":", 1)[0].lower()
    if scheme == "memory":
        return MemoryStore(lock_timeout=lock_timeout)
    if scheme == "sqlite":
        from chatchain.stores._sqlite import SQLiteStore

        return SQLiteStore.from_url(url, lock_timeout=lock_timeout)
    if scheme in ("redis", "rediss", "unix"):
        from chatchain.stores._redis import RedisStore

        return RedisStore.from_url(url, lock_timeout=lock_timeout)
    if scheme in ("postgresql", "postgres"):
        from chatchain.stores._postgres import PostgresStore

        return PostgresStore.from_url(url, lock_timeout=lock_timeout)
    raise errors.ConfigurationError(
        f"Unknown store URL {url.split('://', 1)[0]}://...: use memory://, sqlite:///path, "
        "redis://host:port/db or postgresql://user@host/db (CHATCHAIN_STORE)."
    )
