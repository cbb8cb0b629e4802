"""The Redis store: sessions on a stock Redis server, shared by many processes and machines.

We do not wrap a ready integration: langchain-redis needs the Redis Stack modules (RedisJSON,
RediSearch) and langchain-community's ``RedisChatMessageHistory`` loads whole sessions and
prepends with LPUSH, while chatchain needs a stock server, any string id and windowed loads.

Keys, under a prefix (``chatchain`` unless told), where ``<id>`` is the session id
percent-encoded, so that no id (``:``, ``*``, ``%`` and all) can reach another id's keys or
match a SCAN pattern meant for another; the raw id is kept in the sorted sets:

- ``<prefix>:msgs:<id>``: LIST of messages as JSON, oldest first. RPUSH appends; LRANGE with
  negative indexes reads a window without touching the rest; LLEN counts without reading.
- ``<prefix>:meta:<id>``: HASH of ``created`` and ``updated`` (microseconds since the epoch,
  by the writer's clock) and the running summary (``summary``, ``covers``).
- ``<prefix>:created`` and ``<prefix>:updated``: ZSETs of raw session ids scored by creation
  and by last write, for `sessions` and `prune`.
- ``<prefix>:ids``: ZSET of the same ids, all scored 0, so that they sort by their bytes and
  `session_infos` reads the ids of a prefix with one ZRANGEBYLEX (a store written before it
  existed is indexed from ``created`` on its first listing).
- ``<prefix>:lock:<id>``: the session's cross-process lock, a `redis.lock.Lock`, whose value
  is its holder's token (the turn's `Fence`).

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

The users of a chat service (`chatchain.users`):

- ``<prefix>:user:<name>``: HASH of ``name``, ``created`` (microseconds since the epoch),
  ``budget``, ``daily``, ``monthly`` (USD, ``''`` for no cap), ``revoked`` (``0``/``1``) and
  ``hash`` (the SHA-256 of the user's token; the token itself is never stored);
- ``<prefix>:token:<hash>``: STRING, the key of the user the token belongs to;
- ``<prefix>:users``: ZSET of names scored by creation, for listing.

Adding and changing a user are Lua scripts, so two processes adding one name cannot both win
and a rotated token's old hash is gone in the same step as the new one appears.

A turn is saved by one Lua script (`RedisStore.commit_turn`): it checks that the session's
lock key still holds the turn's token, records the usage entry and drops the budget hold,
then appends the messages only if the lock was still the turn's. Redis does not undo a
script's earlier writes when a later command fails, so the script checks the types of the
keys it writes before writing anything.

Writes that touch several keys run as one MULTI/EXEC transaction: if the connection drops
before EXEC, Redis discards the lot. The ledger's writes are Lua scripts, for the same
all-or-nothing plus decisions taken inside (a duplicate entry, a budget check that spans
processes); each does its first write before any other so that a server out of memory
refuses the whole script. The clients never retry on their own, because a write whose reply
was lost may have been applied and must not be applied twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    contextmanager,
)
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, urlsplit, urlunsplit

from langchain_core.messages import BaseMessage

from chatchain._locks import SessionLocks, apoll, busy_error, poll
from chatchain.budgets import BudgetHold, BudgetLimit, BudgetRefusal
from chatchain.errors import ConfigurationError, StoreError
from chatchain.stores._base import (
    DEFAULT_LEASE,
    Fence,
    HistoryStore,
    SessionInfo,
    Summary,
    TitleBackend,
    UserBackend,
    check_user_changes,
    driver_missing,
    dump_message,
    load_message,
    lock_lost,
    newest_first,
    prefix_end,
    session_times,
    user_exists,
    utcnow,
)
from chatchain.stores._ledger import (
    TOTAL_COLUMNS,
    increments,
    period_bounds,
    scopes_of,
    total_usage,
)
from chatchain.usage import Scope, Usage, UsageEntry
from chatchain.users import User

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    import redis.asyncio.lock
    import redis.commands.core
    import redis.lock

    _Pipeline = redis.client.Pipeline | redis.asyncio.client.Pipeline

__all__ = ["RedisStore"]

logger = logging.getLogger("chatchain")

_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

# Connecting is quick or broken; a command can wait on a busy server a little longer. Both
# can be changed in the URL (?socket_connect_timeout=...&socket_timeout=...).
_CONNECT_TIMEOUT_S = 5.0
_IO_TIMEOUT_S = 15.0

# Turns of one process queue on SessionLocks; only turns of other processes poll the key.

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

# Index the ids of a store written before ``ids`` existed (or by such a process since): ids
# only ever holds at least the ids of created, so fewer means some are missing.
# KEYS: ids, created.
_INDEX_IDS = """
if redis.call('ZCARD', KEYS[1]) < redis.call('ZCARD', KEYS[2]) then
  redis.call('ZUNIONSTORE', KEYS[1], 2, KEYS[1], KEYS[2], 'WEIGHTS', 0, 0)
end
"""

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

# Add a user unless the name is taken. KEYS: user, token, users. ARGV: name, created (us),
# budget, daily, monthly, revoked, token hash. Returns 1 when added, 0 when the name is taken.
_ADD_USER = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'name', ARGV[1], 'created', ARGV[2], 'budget', ARGV[3],
  'daily', ARGV[4], 'monthly', ARGV[5], 'revoked', ARGV[6], 'hash', ARGV[7])
redis.call('SET', KEYS[2], KEYS[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
"""

# Change a user. KEYS: user. ARGV: start of token keys, new token hash ('' to keep it), then
# (field, value) pairs. Returns the user's fields (HGETALL), or nil for no such user.
_UPDATE_USER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if ARGV[2] ~= '' then
  local old = redis.call('HGET', KEYS[1], 'hash')
  if old then redis.call('DEL', ARGV[1] .. old) end
  redis.call('SET', ARGV[1] .. ARGV[2], KEYS[1])
  redis.call('HSET', KEYS[1], 'hash', ARGV[2])
end
for a = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[a], ARGV[a + 1]) end
return redis.call('HGETALL', KEYS[1])
"""

# The user a token hash names. KEYS: token. Returns the user's fields, or nil.
_FIND_USER = """
local user = redis.call('GET', KEYS[1])
if not user then return false end
return redis.call('HGETALL', user)
"""

# The HASH field of each column of a total: its name without the unit.
_FIELDS = {
    column: column.removesuffix("_tokens").removesuffix("_usd").removesuffix("_s")
    for column in TOTAL_COLUMNS
}
_FLOAT_COLUMNS = ("cost_usd", "latency_s", "saved_usd")  # exact doubles; the rest by HINCRBY


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


def _moment(micros: str | int) -> datetime:
    return _EPOCH + int(micros) * _MICROSECOND


def _cap(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _user_fields(value: object) -> str:
    """A `User` field as a user HASH keeps it."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return _cap(value)  # type: ignore[arg-type]


def _user(fields: list[str] | dict[str, str] | None) -> tuple[User, str] | None:
    """The user of a user HASH (HGETALL's reply), and their token's hash."""
    if not fields:
        return None
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))

    def cap(name: str) -> float | None:
        return float(fields[name]) if fields.get(name) else None

    user = User(
        fields["name"],
        _moment(fields["created"]),
        budget_usd=cap("budget"),
        daily_usd=cap("daily"),
        monthly_usd=cap("monthly"),
        revoked=fields.get("revoked") == "1",
    )
    return user, fields["hash"]


# `User` fields -> user HASH fields.
_USER_FIELDS = {
    "budget_usd": "budget",
    "daily_usd": "daily",
    "monthly_usd": "monthly",
    "revoked": "revoked",
}


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


def _fence(session_id: str, token: str | bytes | None) -> Fence:
    """The fence of a `redis.lock.Lock` held: its token, which is the lock key's value."""
    assert token is not None  # set by a successful acquire
    return Fence(session_id, token.decode() if isinstance(token, bytes) else token)


def _redacted(url: str) -> str:
    """The URL without its password or query (which may hold one)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username}@{host}" if parts.username else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _window(start: int, stop: int | None) -> tuple[int, int] | None:
    """LRANGE's inclusive bounds for the slice ``[start:stop]``, or None if it is empty.

    LRANGE resolves negative indexes against the list's length and clamps out-of-range ones
    just as slicing does; only ``stop == 0`` needs care, as its end index -1 means "last".
    """
    if stop == 0:
        return None
    return start, -1 if stop is None else stop - 1


class RedisStore(HistoryStore, UserBackend, TitleBackend):
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

    # -- keys and commands, shared by the sync and async paths -------------------------------

    def _key(self, kind: str, session_id: str) -> str:
        return f"{self.prefix}:{kind}:{quote(session_id, safe='')}"

    def _queue_append(
        self, pipe: _Pipeline, session_id: str, payloads: list[str], stamp: str
    ) -> None:
        meta = self._key("meta", session_id)
        pipe.rpush(self._key("msgs", session_id), *payloads)
        pipe.hsetnx(meta, "created", stamp)
        pipe.hset(meta, "updated", stamp)
        pipe.zadd(self._created, {session_id: stamp}, nx=True)
        pipe.zadd(self._updated, {session_id: stamp})
        pipe.zadd(self._ids, {session_id: 0})

    def _queue_delete(self, pipe: _Pipeline, session_id: str) -> None:
        pipe.delete(self._key("msgs", session_id), self._key("meta", session_id))
        pipe.zrem(self._created, session_id)
        pipe.zrem(self._updated, session_id)
        pipe.zrem(self._ids, session_id)

    def _corrupt(self, session_id: str, exc: Exception) -> StoreError:
        return StoreError(
            f"Session {session_id!r} in the Redis history store at {self._where} holds data "
            f"chatchain did not write ({exc!r}). Check what else writes keys under "
            f"{self.prefix!r} there, or delete the session."
        )

    def _decode(self, session_id: str, texts: list[str]) -> list[BaseMessage]:
        try:
            return [load_message(text) for text in texts]
        except (ValueError, KeyError, TypeError) as exc:
            raise self._corrupt(session_id, exc) from exc

    def _summary(self, session_id: str, fields: list[str | None]) -> Summary | None:
        text, covers = fields
        if text is None:
            return None
        try:
            return Summary(text, int(covers or 0))
        except ValueError as exc:
            raise self._corrupt(session_id, exc) from exc

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

    # -- messages ----------------------------------------------------------------------------

    def append(self, session_id: str, messages: Sequence[BaseMessage]) -> None:
        if messages:
            payloads = [dump_message(m) for m in messages]
            stamp = str(_micros(utcnow()))
            self._run(lambda pipe: self._queue_append(pipe, session_id, payloads, stamp))

    async def aappend(self, session_id: str, messages: Sequence[BaseMessage]) -> None:
        if messages:
            payloads = [dump_message(m) for m in messages]
            stamp = str(_micros(utcnow()))
            await self._arun(lambda pipe: self._queue_append(pipe, session_id, payloads, stamp))

    def load(self, session_id: str, start: int = 0, stop: int | None = None) -> list[BaseMessage]:
        window = _window(start, stop)
        if window is None:
            return []
        key = self._key("msgs", session_id)
        [texts] = self._run(lambda pipe: pipe.lrange(key, *window), transaction=False)
        return self._decode(session_id, texts)

    async def aload(
        self, session_id: str, start: int = 0, stop: int | None = None
    ) -> list[BaseMessage]:
        window = _window(start, stop)
        if window is None:
            return []
        key = self._key("msgs", session_id)
        [texts] = await self._arun(lambda pipe: pipe.lrange(key, *window), transaction=False)
        return self._decode(session_id, texts)

    def count(self, session_id: str) -> int:
        key = self._key("msgs", session_id)
        [count] = self._run(lambda pipe: pipe.llen(key), transaction=False)
        return int(count)

    async def acount(self, session_id: str) -> int:
        key = self._key("msgs", session_id)
        [count] = await self._arun(lambda pipe: pipe.llen(key), transaction=False)
        return int(count)

    # -- sessions ----------------------------------------------------------------------------

    def sessions(self) -> list[str]:
        [ids] = self._run(lambda pipe: pipe.zrange(self._created, 0, -1), transaction=False)
        return list(ids)

    def info(self, session_id: str) -> SessionInfo | None:
        def queue(pipe: _Pipeline) -> None:
            pipe.llen(self._key("msgs", session_id))
            pipe.hmget(self._key("meta", session_id), ["created", "updated"])

        count, (created, updated) = self._run(queue)
        if not count:
            return None
        try:
            return SessionInfo(session_id, int(count), _moment(created), _moment(updated))
        except (TypeError, ValueError) as exc:
            raise self._corrupt(session_id, exc) from exc

    def session_infos(self, prefix: str = "", limit: int | None = None) -> list[SessionInfo]:
        # Byte order is code point order in UTF-8, so `prefix_end` bounds the range here too.
        end = prefix_end(prefix)
        self._eval(self._index_script, [self._ids, self._created], [])
        [ids] = self._run(
            lambda pipe: pipe.zrangebylex(
                self._ids, f"[{prefix}", "+" if end is None else f"({end}"
            ),
            transaction=False,
        )

        def queue(pipe: _Pipeline) -> None:
            for session_id in ids:
                pipe.llen(self._key("msgs", session_id))
                pipe.hmget(self._key("meta", session_id), ["created", "updated"])

        replies = self._run(queue) if ids else []
        infos = []
        for session_id, count, (created, updated) in zip(
            ids, replies[::2], replies[1::2], strict=True
        ):
            if not count:
                continue  # deleted since the range was read
            try:
                infos.append(
                    SessionInfo(session_id, int(count), _moment(created), _moment(updated))
                )
            except (TypeError, ValueError) as exc:
                raise self._corrupt(session_id, exc) from exc
        return newest_first(infos, limit)

    def delete(self, session_id: str) -> None:
        self._run(lambda pipe: self._queue_delete(pipe, session_id))

    async def adelete(self, session_id: str) -> None:
        await self._arun(lambda pipe: self._queue_delete(pipe, session_id))

    def prune(self, before: datetime) -> list[str]:
        cutoff = _micros(before)
        [stale] = self._run(
            lambda pipe: pipe.zrangebyscore(self._updated, "-inf", f"({cutoff}"),
            transaction=False,
        )

        def delete_if_stale(pipe: redis.client.Pipeline, session_id: str) -> None:
            # Runs under WATCH of the session's meta hash, which every append touches: a
            # session written since the ZRANGEBYSCORE above is left alone.
            updated = cast("float | None", pipe.zscore(self._updated, session_id))
            if updated is not None and updated < cutoff:
                pipe.multi()
                self._queue_delete(pipe, session_id)

        pruned = []
        with self._failures():
            for session_id in stale:
                # EXEC answers [] when nothing was queued, i.e. when the session stayed.
                if self._client.transaction(
                    partial(delete_if_stale, session_id=session_id), self._key("meta", session_id)
                ):
                    pruned.append(session_id)
        return pruned

    def replace_session(
        self,
        session_id: str,
        messages: Sequence[BaseMessage],
        summary: Summary | None = None,
        *,
        created_at: datetime | None = None,
        updated_at: datetime | None = None,
    ) -> None:
        payloads = [dump_message(m) for m in messages]  # before any write: all or nothing
        created, updated = (str(_micros(t)) for t in session_times(created_at, updated_at))
        meta = {"created": created, "updated": updated}
        if summary is not None:
            meta |= {"summary": summary.text, "covers": str(summary.covers)}

        def queue(pipe: _Pipeline) -> None:
            # One MULTI/EXEC: a server that refuses any of it (out of memory) runs none of
            # it, and no reader sees the session between the delete and the writes.
            self._queue_delete(pipe, session_id)
            pipe.hset(self._key("meta", session_id), mapping=meta)
            if payloads:  # as `append`: only a session with messages is listed
                pipe.rpush(self._key("msgs", session_id), *payloads)
                pipe.zadd(self._created, {session_id: created})
                pipe.zadd(self._updated, {session_id: updated})
                pipe.zadd(self._ids, {session_id: 0})

        self._run(queue)

    # -- running summary ---------------------------------------------------------------------

    def get_summary(self, session_id: str) -> Summary | None:
        key = self._key("meta", session_id)
        [fields] = self._run(lambda pipe: pipe.hmget(key, ["summary", "covers"]), transaction=False)
        return self._summary(session_id, fields)

    async def aget_summary(self, session_id: str) -> Summary | None:
        key = self._key("meta", session_id)
        [fields] = await self._arun(
            lambda pipe: pipe.hmget(key, ["summary", "covers"]), transaction=False
        )
        return self._summary(session_id, fields)

    def set_summary(self, session_id: str, summary: Summary) -> None:
        key = self._key("meta", session_id)
        fields = {"summary": summary.text, "covers": summary.covers}
        self._run(lambda pipe: pipe.hset(key, mapping=fields), transaction=False)

    async def aset_summary(self, session_id: str, summary: Summary) -> None:
        key = self._key("meta", session_id)
        fields = {"summary": summary.text, "covers": summary.covers}
        await self._arun(lambda pipe: pipe.hset(key, mapping=fields), transaction=False)

    # -- write-ahead records of turns in flight ----------------------------------------------

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

    # -- usage ledger ------------------------------------------------------------------------

    def _eval(self, script: redis.commands.core.Script, keys: list[str], args: list[str]) -> Any:
        with self._failures():
            return script(keys=keys, args=args)

    async def _aeval(self, script: str, keys: list[str], args: list[str]) -> Any:
        with self._failures():
            client = await self._aclient()
            return await client.register_script(script)(keys=keys, args=args)

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

    # -- users -------------------------------------------------------------------------------

    def _token_key(self, token_hash: str) -> str:
        return f"{self.prefix}:token:{token_hash}"

    def _user_failures(self, fields: Any) -> tuple[User, str] | None:
        try:
            return _user(fields)
        except (KeyError, ValueError, TypeError) as exc:
            raise StoreError(
                f"A user in the Redis history store at {self._where} holds data chatchain did "
                f"not write ({exc!r}). Check what else writes keys under {self.prefix!r}:user."
            ) from exc

    def add_user(self, user: User, token_hash: str) -> None:
        keys = [self._key("user", user.name), self._token_key(token_hash), self._users]
        args = [
            user.name,
            str(_micros(user.created_at)),
            _cap(user.budget_usd),
            _cap(user.daily_usd),
            _cap(user.monthly_usd),
            _user_fields(user.revoked),
            token_hash,
        ]
        if not int(self._eval(self._add_user_script, keys, args)):
            raise user_exists(user.name)

    def titles(self, session_ids: Sequence[str]) -> dict[str, str]:
        ids = list(session_ids)
        if not ids:
            return {}
        # One string per session, apart from its transcript's keys: renaming never touches them.
        [values] = self._run(
            lambda pipe: pipe.mget([self._key("title", sid) for sid in ids]), transaction=False
        )
        return {sid: title for sid, title in zip(ids, values, strict=True) if title is not None}

    def set_title(self, session_id: str, title: str | None) -> None:
        key = self._key("title", session_id)
        if title is None:
            self._run(lambda pipe: pipe.delete(key), transaction=False)
        else:
            self._run(lambda pipe: pipe.set(key, title), transaction=False)

    def get_user(self, name: str) -> User | None:
        key = self._key("user", name)
        [fields] = self._run(lambda pipe: pipe.hgetall(key), transaction=False)
        found = self._user_failures(fields)
        return None if found is None else found[0]

    def find_user(self, token_hash: str) -> tuple[User, str] | None:
        fields = self._eval(self._find_user_script, [self._token_key(token_hash)], [])
        return self._user_failures(fields)

    def list_users(self) -> list[User]:
        [names] = self._run(lambda pipe: pipe.zrange(self._users, 0, -1), transaction=False)

        def queue(pipe: _Pipeline) -> None:
            for name in names:
                pipe.hgetall(self._key("user", name))

        users = [self._user_failures(fields) for fields in self._run(queue, transaction=False)]
        return [found[0] for found in users if found is not None]

    def update_user(
        self, name: str, changes: Mapping[str, Any], *, token_hash: str | None = None
    ) -> User | None:
        check_user_changes(changes)
        args = [self._token_key(""), token_hash or ""]
        for field, value in changes.items():
            args += [_USER_FIELDS[field], _user_fields(value)]
        fields = self._eval(self._update_user_script, [self._key("user", name)], args)
        found = self._user_failures(fields)
        return None if found is None else found[0]

    # -- one writer per session --------------------------------------------------------------

    def lock(self, session_id: str) -> AbstractContextManager[Fence]:
        return self._locked(session_id)

    def alock(self, session_id: str) -> AbstractAsyncContextManager[Fence]:
        return self._alocked(session_id)

    def _lost(self, session_id: str) -> None:
        logger.warning(
            "The lock of session %r expired while its turn was running (the process stalled "
            "for more than the %g s lease?): if another turn took the session meanwhile, this "
            "turn's messages are refused (SessionLockLostError).",
            session_id,
            self.lease,
        )

    def _unreleased(self, session_id: str, exc: Exception) -> None:
        logger.warning(
            "Could not release the lock of session %r on %s (%s); it frees itself within %g s.",
            session_id,
            self._where,
            exc,
            self.lease,
        )

    @contextmanager
    def _locked(self, session_id: str) -> Iterator[Fence]:
        from redis.exceptions import LockNotOwnedError, RedisError

        started = time.monotonic()
        with self._locks.locked(session_id):
            lease = self._client.lock(
                self._key("lock", session_id),
                timeout=self.lease,
                thread_local=False,  # the renewing thread must see the token
            )
            with self._failures():
                acquired = poll(partial(lease.acquire, blocking=False), started + self.lock_timeout)
            if not acquired:
                raise busy_error(session_id, self.lock_timeout, anywhere=True)
            done = threading.Event()
            renewer = threading.Thread(
                target=self._renew,
                args=(lease, done, session_id),
                name=f"chatchain-lease-{session_id[:40]}",
                daemon=True,
            )
            renewer.start()
            try:
                yield _fence(session_id, lease.local.token)
            finally:
                done.set()
                renewer.join()
                try:
                    lease.release()
                except LockNotOwnedError:
                    self._lost(session_id)
                except RedisError as exc:
                    self._unreleased(session_id, exc)

    def _renew(self, lease: redis.lock.Lock, done: threading.Event, session_id: str) -> None:
        from redis.exceptions import LockNotOwnedError, RedisError

        while not done.wait(self.lease / 3):
            try:
                lease.reacquire()
            except LockNotOwnedError:
                self._lost(session_id)
                return
            except RedisError as exc:  # the next renewal may get through in time
                logger.warning("Could not renew the lock of session %r: %s", session_id, exc)

    @asynccontextmanager
    async def _alocked(self, session_id: str) -> AsyncIterator[Fence]:
        from redis.exceptions import LockNotOwnedError, RedisError

        started = time.monotonic()
        async with self._locks.alocked(session_id):
            with self._failures():
                client = await self._aclient()
                lease = client.lock(
                    self._key("lock", session_id),
                    timeout=self.lease,
                    thread_local=False,
                )
                acquired = await apoll(
                    partial(lease.acquire, blocking=False), started + self.lock_timeout
                )
            if not acquired:
                raise busy_error(session_id, self.lock_timeout, anywhere=True)
            renewer = asyncio.create_task(self._arenew(lease, session_id))
            try:
                yield _fence(session_id, lease.local.token)
            finally:
                renewer.cancel()
                await asyncio.wait([renewer])  # unlike awaiting it, keeps our own cancellation
                try:
                    await lease.release()
                except LockNotOwnedError:
                    self._lost(session_id)
                except RedisError as exc:
                    self._unreleased(session_id, exc)

    async def _arenew(self, lease: redis.asyncio.lock.Lock, session_id: str) -> None:
        from redis.exceptions import LockNotOwnedError, RedisError

        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await lease.reacquire()
            except LockNotOwnedError:
                self._lost(session_id)
                return
            except RedisError as exc:
                logger.warning("Could not renew the lock of session %r: %s", session_id, exc)
