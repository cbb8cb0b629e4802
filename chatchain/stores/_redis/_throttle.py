"""The Redis store's throttle (`ThrottleBackend`):

- ``<prefix>:throttle:requests:<user>``: ZSET of the user's requests in the moving window,
  scored by when they were counted (Unix seconds of the server's clock);
- ``<prefix>:throttle:streams:<user>``: ZSET of the user's stream slots, scored by when their
  lease expires.

Each check is one Lua script (one round trip): it drops what has left the window or expired,
counts what is left and adds the new entry only under the limit, so the instances sharing
the server never let more through than the limit between them. Both keys expire when the
user has been idle for a window or a lease, so idle users leave nothing behind.

The ``limits`` library (which the in-process counter uses) has a Redis storage too; it
opens its own connection pool from a URL and keys of its own, where these scripts ride on the
store's connections, prefix, timeouts and error handling (`StoreError`).
"""

from __future__ import annotations

import uuid

from chatchain.stores._redis._connection import _Connections

__all__ = ["_COUNT_REQUEST", "_RENEW_STREAM", "_TAKE_STREAM", "_Throttle"]

# The server's clock, in Unix seconds (TIME: seconds and microseconds).
_NOW = """
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
"""

# KEYS: requests. ARGV: limit, window (s), a unique member. Returns nil when counted, else the
# seconds until the oldest request leaves the window (as a string: Lua numbers are truncated).
_COUNT_REQUEST = (
    _NOW
    + """
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return tostring(tonumber(oldest[2]) + window - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
return false
"""
)

# KEYS: streams. ARGV: limit, lease (s), slot. Returns 1 when the slot was taken, else 0.
_TAKE_STREAM = (
    _NOW
    + """
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(lease * 1000))
return 1
"""
)

# KEYS: streams. ARGV: lease (s), slot. Returns 1 when the slot was still held, else 0.
_RENEW_STREAM = (
    _NOW
    + """
local lease = tonumber(ARGV[1])
local expires = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not expires or tonumber(expires) <= now then return 0 end
redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(lease * 1000))
return 1
"""
)


class _Throttle(_Connections):
    """Requests per minute and open streams per user (`ThrottleBackend`)."""

    def _throttle_key(self, kind: str, user: str) -> str:
        return self._key(f"throttle:{kind}", user)

    def count_request(self, user: str, limit: int, window: float) -> float | None:
        args = [str(limit), repr(float(window)), uuid.uuid4().hex]
        wait = self._eval(self._count_script, [self._throttle_key("requests", user)], args)
        return None if wait is None else max(0.0, float(wait))

    async def acount_request(self, user: str, limit: int, window: float) -> float | None:
        args = [str(limit), repr(float(window)), uuid.uuid4().hex]
        wait = await self._aeval(_COUNT_REQUEST, [self._throttle_key("requests", user)], args)
        return None if wait is None else max(0.0, float(wait))

    def take_stream(self, user: str, slot: str, limit: int, lease: float) -> bool:
        args = [str(limit), repr(float(lease)), slot]
        return bool(self._eval(self._take_script, [self._throttle_key("streams", user)], args))

    async def atake_stream(self, user: str, slot: str, limit: int, lease: float) -> bool:
        args = [str(limit), repr(float(lease)), slot]
        key = self._throttle_key("streams", user)
        return bool(await self._aeval(_TAKE_STREAM, [key], args))

    def renew_stream(self, user: str, slot: str, lease: float) -> bool:
        args = [repr(float(lease)), slot]
        return bool(self._eval(self._renew_script, [self._throttle_key("streams", user)], args))

    async def arenew_stream(self, user: str, slot: str, lease: float) -> bool:
        key = self._throttle_key("streams", user)
        return bool(await self._aeval(_RENEW_STREAM, [key], [repr(float(lease)), slot]))

    def release_stream(self, user: str, slot: str) -> None:
        key = self._throttle_key("streams", user)
        self._run(lambda pipe: pipe.zrem(key, slot), transaction=False)

    async def arelease_stream(self, user: str, slot: str) -> None:
        key = self._throttle_key("streams", user)
        await self._arun(lambda pipe: pipe.zrem(key, slot), transaction=False)
