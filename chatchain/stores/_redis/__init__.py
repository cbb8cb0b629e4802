"""The Redis store: sessions on a stock Redis server, shared by many processes and machines.

We do not wrap a ready integration: langchain-redis needs the Redis Stack modules (RedisJSON,
RediSearch) and langchain-community's ``RedisChatMessageHistory`` loads whole sessions and
prepends with LPUSH, while chatchain needs a stock server, any string id and windowed loads.

The store is one class composed of a part per contract, each in a module of its own (each
module's docstring shows its keys, all under the store's prefix):

- `_connection`: the sync pool, an async client per event loop, and Redis errors as
  `StoreError`;
- `_history`: messages, sessions, running summaries and titles;
- `_ledger`: the usage ledger and budget holds, with their Lua scripts;
- `_commit`: `commit_turn`, a whole turn in one Lua script fenced by the session lock;
- `_pending`: the write-ahead records of turns in flight;
- `_users`: the users of a chat service;
- `_throttle`: each user's requests per minute and open streams (`ThrottleBackend`);
- `_locks`: one writer per session, by a renewed lease.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from chatchain._locks import SessionLocks
from chatchain.errors import ConfigurationError
from chatchain.stores._base import (
    DEFAULT_LEASE,
    HistoryStore,
    ThrottleBackend,
    TitleBackend,
    UserBackend,
    driver_missing,
)
from chatchain.stores._redis._commit import _COMMIT, _Commit
from chatchain.stores._redis._connection import _CONNECT_TIMEOUT_S, _IO_TIMEOUT_S, _redacted
from chatchain.stores._redis._history import _INDEX_IDS, _History
from chatchain.stores._redis._ledger import _HOLD, _RECORD, _RELEASE, _Ledger
from chatchain.stores._redis._locks import _Locks
from chatchain.stores._redis._pending import _DROP_PENDING, _WRITE_PENDING, _Pending
from chatchain.stores._redis._throttle import (
    _COUNT_REQUEST,
    _RENEW_STREAM,
    _TAKE_STREAM,
    _Throttle,
)
from chatchain.stores._redis._users import _ADD_USER, _FIND_USER, _UPDATE_USER, _Users

if TYPE_CHECKING:
    import redis
    import redis.asyncio

__all__ = ["RedisStore"]


_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class RedisStore(
    _History,
    _Commit,
    _Ledger,
    _Locks,
    _Pending,
    _Users,
    _Throttle,
    HistoryStore,
    UserBackend,
    TitleBackend,
    ThrottleBackend,
):
    """Sessions in Redis, shared by every process and machine that uses the server.

    Needs ``pip install 'chatchain[redis]'`` and any stock Redis server (no modules). The
    store connects lazily; sync calls share one connection pool, and async calls use a pool
    per event loop that is closed when the loop shuts down (as `asyncio.run` does).

    One turn per session at a time, across processes: `lock` takes the session's in-process
    lock, then a Redis lock whose lease (``lease`` seconds) is renewed every third of the
    lease while the turn lasts. A turn may thus run as long as it needs, and a process that
    dies holding a session keeps it for at most ``lease`` seconds.

    Args:
        url: ``redis://[[user]:password@]host:port/db``, ``rediss://`` for TLS, or
            ``unix:///path/to/redis.sock?db=0``.
        lock_timeout: How long a turn waits for a busy session before `SessionBusyError`.
        prefix: Start of every key (letters, digits, ``_``, ``.``, ``-``), so that several
            stores or applications can share one database.
        lease: Seconds a session's lock outlives a holder that died without releasing it.

    Raises:
        ConfigurationError: The driver is missing, or the URL or an argument is invalid.

    Example:
        >>> store = RedisStore("redis://127.0.0.1:6379/0", prefix="myapp")
        >>> store
        RedisStore('redis://127.0.0.1:6379/0', prefix='myapp')
        >>> with store.lock("dp123"):  # doctest: +SKIP
        ...     window = store.load("dp123", -20)
        ...     store.append("dp123", [HumanMessage("hi"), AIMessage("hello")])
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        lock_timeout: float = 120.0,
        prefix: str = "chatchain",
        lease: float = DEFAULT_LEASE,
    ) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:
            raise driver_missing("Redis", "redis", exc) from exc
        if not _PREFIX.fullmatch(prefix):
            raise ConfigurationError(
                f"Invalid Redis key prefix {prefix!r}: use 1 to 64 letters, digits, '_', '.' "
                "or '-' (a ':' could make two stores' keys meet)."
            )
        if lock_timeout < 0 or lease <= 0:
            raise ConfigurationError(
                "The Redis store needs lock_timeout >= 0 and lease > 0 (seconds)."
            )
        self.url = url
        self.prefix = prefix
        self.lock_timeout = lock_timeout
        self.lease = lease
        self._where = _redacted(url)
        try:
            self._client: redis.Redis = redis.Redis.from_url(
                url,
                decode_responses=True,
                retry=Retry(NoBackoff(), 0),
                socket_connect_timeout=_CONNECT_TIMEOUT_S,
                socket_timeout=_IO_TIMEOUT_S,
            )
        except ValueError as exc:
            raise ConfigurationError(
                f"Invalid Redis URL {self._where}: {exc} (expected redis://host:port/db)."
            ) from None
        self._created = f"{prefix}:created"
        self._updated = f"{prefix}:updated"
        self._ids = f"{prefix}:ids"
        self._entries = f"{prefix}:usage:entries"
        self._seq = f"{prefix}:usage:seq"
        self._holds = f"{prefix}:holds"
        self._expiry = f"{prefix}:holds:expiry"
        # Script objects send EVALSHA, and the script itself once if the server lacks it.
        self._record_script = self._client.register_script(_RECORD)
        self._commit_script = self._client.register_script(_COMMIT)
        self._index_script = self._client.register_script(_INDEX_IDS)
        self._hold_script = self._client.register_script(_HOLD)
        self._release_script = self._client.register_script(_RELEASE)
        self._add_user_script = self._client.register_script(_ADD_USER)
        self._update_user_script = self._client.register_script(_UPDATE_USER)
        self._find_user_script = self._client.register_script(_FIND_USER)
        self._users = f"{prefix}:users"
        self._pending = [f"{prefix}:pending", f"{prefix}:pending:records"]
        self._write_pending_script = self._client.register_script(_WRITE_PENDING)
        self._drop_pending_script = self._client.register_script(_DROP_PENDING)
        self._count_script = self._client.register_script(_COUNT_REQUEST)
        self._take_script = self._client.register_script(_TAKE_STREAM)
        self._renew_script = self._client.register_script(_RENEW_STREAM)
        self._locks = SessionLocks(lock_timeout)
        self._guard = threading.Lock()
        self._aclients: dict[
            asyncio.AbstractEventLoop,
            tuple[redis.asyncio.Redis, AsyncGenerator[None, None]],
        ] = {}

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        lock_timeout: float = 120.0,
        prefix: str = "chatchain",
        lease: float = DEFAULT_LEASE,
    ) -> RedisStore:
        """The store at ``url`` (see `chatchain.stores.open_store`)."""
        return cls(url, lock_timeout=lock_timeout, prefix=prefix, lease=lease)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._where!r}, prefix={self.prefix!r})"
