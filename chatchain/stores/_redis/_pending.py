"""The Redis store's write-ahead records of turns in flight (`chatchain._pending`): the
``<prefix>:pending`` HASH of each session's turn token and ``<prefix>:pending:records`` of
its record, both keyed by raw session id."""

from __future__ import annotations

from typing import cast

from chatchain.stores._redis._connection import _Connections

__all__ = ["_DROP_PENDING", "_WRITE_PENDING", "_Pending"]


# The write-ahead record of a session's turn in flight (`chatchain._pending`). KEYS: the
# tokens hash, the records hash (both keyed by raw session id). ARGV: session id, token,
# record. Stored when the session has none, replaced when it is the same token's; 1 if so.
_WRITE_PENDING = """
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held and held ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
"""

# Drop it if it is the token's. KEYS and ARGV as above, without the record. 1 if dropped.
_DROP_PENDING = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""


class _Pending(_Connections):
    """The write-ahead records of `HistoryStore.write_pending` and its kin."""

    def write_pending(self, session_id: str, token: str, record: str) -> bool:
        args = [session_id, token, record]
        return bool(self._eval(self._write_pending_script, self._pending, args))

    async def awrite_pending(self, session_id: str, token: str, record: str) -> bool:
        return bool(await self._aeval(_WRITE_PENDING, self._pending, [session_id, token, record]))

    def read_pending(self, session_id: str) -> tuple[str, str] | None:
        token, record = self._run(
            lambda pipe: [pipe.hget(key, session_id) for key in self._pending]
        )
        return None if token is None or record is None else (token, record)

    async def aread_pending(self, session_id: str) -> tuple[str, str] | None:
        token, record = await self._arun(
            lambda pipe: [pipe.hget(key, session_id) for key in self._pending]
        )
        return None if token is None or record is None else (token, record)

    def drop_pending(self, session_id: str, token: str) -> bool:
        return bool(self._eval(self._drop_pending_script, self._pending, [session_id, token]))

    async def adrop_pending(self, session_id: str, token: str) -> bool:
        return bool(await self._aeval(_DROP_PENDING, self._pending, [session_id, token]))

    def pending_sessions(self) -> list[str]:
        with self._failures():
            return sorted(cast("list[str]", self._client.hkeys(self._pending[0])))
