"""The Redis store's connections: the sync pool, an async client per event loop, Redis
errors as `StoreError`, and how keys are named and times kept.

Writes that touch several keys run as one MULTI/EXEC transaction: if the connection drops
before EXEC, Redis discards the lot. The ledger's writes are Lua scripts, for the same
all-or-nothing plus decisions taken inside (a duplicate entry, a budget check that spans
processes); each does its first write before any other so that a server out of memory
refuses the whole script. The clients never retry on their own, because a write whose reply
was lost may have been applied and must not be applied twice.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

from chatchain._locks import SessionLocks
from chatchain.errors import StoreError

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    import redis.commands.core

    _Pipeline = redis.client.Pipeline | redis.asyncio.client.Pipeline

__all__ = ["_Connections", "_micros", "_moment", "_redacted"]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


# Connecting is quick or broken; a command can wait on a busy server a little longer. Both
# can be changed in the URL (?socket_connect_timeout=...&socket_timeout=...).
_CONNECT_TIMEOUT_S = 5.0
_IO_TIMEOUT_S = 15.0


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


def _moment(micros: str | int) -> datetime:
    return _EPOCH + int(micros) * _MICROSECOND


def _redacted(url: str) -> str:
    """The URL without its password or query (which may hold one)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username}@{host}" if parts.username else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _Connections:
    """What every part of `RedisStore` runs its commands through: the clients, the key of
    each thing, and Redis errors as `StoreError`. `RedisStore.__init__` sets the attributes."""

    url: str
    prefix: str
    lock_timeout: float
    lease: float
    _where: str  # the URL without its password
    _client: redis.Redis
    _created: str
    _updated: str
    _ids: str
    _entries: str
    _seq: str
    _holds: str
    _expiry: str
    _users: str
    _pending: list[str]
    _record_script: redis.commands.core.Script
    _commit_script: redis.commands.core.Script
    _index_script: redis.commands.core.Script
    _hold_script: redis.commands.core.Script
    _release_script: redis.commands.core.Script
    _add_user_script: redis.commands.core.Script
    _update_user_script: redis.commands.core.Script
    _find_user_script: redis.commands.core.Script
    _write_pending_script: redis.commands.core.Script
    _drop_pending_script: redis.commands.core.Script
    _count_script: redis.commands.core.Script
    _take_script: redis.commands.core.Script
    _renew_script: redis.commands.core.Script
    _locks: SessionLocks
    _guard: threading.Lock
    _aclients: dict[
        asyncio.AbstractEventLoop, tuple[redis.asyncio.Redis, AsyncGenerator[None, None]]
    ]

    def _key(self, kind: str, session_id: str) -> str:
        return f"{self.prefix}:{kind}:{quote(session_id, safe='')}"

    @contextmanager
    def _failures(self) -> Iterator[None]:
        """Redis errors as `StoreError`, naming the server (never the password)."""
        from redis import exceptions

        try:
            yield
        except (exceptions.ConnectionError, exceptions.TimeoutError) as exc:
            raise StoreError(
                f"Could not reach the Redis history store at {self._where} ({exc}). Check that "
                "redis-server is running and reachable there, and the store URL and its "
                "credentials (CHATCHAIN_STORE)."
            ) from exc
        except exceptions.RedisError as exc:
            raise StoreError(
                f"The Redis history store at {self._where} refused the operation ({exc}). "
                "Check the server's log: its memory (maxmemory), its disk (MISCONF), and that "
                "it is a writable primary."
            ) from exc

    def _run(self, queue: Callable[[_Pipeline], object], *, transaction: bool = True) -> list[Any]:
        with self._failures(), self._client.pipeline(transaction=transaction) as pipe:
            queue(pipe)
            return pipe.execute()

    async def _arun(
        self, queue: Callable[[_Pipeline], object], *, transaction: bool = True
    ) -> list[Any]:
        with self._failures():
            client = await self._aclient()
            async with client.pipeline(transaction=transaction) as pipe:
                queue(pipe)
                return await pipe.execute()

    # -- async clients, one per event loop ---------------------------------------------------

    async def _aclient(self) -> redis.asyncio.Redis:
        """This event loop's client: async connections belong to the loop that opened them."""
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        loop = asyncio.get_running_loop()
        with self._guard:
            entry = self._aclients.get(loop)
            if entry is not None:
                return entry[0]
            client = redis.asyncio.Redis.from_url(
                self.url,
                decode_responses=True,
                retry=Retry(NoBackoff(), 0),
                socket_connect_timeout=_CONNECT_TIMEOUT_S,
                socket_timeout=_IO_TIMEOUT_S,
            )
            closer = self._close_with_loop(loop, client)
            self._aclients[loop] = (client, closer)
        await closer.__anext__()
        return client

    async def _close_with_loop(
        self, loop: asyncio.AbstractEventLoop, client: redis.asyncio.Redis
    ) -> AsyncGenerator[None, None]:
        # An async generator left suspended is closed by the loop's shutdown_asyncgens(),
        # which asyncio.run (and asyncio.Runner) await before closing the loop: the one hook
        # that lets the client close its connections while their loop can still run.
        try:
            yield
        finally:
            with self._guard:
                self._aclients.pop(loop, None)
            await client.aclose()

    async def aclose(self) -> None:
        """Close this event loop's connections now, rather than when the loop shuts down."""
        with self._guard:
            entry = self._aclients.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            await entry[1].aclose()

    def close(self) -> None:
        """Close the sync connection pool (it reopens if the store is used again).

        Async connections close with their event loop, or with `aclose`.
        """
        self._client.close()

    def _eval(self, script: redis.commands.core.Script, keys: list[str], args: list[str]) -> Any:
        with self._failures():
            return script(keys=keys, args=args)

    async def _aeval(self, script: str, keys: list[str], args: list[str]) -> Any:
        with self._failures():
            client = await self._aclient()
            return await client.register_script(script)(keys=keys, args=args)
