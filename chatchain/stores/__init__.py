"""History stores: where sessions live. One module per backend; drivers are extras.

Pick one by URL with `open_store`:

- ``memory://``: this process's memory (the library's default);
- ``sqlite:///path/to/chat.db``: one embedded, persistent file (the terminal chat's default);
- ``redis://host:6379/0``: Redis, for many processes or machines (``chatchain[redis]``);
- ``postgresql://user@host/db``: PostgreSQL, likewise (``chatchain[postgres]``).

`SQLiteStore`, `RedisStore` and `PostgresStore` are imported on first use (their modules
load no driver until a store is built; building one without its driver raises an error that
says which ``pip install`` fixes it).

The contract is four small ones (`HistoryBackend`, `SummaryBackend`, `LockBackend`,
`LedgerBackend`); `HistoryStore` combines them. A store that implements only
`HistoryBackend` works too: `as_store` completes it in this process (see
``docs/writing-a-store.md``).
"""

from __future__ import annotations

import importlib
import inspect
import typing
from typing import Any

from chatchain import errors
from chatchain.stores._base import (
    Fence,
    HistoryBackend,
    HistoryStore,
    LedgerBackend,
    LockBackend,
    SessionInfo,
    StoreHistory,
    Summary,
    SummaryBackend,
    TitleBackend,
    UserBackend,
    dump_message,
    load_message,
)
from chatchain.stores._composed import as_store
from chatchain.stores._memory import MemoryStore

if typing.TYPE_CHECKING:
    from chatchain.stores._postgres import PostgresStore
    from chatchain.stores._redis import RedisStore
    from chatchain.stores._sqlite import SQLiteStore

__all__ = [
    "Fence",
    "HistoryBackend",
    "HistoryStore",
    "LedgerBackend",
    "LockBackend",
    "MemoryStore",
    "PostgresStore",
    "RedisStore",
    "SQLiteStore",
    "SessionInfo",
    "StoreHistory",
    "Summary",
    "SummaryBackend",
    "TitleBackend",
    "UserBackend",
    "as_store",
    "dump_message",
    "load_message",
    "open_store",
]

# The stores imported on first use: name -> module.
_LAZY = {
    "PostgresStore": "chatchain.stores._postgres",
    "RedisStore": "chatchain.stores._redis",
    "SQLiteStore": "chatchain.stores._sqlite",
}

# URL scheme -> the store class that opens it.
_SCHEMES = {
    "memory": "MemoryStore",
    "sqlite": "SQLiteStore",
    "redis": "RedisStore",
    "rediss": "RedisStore",
    "unix": "RedisStore",
    "postgresql": "PostgresStore",
    "postgres": "PostgresStore",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def open_store(url: str, *, lock_timeout: float = 120.0, **options: Any) -> HistoryStore:
    """The store a URL names, built with the store's own options.

    Args:
        url: ``memory://``, ``sqlite:///path``, ``redis://host:port/db`` or
            ``postgresql://user@host/db``.
        lock_timeout: How long a turn waits for a session another turn holds, in seconds.
        **options: The options of the store the URL names (for instance ``lease`` for
            SQLite and Redis, ``prefix`` for Redis, ``table_prefix``, ``min_size`` and
            ``max_size`` for PostgreSQL); see each store's class.

    Raises:
        ConfigurationError: The URL's scheme is unknown, an option is not one of its
            store's, or its driver is not installed (the message says which
            ``pip install`` fixes it).

    Example:
        >>> open_store("memory://")  # doctest: +ELLIPSIS
        <chatchain.stores._memory.MemoryStore object at ...>
    """
    scheme = url.split(":", 1)[0].lower()
    name = _SCHEMES.get(scheme)
    if name is None:
        raise errors.ConfigurationError(
            f"Unknown store URL {url.split('://', 1)[0]}://...: use memory://, sqlite:///path, "
            "redis://host:port/db or postgresql://user@host/db (CHATCHAIN_STORE)."
        )
    if name == "MemoryStore":
        build: Any = MemoryStore
        accepted: set[str] = set()
    else:
        build = __getattr__(name).from_url
        accepted = set(inspect.signature(build).parameters) - {"url", "lock_timeout"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        takes = ", ".join(sorted(accepted)) or "none"
        raise errors.ConfigurationError(
            f"{name} has no option {', '.join(unknown)} (its options: {takes}): "
            "drop it, or check the store the URL names."
        )
    if name == "MemoryStore":
        return MemoryStore(lock_timeout=lock_timeout)
    store: HistoryStore = build(url, lock_timeout=lock_timeout, **options)
    return store
