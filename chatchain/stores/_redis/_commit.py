"""The Redis store's `commit_turn`: a finished turn in one Lua script.

A turn is saved by one Lua script (`RedisStore.commit_turn`): it checks that the session's
lock key still holds the turn's token, records the usage entry and drops the budget hold,
then appends the messages only if the lock was still the turn's. Redis does not undo a
script's earlier writes when a later command fails, so the script checks the types of the
keys it writes before writing anything.
"""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.messages import BaseMessage

from chatchain.stores._base import Fence, dump_message, lock_lost, utcnow
from chatchain.stores._redis._connection import _micros
from chatchain.stores._redis._ledger import _DROP_HOLD, _RECORD_ENTRY, _Ledger
from chatchain.usage import UsageEntry

__all__ = ["_COMMIT", "_Commit"]


# A whole turn: its messages, its entry and the end of its hold, fenced by the session lock.
# KEYS: lock, msgs, meta, created, updated, ids, then `record_entry`'s keys (if there is an entry)
#       or holds and holds expiry (if not).
# ARGV: lock token ('' for no fence), time (us), raw session id, hold to drop ('' for none),
#       number of messages n, the n messages, then `record_entry`'s arguments (if any).
# Returns 0 when the lock was lost (the messages are not written, the entry is), else 1.
# A server out of memory refuses the first write, so the whole script (see record_entry).
_COMMIT = (
    _DROP_HOLD
    + _RECORD_ENTRY
    + """
local token, stamp, sid, release = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local n = tonumber(ARGV[5])
local held = token == '' or redis.call('GET', KEYS[1]) == token
-- Redis does not undo a script's earlier writes when a later command fails: refuse keys of
-- the wrong type (written by something else) before writing anything.
if held and n > 0 then
  for k, kind in pairs({[2] = 'list', [3] = 'hash'}) do
    local found = redis.call('TYPE', KEYS[k]).ok
    if found ~= 'none' and found ~= kind then
      return redis.error_reply('WRONGTYPE ' .. KEYS[k] .. ' holds a ' .. found)
    end
  end
end
local rest_keys, rest_args = {}, {}
for k = 7, #KEYS do rest_keys[#rest_keys + 1] = KEYS[k] end
for a = 6 + n, #ARGV do rest_args[#rest_args + 1] = ARGV[a] end
local fresh = 1  -- 0: the entry is in the ledger, so this turn was saved before (a replay)
if #rest_args > 0 then
  fresh = record_entry(rest_keys, rest_args)
elseif release ~= '' then
  drop_hold(rest_keys[1], rest_keys[2], release)
end
if not held then return 0 end
if n > 0 and fresh == 1 then
  local messages = {}
  for a = 6, 5 + n do messages[#messages + 1] = ARGV[a] end
  -- RPUSH takes at most a few thousand arguments at once from Lua (unpack's limit).
  for first = 1, n, 1000 do
    redis.call('RPUSH', KEYS[2], unpack(messages, first, math.min(first + 999, n)))
  end
  redis.call('HSETNX', KEYS[3], 'created', stamp)
  redis.call('HSET', KEYS[3], 'updated', stamp)
  redis.call('ZADD', KEYS[4], 'NX', stamp, sid)
  redis.call('ZADD', KEYS[5], stamp, sid)
  redis.call('ZADD', KEYS[6], 0, sid)
end
return 1
"""
)


class _Commit(_Ledger):
    """A turn's messages, usage entry and the end of its budget hold, in one script fenced
    by the session's lock (`HistoryStore.commit_turn`)."""

    def _commit_call(
        self,
        session_id: str,
        messages: Sequence[BaseMessage],
        entry: UsageEntry | None,
        release: str | None,
        fence: Fence | None,
    ) -> tuple[list[str], list[str]]:
        """The keys and arguments of `_COMMIT`."""
        payloads = [dump_message(m) for m in messages]
        keys = [
            self._key("lock", session_id),
            self._key("msgs", session_id),
            self._key("meta", session_id),
            self._created,
            self._updated,
            self._ids,
        ]
        args = [
            "" if fence is None else fence.token,
            str(_micros(utcnow())),
            session_id,
            release or "",
            str(len(payloads)),
            *payloads,
        ]
        if entry is None:
            keys += [self._holds, self._expiry]
        else:
            record_keys, record_args = self._record_call(entry, release)
            keys += record_keys
            args += record_args
        return keys, args

    def commit_turn(
        self,
        session_id: str,
        messages: Sequence[BaseMessage],
        entry: UsageEntry | None = None,
        *,
        release: str | None = None,
        fence: Fence | None = None,
    ) -> None:
        keys, args = self._commit_call(session_id, messages, entry, release, fence)
        if not int(self._eval(self._commit_script, keys, args)):
            raise lock_lost(session_id, messages)

    async def acommit_turn(
        self,
        session_id: str,
        messages: Sequence[BaseMessage],
        entry: UsageEntry | None = None,
        *,
        release: str | None = None,
        fence: Fence | None = None,
    ) -> None:
        keys, args = self._commit_call(session_id, messages, entry, release, fence)
        if not int(await self._aeval(_COMMIT, keys, args)):
            raise lock_lost(session_id, messages)
