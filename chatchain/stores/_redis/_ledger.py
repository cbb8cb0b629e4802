"""The Redis store's usage ledger and budget holds.

The usage ledger (see `chatchain.usage`), where ``<scope>`` is ``session``, ``user`` or
``all`` and ``<key>`` the percent-encoded session or user id (empty for ``all``). Deleting or
pruning a session leaves its spending in the ledger:

- ``<prefix>:usage:entries``: HASH of entry id -> entry JSON (`UsageEntry.to_json`); the
  entry ids recorded, so recording one twice is seen and changes nothing.
- ``<prefix>:usage:at:<scope>:<key>``: ZSETs of the scope's entries scored by their time
  (microseconds since the epoch), so ``since``/``until`` is one range read. Members are
  ``<sequence>:<entry id>``, the sequence (``<prefix>:usage:seq``, 16 digits) keeping entries
  of the same microsecond in the order they were recorded.
- ``<prefix>:usage:total:<scope>:<key>``: HASH of running sums (tokens, requests, turns,
  summaries, ``unpriced``, ``estimated``, ``cached_turns``, and ``cost`` of the priced
  entries, ``latency`` and ``saved`` (by cached turns) as exact doubles), so a total is one
  read however long the ledger.
- ``<prefix>:usage:days:<scope>:<key>``: HASH of the scope's spending per UTC day,
  ``<YYYY-MM-DD>:t`` (tokens) and ``<YYYY-MM-DD>:c`` (cost of the priced entries), so that a
  period cap (`BudgetLimit.since`) reads one field pair per day of its period; a period that
  starts within a day reads that day's entries after its start from the time index.
- ``<prefix>:holds``: HASH of budget hold id -> ``{"t": tokens, "c": usd, "i": [indexes]}``;
  ``<prefix>:holds:expiry``: ZSET of hold ids scored by expiry (microseconds by the server's
  clock, ``TIME``, so that clients whose clocks disagree agree on it); taking a hold deletes
  the expired ones; ``<prefix>:holds:session:<id>`` and ``<prefix>:holds:user:<id>``: SETs of
  the hold ids of a session and of a user (the record's ``i``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from chatchain.budgets import BudgetHold, BudgetLimit, BudgetRefusal
from chatchain.errors import StoreError
from chatchain.stores._base import utcnow
from chatchain.stores._ledger import (
    TOTAL_COLUMNS,
    increments,
    period_bounds,
    scopes_of,
    total_usage,
)
from chatchain.stores._redis._connection import _Connections, _micros
from chatchain.usage import Scope, Usage, UsageEntry

__all__ = ["_DROP_HOLD", "_HOLD", "_RECORD", "_RECORD_ENTRY", "_RELEASE", "_Ledger"]


# -- the ledger's scripts ----------------------------------------------------------------------
# Each runs atomically on the server. Numbers cross into Lua as strings and go back out as
# strings: Lua's own number-to-string conversion keeps 14 digits, and a number it returns is
# truncated to an integer. Costs and latencies add up as doubles, as `Usage.__add__` does, and
# are kept with 17 digits, which read back as the very same double.

# Forget a hold: its record, its expiry and its session's and user's index entries.
_DROP_HOLD = """
local function drop_hold(holds, expiry, id)
  local record = redis.call('HGET', holds, id)
  if not record then return end
  for _, index in ipairs(cjson.decode(record).i) do redis.call('SREM', index, id) end
  redis.call('HDEL', holds, id)
  redis.call('ZREM', expiry, id)
end
"""

# Add an entry to the ledger and drop the hold it replaces (K, A: the keys and arguments).
# K: entries, seq, holds, holds expiry, then (time index, totals, days) per scope of the entry.
# A: entry id, entry JSON, time (us), hold to drop ('' for none), cost ('' when unpriced),
#    latency, saved, UTC day (YYYY-MM-DD), total tokens, then (field, increment) pairs of
#    the integer sums.
_RECORD_ENTRY = """
local function record_entry(K, A)
  local entries, seq, holds, expiry = K[1], K[2], K[3], K[4]
  local id, release = A[1], A[4]
  if redis.call('HEXISTS', entries, id) == 1 then
    if release ~= '' then drop_hold(holds, expiry, release) end
    return 0
  end
  -- The first write: a server out of memory refuses it, and so the whole script.
  redis.call('HSET', entries, id, A[2])
  if release ~= '' then drop_hold(holds, expiry, release) end
  local member = string.format('%016d:', redis.call('INCR', seq)) .. id
  local function add(totals, field, amount)
    local sum = tonumber(redis.call('HGET', totals, field) or '0') + tonumber(amount)
    redis.call('HSET', totals, field, string.format('%.17g', sum))
  end
  for k = 5, #K, 3 do
    local totals, days = K[k + 1], K[k + 2]
    redis.call('ZADD', K[k], A[3], member)
    for a = 10, #A, 2 do redis.call('HINCRBY', totals, A[a], A[a + 1]) end
    add(totals, 'latency', A[6])
    if tonumber(A[7]) ~= 0 then add(totals, 'saved', A[7]) end
    redis.call('HINCRBY', days, A[8] .. ':t', A[9])
    if A[5] ~= '' then
      add(totals, 'cost', A[5])
      add(days, A[8] .. ':c', A[5])
    end
  end
  return 1
end
"""

_RECORD = _DROP_HOLD + _RECORD_ENTRY + "return record_entry(KEYS, ARGV)"


# `chatchain.budgets.first_refusal` (`check_limit` for each limit, in order), then keep the
# hold if all of them pass. The script's copy of the rule is held to the Python one by
# tests/stores/test_budget_rule_contract.py.
# KEYS: holds, holds expiry, entries, then (totals, hold index, days, time index) per limit,
#       then the new hold's indexes.
# ARGV: '' (unused), hold id, hold record, time to live (us), tokens, usd, number of limits,
#       then (kind: 'all' or 'set', max tokens or '', max usd or '', period days or '',
#       partial day's start (us) or '', its end) per limit. A limit with a period
#       (`BudgetLimit.since`) counts the day sums of its whole days (comma-separated
#       YYYY-MM-DD) plus, when it starts within a day, that day's entries after its start.
# Expiry is on the server's clock (TIME), which every client shares, whatever their own say.
# Returns nil when the hold is kept, else the (1-based) limit passed and the spending seen.
_HOLD = (
    _DROP_HOLD
    + """
local holds, expiry, id = KEYS[1], KEYS[2], ARGV[2]
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', expiry, '-inf', string.format('%.0f', now))) do
  drop_hold(holds, expiry, dead)
end
local tokens, usd, n = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
-- What a scope spent in a period: its whole days' sums, then a partial first day's entries.
local function spent_since(days, index, whole, low, high)
  local tokens, usd, fields = 0, 0, {}
  for day in string.gmatch(whole, '[^,]+') do
    fields[#fields + 1] = day .. ':t'
    fields[#fields + 1] = day .. ':c'
  end
  for first = 1, #fields, 1000 do
    local values = redis.call('HMGET', days, unpack(fields, first, math.min(first + 999, #fields)))
    for f = 1, #values, 2 do
      tokens = tokens + tonumber(values[f] or '0')
      usd = usd + tonumber(values[f + 1] or '0')
    end
  end
  if low ~= '' then
    for _, member in ipairs(redis.call('ZRANGEBYSCORE', index, low, high)) do
      local entry = cjson.decode(redis.call('HGET', KEYS[3], string.sub(member, 18)))
      tokens = tokens + entry.total_tokens
      if entry.cost_usd ~= cjson.null then usd = usd + entry.cost_usd end
    end
  end
  return tokens, usd
end
for i = 1, n do
  local totals, index = KEYS[4 * i], KEYS[1 + 4 * i]
  local days, at = KEYS[2 + 4 * i], KEYS[3 + 4 * i]
  local kind, max_tokens, max_usd = ARGV[2 + 6 * i], ARGV[3 + 6 * i], ARGV[4 + 6 * i]
  local whole, low, high = ARGV[5 + 6 * i], ARGV[6 + 6 * i], ARGV[7 + 6 * i]
  local records
  if kind == 'all' then
    records = redis.call('HVALS', holds)
  else
    records = {}
    for _, other in ipairs(redis.call('SMEMBERS', index)) do
      local record = redis.call('HGET', holds, other)
      if record then records[#records + 1] = record end
    end
  end
  local held_tokens, held_usd = 0, 0
  for _, record in ipairs(records) do
    local hold = cjson.decode(record)
    held_tokens = held_tokens + tonumber(hold.t)
    held_usd = held_usd + tonumber(hold.c)
  end
  local spent_tokens, spent_usd
  if whole == '' and low == '' then
    local spent = redis.call('HMGET', totals, 'total', 'cost')
    spent_tokens = tonumber(spent[1] or '0')
    -- As check_limit reads `Usage.priced_cost_usd`: what the priced entries cost.
    spent_usd = tonumber(spent[2] or '0')
  else
    spent_tokens, spent_usd = spent_since(days, at, whole, low, high)
  end
  if (max_tokens ~= '' and spent_tokens + held_tokens + tokens > tonumber(max_tokens))
    or (max_usd ~= '' and spent_usd + held_usd + usd > tonumber(max_usd)) then
    return {tostring(i), string.format('%.0f', spent_tokens), string.format('%.17g', spent_usd),
      string.format('%.0f', held_tokens), string.format('%.17g', held_usd)}
  end
end
drop_hold(holds, expiry, id)  -- the same hold kept again replaces itself
redis.call('HSET', holds, id, ARGV[3])
redis.call('ZADD', expiry, string.format('%.0f', now + tonumber(ARGV[4])), id)
for k = 4 + 4 * n, #KEYS do redis.call('SADD', KEYS[k], id) end
return false
"""
)

# KEYS: holds, holds expiry. ARGV: hold id.
_RELEASE = (
    _DROP_HOLD
    + """
drop_hold(KEYS[1], KEYS[2], ARGV[1])
return 0
"""
)


# The HASH field of each column of a total: its name without the unit.
_FIELDS = {
    column: column.removesuffix("_tokens").removesuffix("_usd").removesuffix("_s")
    for column in TOTAL_COLUMNS
}
_FLOAT_COLUMNS = ("cost_usd", "latency_s", "saved_usd")  # exact doubles; the rest by HINCRBY


def _period(since: datetime | None) -> tuple[str, str, str]:
    """A period's arguments for `_HOLD`: its whole UTC days (up to tomorrow, for clocks a
    little ahead), and the time range of a first day it starts within (else ``''``)."""
    if since is None:
        return "", "", ""
    first, part = period_bounds(since)
    low = high = ""
    if part is not None:
        low, high = str(_micros(part[0])), f"({_micros(part[1])}"
    last = utcnow().date() + timedelta(days=1)
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    if not days and not low:  # a period yet to come: only entries stamped in it count
        low, high = str(_micros(datetime.combine(first, datetime.min.time(), UTC))), "+inf"
    return ",".join(day.isoformat() for day in days), low, high


class _Ledger(_Connections):
    """The usage ledger and budget holds (`LedgerBackend`)."""

    def _record_call(self, entry: UsageEntry, release: str | None) -> tuple[list[str], list[str]]:
        """The keys and arguments of `_RECORD` for ``entry``."""
        keys = [self._entries, self._seq, self._holds, self._expiry]
        for scope, key in scopes_of(entry):
            keys += [
                self._key(f"usage:at:{scope}", key),
                self._key(f"usage:total:{scope}", key),
                self._key(f"usage:days:{scope}", key),
            ]
        added = increments(entry)
        args = [
            entry.id,
            entry.to_json(),
            str(_micros(entry.at)),
            release or "",
            "" if entry.cost_usd is None else repr(added["cost_usd"]),
            repr(added["latency_s"]),
            repr(added["saved_usd"]),
            entry.day.isoformat(),
            str(int(added["total_tokens"])),
        ]
        for column, amount in added.items():
            if column not in _FLOAT_COLUMNS:
                args += [_FIELDS[column], str(int(amount))]
        return keys, args

    def record_usage(self, entry: UsageEntry, *, release: str | None = None) -> None:
        keys, args = self._record_call(entry, release)
        self._eval(self._record_script, keys, args)

    async def arecord_usage(self, entry: UsageEntry, *, release: str | None = None) -> None:
        keys, args = self._record_call(entry, release)
        await self._aeval(_RECORD, keys, args)

    def usage_total(self, scope: Scope, key: str) -> Usage:
        totals = self._key(f"usage:total:{scope}", key)
        [values] = self._run(
            lambda pipe: pipe.hmget(totals, list(_FIELDS.values())), transaction=False
        )
        try:
            return total_usage(dict(zip(TOTAL_COLUMNS, values, strict=True)))
        except ValueError as exc:
            raise self._corrupt_ledger(exc) from exc

    def usage_entries(
        self,
        *,
        session_id: str | None = None,
        user_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[UsageEntry]:
        # The narrowest index at hand; a session's entries are then filtered by user here.
        if session_id is not None:
            index = self._key("usage:at:session", session_id)
        elif user_id is not None:
            index = self._key("usage:at:user", user_id)
        else:
            index = self._key("usage:at:all", "")
        low = "-inf" if since is None else str(_micros(since))
        high = "+inf" if until is None else f"({_micros(until)}"
        [members] = self._run(lambda pipe: pipe.zrangebyscore(index, low, high), transaction=False)
        if not members:
            return []
        # Entries are never removed: every id listed in an index is in the hash.
        ids = [member.partition(":")[2] for member in members]
        [texts] = self._run(lambda pipe: pipe.hmget(self._entries, ids), transaction=False)
        try:
            entries = [UsageEntry.from_json(text) for text in texts]
        except (ValueError, KeyError, TypeError) as exc:
            raise self._corrupt_ledger(exc) from exc
        if user_id is not None:
            entries = [e for e in entries if e.user_id == user_id]
        return entries

    def _corrupt_ledger(self, exc: Exception) -> StoreError:
        return StoreError(
            f"The usage ledger in the Redis history store at {self._where} holds data "
            f"chatchain did not write ({exc!r}). Check what else writes keys under "
            f"{self.prefix!r}:usage there."
        )

    def _hold_call(
        self, hold: BudgetHold, limits: Sequence[BudgetLimit]
    ) -> tuple[list[str], list[str]]:
        """The keys and arguments of `_HOLD` for ``hold`` and ``limits``."""
        indexes = [self._key("holds:session", hold.session_id)]
        if hold.user_id is not None:
            indexes.append(self._key("holds:user", hold.user_id))
        tokens, usd = str(int(hold.tokens)), repr(float(hold.cost_usd))
        record = {"t": tokens, "c": usd, "i": indexes}
        keys = [self._holds, self._expiry, self._entries]
        args = [
            "",
            hold.id,
            json.dumps(record, ensure_ascii=False, separators=(",", ":")),
            # How long the hold lives, from now: the server's clock times it.
            str(max(0, _micros(hold.expires_at) - _micros(utcnow()))),
            tokens,
            usd,
            str(len(limits)),
        ]
        for limit in limits:
            keys.append(self._key(f"usage:total:{limit.scope}", limit.key))
            if limit.scope == "all":
                keys.append(self._holds)  # every hold counts: the script reads them all
            else:
                keys.append(self._key(f"holds:{limit.scope}", limit.key))
            keys += [
                self._key(f"usage:days:{limit.scope}", limit.key),
                self._key(f"usage:at:{limit.scope}", limit.key),
            ]
            args += [
                "all" if limit.scope == "all" else "set",
                "" if limit.max_tokens is None else str(int(limit.max_tokens)),
                "" if limit.max_usd is None else repr(float(limit.max_usd)),
                *_period(limit.since),
            ]
        return keys + indexes, args

    def _refusal(self, limits: Sequence[BudgetLimit], reply: Any) -> BudgetRefusal | None:
        if reply is None:
            return None
        try:
            which, spent_tokens, spent_usd, held_tokens, held_usd = reply
            return BudgetRefusal(
                limits[int(which) - 1],
                int(spent_tokens),
                float(spent_usd),
                int(held_tokens),
                float(held_usd),
            )
        except (ValueError, TypeError, IndexError) as exc:
            raise self._corrupt_ledger(exc) from exc

    def hold_budget(self, hold: BudgetHold, limits: Sequence[BudgetLimit]) -> BudgetRefusal | None:
        keys, args = self._hold_call(hold, limits)
        return self._refusal(limits, self._eval(self._hold_script, keys, args))

    async def ahold_budget(
        self, hold: BudgetHold, limits: Sequence[BudgetLimit]
    ) -> BudgetRefusal | None:
        keys, args = self._hold_call(hold, limits)
        return self._refusal(limits, await self._aeval(_HOLD, keys, args))

    def release_budget(self, hold_id: str) -> None:
        self._eval(self._release_script, [self._holds, self._expiry], [hold_id])

    async def arelease_budget(self, hold_id: str) -> None:
        await self._aeval(_RELEASE, [self._holds, self._expiry], [hold_id])
