"""The Redis store's transcripts: messages, sessions, running summaries and titles.

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
- ``<prefix>:title:<id>``: STRING, the title people gave the session.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, cast

from langchain_core.messages import BaseMessage

from chatchain.errors import StoreError
from chatchain.stores._base import (
    SessionInfo,
    Summary,
    dump_message,
    load_message,
    newest_first,
    prefix_end,
    session_times,
    utcnow,
)
from chatchain.stores._redis._connection import _Connections, _micros, _moment

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    import redis.asyncio.lock
    import redis.commands.core
    import redis.lock

    from chatchain.stores._redis._connection import _Pipeline


__all__ = ["_INDEX_IDS", "_History"]


# Index the ids of a store written before ``ids`` existed (or by such a process since): ids
# only ever holds at least the ids of created, so fewer means some are missing.
# KEYS: ids, created.
_INDEX_IDS = """
if redis.call('ZCARD', KEYS[1]) < redis.call('ZCARD', KEYS[2]) then
  redis.call('ZUNIONSTORE', KEYS[1], 2, KEYS[1], KEYS[2], 'WEIGHTS', 0, 0)
end
"""


def _window(start: int, stop: int | None) -> tuple[int, int] | None:
    """LRANGE's inclusive bounds for the slice ``[start:stop]``, or None if it is empty.

    LRANGE resolves negative indexes against the list's length and clamps out-of-range ones
    just as slicing does; only ``stop == 0`` needs care, as its end index -1 means "last".
    """
    if stop == 0:
        return None
    return start, -1 if stop is None else stop - 1


class _History(_Connections):
    """Transcripts (`HistoryBackend`), session times, summaries (`SummaryBackend`) and
    titles (`TitleBackend`)."""

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

    # -- titles -------------------------------------------------------------------------------

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
