"""History stores: where sessions live. One module or package per backend; drivers are extras.

Pick one by URL with `open_store`:

- ``memory://``: this process's memory (the library's default);
- ``sqlite:///path/to/chat.db``: one embedded, persistent file (the terminal chat's default);
- ``redis://host:6379/0``: Redis, for many processes or machines (``chatchain[redis]``);
- ``postgresql://user@host/db``: PostgreSQL, likewise (``chatchain[postgres]``);
- ``myscheme://...``: a store an installed package adds, by an entry point in the
  ``chatchain.stores`` group (see `chatchain.stores._schemes` and ``docs/writing-a-store.md``).

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
import typing
from typing import Any

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
    ThrottleBackend,
    TitleBackend,
    UserBackend,
    dump_message,
    load_message,
)
from chatchain.stores._composed import as_store
from chatchain.stores._memory import MemoryStore
from chatchain.stores._schemes import open_store

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
    "ThrottleBackend",
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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
