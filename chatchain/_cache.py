"""The response cache (``CHATCHAIN_CACHE``): LangChain's LLM cache, on chatchain's model only.

The cache is set on a copy of the chain's chat model (its ``cache`` field), never with
``set_llm_cache``, so the user's other models are untouched. The classes are the maintained
ones: langchain-core's `InMemoryCache` for ``memory://``, langchain-community's `SQLiteCache`
for ``sqlite:///path`` and `RedisCache` for ``redis://``. A hit is an exact match of
chatchain's key (`_Call`): the scope (the call's ``user_id``, unless the operator shares the
cache with ``CHATCHAIN_CACHE_SCOPE=shared``: a cached reply tells what was asked), the model
and its parameters (LangChain's ``llm_string``, without the ``max_tokens`` of the call, which a
budget hold changes from call to call) and every message sent (system message with its
variables filled in, history window, new message), as the endpoint gets them: the key leaves
out the metadata LangChain keeps on earlier replies (``response_metadata``,
``usage_metadata``), which is never sent. That metadata differs between two runs of the same
conversation (completion ids, and the ``total_cost`` of 0 LangChain writes on every hit), so
with it in the key a conversation replayed turn for turn, or a tool loop after a hit, would
miss from its second call on. The call's ``max_tokens`` then decides which reply may answer
it: a whole one that fits, or one cut at that same cap (see `_Call`).

Without ``CHATCHAIN_CACHE``, chatchain's model reads no cache (`without_global_cache`), not
even LangChain's global one, which knows no users and whose hits would be billed as calls.

What chatchain adds around them:

- Each call reads and writes under its own key: the model is wrapped (`_CachedModel`), and
  each call goes to a copy of it whose ``cache`` is that call's view (`_CallCache`); the
  cache set on the model itself (`ResponseCache`) answers LangChain's own, unscoped key with
  a miss. `BaseChatModel.stream` never reads nor writes a cache, so a stream looks its key up
  first; a hit is answered by ``invoke`` as one chunk; a miss streams, and its whole reply is
  then cached, as ``invoke`` would have.
- Each hit is marked in its generation's ``generation_info`` (`MARK`), which the callbacks'
  ``on_llm_end`` sees and the reply does not carry, so that the turn's usage handler
  (`chatchain._metering.new_handler`) keeps its tokens apart: the turn records what it
  saved, not what it cost (a turn all of whose calls were hits is a cached turn, cost 0).
- The community classes revive rows with ``langchain_core.load.loads``, which warns on every
  hit (a beta API, and a pending change of its ``allowed_objects`` default) and can revive any
  core class by name: here a row is read as what chatchain caches, a `ChatGeneration` of an
  `AIMessage` of plain data, and anything else is a miss.
- Redis keys are ``chatchain:llm-cache:<sha256>`` rather than bare MD5 hex, and ``clear``
  deletes those keys only, where the community class flushes the whole database.
- A cache that fails (a locked file, Redis down) is logged and read as a miss: it never fails
  a turn that the endpoint can answer, nor one it already answered.

`langchain_community` warns on import that it is being sunset: imported lazily, with exactly
that warning filtered, as in `chatchain._metering`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from langchain_core.caches import BaseCache, InMemoryCache
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models._utils import _normalize_messages
from langchain_core.load import dumps
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, Generation, LLMResult
from langchain_core.runnables import (
    Runnable,
    RunnableBinding,
    RunnableConfig,
    RunnableWithFallbacks,
)
from langchain_core.runnables.base import RunnableBindingBase
from langchain_core.runnables.config import merge_configs

from chatchain import _streaming
from chatchain.errors import ConfigurationError

__all__ = [
    "FORMS",
    "MARK",
    "MEMORY_CACHE_SIZE",
    "SCOPES",
    "ResponseCache",
    "Uncached",
    "cache_off",
    "check_url",
    "open_cache",
    "result_is_hit",
    "with_cache",
    "without_global_cache",
]

logger = logging.getLogger("chatchain")

MARK = "chatchain_cached"
"""The ``generation_info`` key that marks a generation served from the cache."""

MEMORY_CACHE_SIZE = 1000
"""How many replies ``memory://`` keeps (the oldest go first)."""

FORMS = "memory://, sqlite:///path/to/cache.db or redis://host:6379/0"
"""The URL forms ``CHATCHAIN_CACHE`` accepts, for messages."""

_REDIS_SCHEMES = ("redis", "rediss", "unix")
_SQLITE_PREFIX = "sqlite:///"
_REDIS_PREFIX = "chatchain:llm-cache:"
_REDIS_TIMEOUT = 5.0  # seconds; a cache that does not answer is a miss, not a stuck turn

_ESCAPED = "__lc_escaped__"  # how `dumps` wraps user data that holds an "lc" key


def _invalid(url: str, why: str) -> ConfigurationError:
    scheme = url.partition(":")[0] or url
    return ConfigurationError(
        f"CHATCHAIN_CACHE={scheme}:... {why}. It takes {FORMS} (or leave it unset for no "
        "cache); fix it in the environment or in .env."
    )


def check_url(url: str) -> str:
    """``url`` if it names a cache chatchain can open (the file or server is not opened).

    Raises:
        ConfigurationError: It is none of the accepted forms; the message lists them.

    Example:
        >>> check_url("sqlite:///cache.db")
        'sqlite:///cache.db'
    """
    scheme = url.partition(":")[0].lower()
    if url.lower() == "memory://":
        return url
    if scheme == "sqlite":
        _sqlite_path(url)
        return url
    if scheme in _REDIS_SCHEMES:
        try:
            urlsplit(url).port  # noqa: B018 (a bad port raises here)
        except ValueError as exc:
            raise _invalid(url, f"is not a valid Redis URL ({exc})") from None
        return url
    raise _invalid(url, "is not a cache URL")


def _sqlite_path(url: str) -> Path:
    if not url.lower().startswith(_SQLITE_PREFIX):
        raise _invalid(url, "names no file: write sqlite:///relative.db or sqlite:////abs.db")
    path = url[len(_SQLITE_PREFIX) :]
    if not path or path == ":memory:" or "?" in path:
        raise _invalid(url, "names no file (for a cache in memory use memory://)")
    return Path(path).expanduser()


def open_cache(url: str, *, shared: bool = False) -> ResponseCache:
    """The cache ``url`` names (see `check_url`), ready to set on a chat model.

    Args:
        url: The cache's URL (``CHATCHAIN_CACHE``).
        shared: Serve any user's cached reply to every user (``CHATCHAIN_CACHE_SCOPE=shared``);
            by default a reply is served only to the user it was made for.

    Raises:
        ConfigurationError: The URL is not a cache's, Redis's driver is missing (the message
            says which ``pip install`` fixes it), or the SQLite file cannot be created.
    """
    check_url(url)
    scheme = url.partition(":")[0].lower()
    if scheme in _REDIS_SCHEMES:
        inner = _redis_cache(url)
    elif scheme == "sqlite":
        inner = _sqlite_cache(_sqlite_path(url))
    else:
        inner = InMemoryCache(maxsize=MEMORY_CACHE_SIZE)
    return ResponseCache(inner, shared=shared)


def _sqlite_cache(path: Path) -> BaseCache:
    # Created owner-only first, as the SQLite store does: cached replies are conversations.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        cache: BaseCache = _classes()[0](str(path))
    except Exception as exc:  # no folder, no permission, not a database (SQLAlchemy's errors)
        raise ConfigurationError(
            f"The cache file {path} (CHATCHAIN_CACHE) could not be created or opened: {exc}. "
            "Check that its folder is writable by this user, or choose another path."
        ) from exc
    return cache


def _redis_cache(url: str) -> BaseCache:
    try:
        import redis
    except ImportError as exc:
        raise ConfigurationError(
            f"CHATCHAIN_CACHE={url.partition(':')[0]}://... needs the Redis driver, which is "
            f"not installed ({exc}): pip install 'chatchain[redis]'."
        ) from exc
    client = redis.Redis.from_url(
        url, socket_timeout=_REDIS_TIMEOUT, socket_connect_timeout=_REDIS_TIMEOUT
    )
    cache: BaseCache = _classes()[1](client)
    return cache


def _revive(texts: Sequence[str | bytes]) -> list[Generation] | None:
    """The generations of a cached entry, or ``None`` (a miss) if one cannot be revived."""
    try:
        return [_generation_of(json.loads(text)) for text in texts]
    except Exception as exc:  # a row of another format or version: recomputed and replaced
        logger.warning("A cached reply could not be read (%s); asking the model instead.", exc)
        return None


def _generation_of(data: Any) -> ChatGeneration:
    """The chat generation ``langchain_core.load.dumps`` wrote as ``data``: a `ChatGeneration`
    of an `AIMessage` of plain data, nothing else (no class is looked up by name)."""
    kwargs = _constructor(data, "ChatGeneration")
    message = _plain(_constructor(kwargs.get("message"), "AIMessage"))
    info = _plain(kwargs.get("generation_info"))
    return ChatGeneration(message=AIMessage(**message), generation_info=info)


def _constructor(data: Any, name: str) -> dict[str, Any]:
    ids = data.get("id") if isinstance(data, dict) else None
    kwargs = data.get("kwargs") if isinstance(data, dict) else None
    if (
        data.get("type") != "constructor"
        or not ids
        or ids[-1] != name
        or not isinstance(kwargs, dict)
    ):
        raise ValueError(f"not a serialized {name}")
    return kwargs


def _plain(value: Any) -> Any:
    """A dumped value as plain data: escaped dicts (user data with an ``lc`` key) unwrapped,
    any serialized object refused."""
    if isinstance(value, dict):
        if set(value) == {_ESCAPED}:
            return value[_ESCAPED]
        if "lc" in value:
            raise ValueError("a serialized object where plain data was expected")
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


@functools.cache
def _classes() -> tuple[Callable[[str], BaseCache], Callable[[Any], BaseCache]]:
    """langchain-community's `SQLiteCache` and `RedisCache`, reviving rows as `_revive` does."""
    with warnings.catch_warnings():
        # The sunset notice of the archived package; see the module docstring.
        warnings.filterwarnings(
            "ignore", message=r".langchain-community. is being sunset", category=DeprecationWarning
        )
        from langchain_community import cache as community

    from sqlalchemy import select
    from sqlalchemy.orm import Session

    class SQLiteCache(community.SQLiteCache):
        def lookup(self, prompt: str, llm_string: str) -> list[Generation] | None:
            schema = self.cache_schema
            query: Any = (
                select(schema.response)
                .where(schema.prompt == prompt)
                .where(schema.llm == llm_string)
                .order_by(schema.idx)
            )
            with Session(self.engine) as session:
                rows = session.execute(query).fetchall()
            return _revive([row[0] for row in rows]) if rows else None

    class RedisCache(community.RedisCache):
        @staticmethod
        def _key(prompt: str, llm_string: str) -> str:
            digest = hashlib.sha256(f"{llm_string}\0{prompt}".encode()).hexdigest()
            return _REDIS_PREFIX + digest

        @staticmethod
        def _get_generations(results: dict[str | bytes, str | bytes]) -> list[Generation] | None:
            if not results:
                return None
            return _revive([results[index] for index in sorted(results, key=int)])

        def clear(self, **kwargs: Any) -> None:
            # Only the cache's keys: the community class flushes the whole database, which
            # may hold a chatchain store (or anything else).
            keys = list(self.redis.scan_iter(match=_REDIS_PREFIX + "*", count=1000))
            for start in range(0, len(keys), 1000):
                self.redis.unlink(*keys[start : start + 1000])

    return SQLiteCache, RedisCache


# -- marking hits -----------------------------------------------------------------------------


def _mark(generation: Generation) -> Generation:
    if not isinstance(generation, ChatGeneration):
        return generation
    # A copy: LangChain changes the message of the generation a lookup returns, and an
    # in-memory cache returns the one it keeps.
    return ChatGeneration(
        message=generation.message.model_copy(),
        generation_info={**(generation.generation_info or {}), MARK: True},
    )


_NOT_SENT = ("response_metadata", "usage_metadata")  # what LangChain keeps, never sends


def _sent(prompt: str) -> str:
    """LangChain's prompt key (the messages, dumped) without what is never sent."""
    try:
        messages = json.loads(prompt)
    except ValueError:
        return prompt
    if not isinstance(messages, list):
        return prompt
    for message in messages:
        kwargs = message.get("kwargs") if isinstance(message, dict) else None
        if isinstance(kwargs, dict):
            for name in _NOT_SENT:
                kwargs.pop(name, None)
    return json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


class _Marked(BaseCache):
    """A cache keyed by what is sent (`_sent`), whose hits come back marked (`MARK`) and
    whose failures are misses."""

    def __init__(self, inner: BaseCache) -> None:
        self.inner = inner

    def lookup(self, prompt: str, llm_string: str) -> list[Generation] | None:
        try:
            found = self.inner.lookup(_sent(prompt), llm_string)
        except Exception as exc:
            self._failed("read", exc)
            return None
        return None if found is None else [_mark(g) for g in found]

    async def alookup(self, prompt: str, llm_string: str) -> list[Generation] | None:
        try:
            found = await self.inner.alookup(_sent(prompt), llm_string)
        except Exception as exc:
            self._failed("read", exc)
            return None
        return None if found is None else [_mark(g) for g in found]

    def update(self, prompt: str, llm_string: str, return_val: Sequence[Generation]) -> None:
        try:
            self.inner.update(_sent(prompt), llm_string, return_val)
        except Exception as exc:
            self._failed("write", exc)

    async def aupdate(self, prompt: str, llm_string: str, return_val: Sequence[Generation]) -> None:
        try:
            await self.inner.aupdate(_sent(prompt), llm_string, return_val)
        except Exception as exc:
            self._failed("write", exc)

    def clear(self, **kwargs: Any) -> None:
        self.inner.clear(**kwargs)

    async def aclear(self, **kwargs: Any) -> None:
        await self.inner.aclear(**kwargs)

    def close(self) -> None:
        """Close the connections `open_cache` opened: the SQLite file's (its SQLAlchemy engine,
        which nothing else disposes) or the Redis client's. Idempotent."""
        engine = getattr(self.inner, "engine", None)  # SQLiteCache
        if engine is not None:
            engine.dispose()
        client = getattr(self.inner, "redis", None)  # RedisCache
        if client is not None:
            client.close()

    def _failed(self, what: str, exc: Exception) -> None:
        logger.warning(
            "The response cache (CHATCHAIN_CACHE) could not %s a reply (%s: %s); the turn "
            "goes on without it.",
            what,
            type(exc).__name__,
            exc,
        )


def result_is_hit(result: LLMResult) -> bool:
    """Whether a model call's result (what callbacks' ``on_llm_end`` get) came from the cache."""
    generations = [g for batch in result.generations for g in batch]
    return bool(generations) and all((g.generation_info or {}).get(MARK) for g in generations)


# -- keys: scope, prompt, model, reply cap ----------------------------------------------------

SCOPES = ("user", "shared")
"""The values of ``CHATCHAIN_CACHE_SCOPE``: who may be answered with a cached reply."""

_SENT_CAP = "chatchain_max_tokens"
"""The ``generation_info`` key of a cached reply: the ``max_tokens`` its call was sent with."""


class ResponseCache(_Marked):
    """The response cache as set on chatchain's model: read and written only per call.

    LangChain's own key names no user and holds the ``max_tokens`` of the call (a budget
    hold's), so LangChain's calls of `lookup` and `update` are a miss and do nothing: each
    call of `_CachedModel` reads and writes through its own key (`_Call`) with `get` and
    `put`. Any path that bypasses the wrapper (``batch``, say) is uncached, never shared.

    Args:
        inner: The backend (memory, SQLite or Redis).
        shared: ``CHATCHAIN_CACHE_SCOPE=shared``: every user may be answered with any user's
            cached reply. By default a reply is only ever served to the user it was made for.
    """

    def __init__(self, inner: BaseCache, *, shared: bool = False) -> None:
        super().__init__(inner)
        self.shared = shared

    def lookup(self, prompt: str, llm_string: str) -> None:
        return None

    async def alookup(self, prompt: str, llm_string: str) -> None:
        return None

    def update(self, prompt: str, llm_string: str, return_val: Sequence[Generation]) -> None:
        return None

    async def aupdate(self, prompt: str, llm_string: str, return_val: Sequence[Generation]) -> None:
        return None

    def get(self, prompt: str, llm: str) -> list[Generation] | None:
        """The marked generations kept under (``prompt``, ``llm``), or ``None``."""
        return super().lookup(prompt, llm)

    async def aget(self, prompt: str, llm: str) -> list[Generation] | None:
        """`get` for async callers."""
        return await super().alookup(prompt, llm)

    def put(self, prompt: str, llm: str, generations: Sequence[Generation]) -> None:
        """Keep ``generations`` under (``prompt``, ``llm``)."""
        super().update(prompt, llm, generations)

    async def aput(self, prompt: str, llm: str, generations: Sequence[Generation]) -> None:
        """`put` for async callers."""
        await super().aupdate(prompt, llm, generations)

    def scope(self, config: RunnableConfig | None) -> list[str | None]:
        """Who a call's cached reply may be served to: its user (``None``: calls without a
        user id, which share one scope of their own), or everyone when shared."""
        if self.shared:
            return ["shared", None]
        user = ((config or {}).get("configurable") or {}).get("user_id")
        return ["user", None if user is None else str(user)]


@dataclass(frozen=True)
class _Call:
    """One model call's place in the cache.

    Its key is the scope (`ResponseCache.scope`), the messages as sent, and the model and
    its parameters *without* the call's ``max_tokens`` (the configured cap stays in, being
    part of the model). The ``max_tokens`` the call is sent with (``cap``: a budget hold's,
    or the configured one) decides which reply may answer it:

    - A reply that ended by itself (any finish reason but ``length``) is what the endpoint
      writes under any cap it fits in: it answers a call whose cap is at least its
      completion tokens (or, when those are unknown, at least the cap it was made under).
    - A reply cut by its cap (``length``) is kept apart, under that cap, and answers a call
      with the same cap only: a smaller cap would get more than it held for, a larger one a
      reply cut shorter than it paid for. It never replaces a whole reply.
    """

    cache: ResponseCache
    prompt: str
    model: str
    scope: list[str | None]
    cap: int | None

    def _llm(self, cut: bool) -> str:
        key: dict[str, Any] = {"scope": self.scope, "model": self.model}
        if cut:
            key["cut_at"] = self.cap
        return json.dumps(key, sort_keys=True)

    def _whole(self, found: list[Generation] | None) -> list[Generation] | None:
        return found if found is not None and _fits(found, self.cap) else None

    def lookup(self) -> list[Generation] | None:
        """The cached reply that may answer this call, marked (`MARK`), or ``None``."""
        found = self._whole(self.cache.get(self.prompt, self._llm(cut=False)))
        return found if found is not None else self.cache.get(self.prompt, self._llm(cut=True))

    async def alookup(self) -> list[Generation] | None:
        """`lookup` for async callers."""
        found = self._whole(await self.cache.aget(self.prompt, self._llm(cut=False)))
        if found is not None:
            return found
        return await self.cache.aget(self.prompt, self._llm(cut=True))

    def update(self, generations: Sequence[Generation]) -> None:
        """Keep the call's reply, whole or cut (see the class docstring)."""
        self.cache.put(self.prompt, self._llm(_cut(generations)), self._tagged(generations))

    async def aupdate(self, generations: Sequence[Generation]) -> None:
        """`update` for async callers."""
        await self.cache.aput(self.prompt, self._llm(_cut(generations)), self._tagged(generations))

    def _tagged(self, generations: Sequence[Generation]) -> list[Generation]:
        return [
            g.model_copy(
                update={"generation_info": {**(g.generation_info or {}), _SENT_CAP: self.cap}}
            )
            for g in generations
        ]


def _finish_reason(generation: Generation) -> Any:
    reason = (generation.generation_info or {}).get("finish_reason")
    if reason is None and isinstance(generation, ChatGeneration):
        reason = generation.message.response_metadata.get("finish_reason")
    return reason


def _cut(generations: Sequence[Generation]) -> bool:
    return any(_finish_reason(g) == "length" for g in generations)


def _fits(generations: Sequence[Generation], cap: int | None) -> bool:
    """Whether whole replies would have come back the same under ``cap`` (``None``: none)."""
    if cap is None:
        return True
    for generation in generations:
        message = generation.message if isinstance(generation, ChatGeneration) else None
        usage = message.usage_metadata if isinstance(message, AIMessage) else None
        tokens = usage.get("output_tokens") if usage else None
        if tokens is None:  # an endpoint that sent no usage: the cap it was made under
            made_under = (generation.generation_info or {}).get(_SENT_CAP)
            if made_under is None or made_under > cap:
                return False
        elif tokens > cap:
            return False
    return True


class _CallCache(BaseCache):
    """The cache a chat model sees during one call: that call's `_Call`, whatever key
    LangChain computes (``found``: a reply already looked up, which a stream replays)."""

    def __init__(self, call: _Call, found: list[Generation] | None = None) -> None:
        self.call = call
        self.found = found

    def lookup(self, prompt: str, llm_string: str) -> list[Generation] | None:
        return self.found if self.found is not None else self.call.lookup()

    async def alookup(self, prompt: str, llm_string: str) -> list[Generation] | None:
        return self.found if self.found is not None else await self.call.alookup()

    def update(self, prompt: str, llm_string: str, return_val: Sequence[Generation]) -> None:
        self.call.update(return_val)

    async def aupdate(self, prompt: str, llm_string: str, return_val: Sequence[Generation]) -> None:
        await self.call.aupdate(return_val)

    def clear(self, **kwargs: Any) -> None:
        self.call.cache.clear(**kwargs)


# -- the model --------------------------------------------------------------------------------


def with_cache(model: Runnable[Any, Any], cache: ResponseCache) -> Runnable[Any, Any]:
    """``model`` with ``cache`` on each chat model in it (also in fallbacks and bindings).

    Each chat model is copied with ``cache=cache`` (one whose own ``cache`` is set keeps
    it) and wrapped (`_CachedModel`) so that each call, streamed or not, uses its own key;
    ``model`` itself is not changed.
    """
    if isinstance(model, RunnableWithFallbacks):
        return model.model_copy(
            update={
                "runnable": with_cache(model.runnable, cache),
                "fallbacks": [with_cache(fallback, cache) for fallback in model.fallbacks],
            }
        )
    if isinstance(model, BaseChatModel):
        if model.cache is not None:  # the caller's own choice
            return model
        return _CachedModel(bound=model.model_copy(update={"cache": cache}))
    if isinstance(model, RunnableBindingBase):  # .bind(...), the fallback's 408 wrapper
        return model.model_copy(update={"bound": with_cache(model.bound, cache)})
    return model


def without_global_cache(model: Runnable[Any, Any]) -> Runnable[Any, Any]:
    """``model``, calling each chat model in it whose ``cache`` is unset with ``cache=False``.

    A chat model whose ``cache`` is ``None`` reads LangChain's global cache
    (``set_llm_cache``), which knows no users and whose hits LangChain reports with the
    tokens of the reply they repeat: chatchain would record them as paid calls. chatchain's
    model uses the cache it is given (``CHATCHAIN_CACHE``) or none. ``model`` is wrapped
    (`Uncached`), not copied, so that later changes to it still count; a chat model whose
    own ``cache`` is set keeps it.
    """
    return Uncached(bound=model) if _reads_global_cache(model) else model


def _reads_global_cache(model: Runnable[Any, Any]) -> bool:
    if isinstance(model, RunnableWithFallbacks):
        return any(_reads_global_cache(m) for m in [model.runnable, *model.fallbacks])
    if isinstance(model, BaseChatModel):
        return model.cache is None
    if isinstance(model, RunnableBindingBase):
        return _reads_global_cache(model.bound)
    return False


def cache_off(model: Runnable[Any, Any]) -> Runnable[Any, Any]:
    """A copy of ``model`` with ``cache=False`` on each chat model whose ``cache`` is unset
    (made for one call, as `Uncached` does, where a wrapper cannot be used)."""
    if isinstance(model, RunnableWithFallbacks):
        return model.model_copy(
            update={
                "runnable": cache_off(model.runnable),
                "fallbacks": [cache_off(fallback) for fallback in model.fallbacks],
            }
        )
    if isinstance(model, BaseChatModel):
        return model if model.cache is not None else model.model_copy(update={"cache": False})
    if isinstance(model, RunnableBindingBase):
        return model.model_copy(update={"bound": cache_off(model.bound)})
    return model


class Uncached(RunnableBinding[Any, Any]):
    """A model whose calls never read LangChain's global cache (see `without_global_cache`).

    While a global cache is set, each call goes to a copy of the model made then, with
    ``cache=False``. While none is (the usual case), a chat model whose ``cache`` is unset
    reads and writes none (`BaseChatModel._generate_with_cache`), so the call goes to the
    model itself: no copy, and LangChain's own per-model state (its serialized form, built
    on a model's first call) is kept from call to call. Streams need no copy:
    `BaseChatModel.stream` reads no cache.
    """

    batch = Runnable.batch  # through `invoke`, not straight to the model
    abatch = Runnable.abatch

    def _now(self) -> Runnable[Any, Any]:
        return RunnableBinding(
            bound=cache_off(self.bound),
            kwargs=self.kwargs,
            config=self.config,
            config_factories=self.config_factories,
        )

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        if get_llm_cache() is None:
            return super().invoke(input, config, **kwargs)
        return self._now().invoke(input, config, **kwargs)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        if get_llm_cache() is None:
            return await super().ainvoke(input, config, **kwargs)
        return await self._now().ainvoke(input, config, **kwargs)


def _key(model: BaseChatModel, input: Any, kwargs: dict[str, Any]) -> tuple[str, str]:
    """The messages and model string ``model.invoke(input, **kwargs)`` has in LangChain's
    key, as `BaseChatModel._generate_with_cache` computes them."""
    kwargs = dict(kwargs)
    stop = kwargs.pop("stop", None)
    kwargs.pop("ls_structured_output_format", None)
    kwargs.pop("structured_output_format", None)
    messages = _normalize_messages(model._convert_input(input).to_messages())
    normalized = [m.model_copy(update={"id": None}) if m.id is not None else m for m in messages]
    return dumps(normalized), model._get_llm_string(stop=stop, **kwargs)


def _with_cache_on(model: Runnable[Any, Any], cache: BaseCache) -> Runnable[Any, Any]:
    """A copy of ``model`` (a chat model in bindings) with ``cache`` on its chat model."""
    if isinstance(model, RunnableBindingBase):
        return model.model_copy(update={"bound": _with_cache_on(model.bound, cache)})
    return cast(BaseChatModel, model).model_copy(update={"cache": cache})


def _as_chunk(reply: BaseMessage) -> AIMessageChunk:
    return AIMessageChunk(**reply.model_dump(exclude={"type"}))


class _CachedModel(RunnableBinding[Any, Any]):
    """A chat model with the cache on, each call under its own key (see `_Call`).

    Its attributes are the model's (``model_name``, ``max_tokens``...), as with any binding.
    `BaseChatModel.stream` never reads nor writes a cache, so a stream looks its key up
    first: a hit is answered by ``invoke`` (which fires the callbacks a call does) as one
    chunk; a miss streams, and its whole reply is then cached, as ``invoke`` would have.
    """

    # `RunnableBinding` hands these to the model, whose streams skip the cache; `Runnable`'s
    # own versions go through `stream` and `astream` (a chain's last step is transformed).
    transform = Runnable.transform
    atransform = Runnable.atransform

    def _call(self, input: Any, config: RunnableConfig | None, kwargs: dict[str, Any]) -> _Call:
        """Where a call with ``kwargs`` sits in the cache: the model may sit in bindings
        (``.bind(...)``, ``bind_tools``), whose arguments the call gets too."""
        model, merged = self.bound, {**self.kwargs, **kwargs}
        while isinstance(model, RunnableBindingBase):
            merged = {**model.kwargs, **merged}  # an outer binding's arguments win
            model = model.bound
        chat = cast(BaseChatModel, model)
        cache = cast(ResponseCache, chat.cache)
        cap = merged.pop("max_tokens", None)
        if cap is None:
            cap = getattr(chat, "max_tokens", None)
        prompt, llm = _key(chat, input, merged)
        scope = cache.scope(merge_configs(self.config, config))
        return _Call(cache, _sent(prompt), llm, scope, cap)

    def _on(self, cache: BaseCache) -> Runnable[Any, Any]:
        """This binding with ``cache`` on a copy of its chat model, for one call."""
        return RunnableBinding(
            bound=_with_cache_on(self.bound, cache),
            kwargs=self.kwargs,
            config=self.config,
            config_factories=self.config_factories,
        )

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        view = _CallCache(self._call(input, config, kwargs))
        return self._on(view).invoke(input, config, **kwargs)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        view = _CallCache(self._call(input, config, kwargs))
        return await self._on(view).ainvoke(input, config, **kwargs)

    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        call = self._call(input, config, kwargs)
        found = call.lookup()
        if found is not None:
            yield _as_chunk(self._on(_CallCache(call, found)).invoke(input, config, **kwargs))
            return
        config, kwargs = self._merge_configs(config), {**self.kwargs, **kwargs}
        # Its text, not its chunks (see `_streaming`), in the turn's text if it is in one.
        reply = _streaming.StreamedReply(_streaming.shared_text(config))
        for chunk in _streaming.stream(self.bound, input, config, **kwargs):
            if isinstance(chunk, AIMessageChunk):
                reply.add(chunk)
            yield chunk
        if reply:  # the stream ran to its end: cache the whole reply
            call.update([ChatGeneration(message=reply.message())])

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        call = self._call(input, config, kwargs)
        found = await call.alookup()
        if found is not None:
            view = _CallCache(call, found)
            yield _as_chunk(await self._on(view).ainvoke(input, config, **kwargs))
            return
        config, kwargs = self._merge_configs(config), {**self.kwargs, **kwargs}
        reply = _streaming.StreamedReply(_streaming.shared_text(config))
        async for chunk in _streaming.astream(self.bound, input, config, **kwargs):
            if isinstance(chunk, AIMessageChunk):
                reply.add(chunk)
            yield chunk
        if reply:
            await call.aupdate([ChatGeneration(message=reply.message())])
