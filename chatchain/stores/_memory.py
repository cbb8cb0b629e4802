"""The in-memory store: a dict of `ChatMessageHistory`, one per session id."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import replace
from datetime import datetime
from typing import Any

from langchain_core.messages import BaseMessage

from chatchain._locks import SessionLocks
from chatchain._session_history import SessionHistory
from chatchain.budgets import BudgetHold, BudgetLimit, BudgetRefusal, first_refusal
from chatchain.stores._base import (
    Fence,
    HistoryStore,
    LedgerBackend,
    SessionInfo,
    Summary,
    TitleBackend,
    UserBackend,
    check_user_changes,
    newest_first,
    session_times,
    user_exists,
    utcnow,
)
from chatchain.stores._ledger import in_scope, scopes_of
from chatchain.usage import Scope, Usage, UsageEntry
from chatchain.users import User

__all__ = ["MemoryLedger", "MemoryStore", "MemoryUsers"]


class MemoryLedger(LedgerBackend):
    """A usage ledger in this process's memory: entries, totals per scope and budget holds.

    The ledger of `MemoryStore`, and of any store `as_store` completes. Its ``_guard`` (a
    re-entrant lock) is the one lock of a store that combines it: one step for every writer.
    """

    def __init__(self) -> None:
        self._guard = threading.RLock()
        self._entries: list[UsageEntry] = []
        self._entry_ids: set[str] = set()
        self._totals: dict[tuple[Scope, str], Usage] = {}
        self._holds: dict[str, BudgetHold] = {}

    def record_usage(self, entry: UsageEntry, *, release: str | None = None) -> None:
        with self._guard:
            if release is not None:
                self._holds.pop(release, None)
            if entry.id in self._entry_ids:
                return
            self._entry_ids.add(entry.id)
            self._entries.append(entry)
            usage = replace(entry.usage(), model=None, first_token_s=None)
            for scope in scopes_of(entry):
                self._totals[scope] = self._totals.get(scope, Usage()) + usage

    def usage_total(self, scope: Scope, key: str) -> Usage:
        with self._guard:
            return self._totals.get((scope, key), Usage())

    def usage_entries(
        self,
        *,
        session_id: str | None = None,
        user_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[UsageEntry]:
        with self._guard:
            entries = list(self._entries)
        return sorted(
            (
                e
                for e in entries
                if (session_id is None or e.session_id == session_id)
                and (user_id is None or e.user_id == user_id)
                and (since is None or e.at >= since)
                and (until is None or e.at < until)
            ),
            key=lambda e: e.at,
        )

    def hold_budget(self, hold: BudgetHold, limits: Sequence[BudgetLimit]) -> BudgetRefusal | None:
        with self._guard:
            now = utcnow()
            for expired in [h.id for h in self._holds.values() if h.expires_at <= now]:
                del self._holds[expired]
            refusal = first_refusal(hold, limits, self._spending)
            if refusal is None:
                self._holds[hold.id] = hold
            return refusal

    def _spending(self, limit: BudgetLimit) -> tuple[Usage, list[BudgetHold]]:
        held = [h for h in self._holds.values() if h.counts_for(limit.scope, limit.key)]
        return self._spent(limit), held

    def _spent(self, limit: BudgetLimit) -> Usage:
        """A limit's spending: the running total, or a period's entries summed (only what
        `chatchain.budgets.check_limit` reads: tokens and the priced entries' cost)."""
        if limit.since is None:
            return self.usage_total(limit.scope, limit.key)
        since = limit.since
        period = [e for e in self._entries if e.at >= since and in_scope(e, limit.scope, limit.key)]
        tokens = sum(e.total_tokens for e in period)
        cost = sum(e.cost_usd for e in period if e.cost_usd is not None)
        return Usage(total_tokens=tokens, cost_usd=cost, priced_cost_usd=cost)

    def release_budget(self, hold_id: str) -> None:
        with self._guard:
            self._holds.pop(hold_id, None)

    # In memory there is nothing to wait for: no thread hop for the async twins.
    async def arecord_usage(self, entry: UsageEntry, *, release: str | None = None) -> None:
        self.record_usage(entry, release=release)

    async def ahold_budget(
        self, hold: BudgetHold, limits: Sequence[BudgetLimit]
    ) -> BudgetRefusal | None:
        return self.hold_budget(hold, limits)

    async def arelease_budget(self, hold_id: str) -> None:
        self.release_budget(hold_id)


class MemoryUsers(UserBackend):
    """Users in this process's memory (of `MemoryStore`): a dict by name, and one by hash."""

    def __init__(self) -> None:
        self._users_guard = threading.Lock()
        self._users: dict[str, tuple[User, str]] = {}
        self._by_hash: dict[str, str] = {}

    def add_user(self, user: User, token_hash: str) -> None:
        with self._users_guard:
            if user.name in self._users:
                raise user_exists(user.name)
            self._users[user.name] = (user, token_hash)
            self._by_hash[token_hash] = user.name

    def get_user(self, name: str) -> User | None:
        found = self._users.get(name)
        return None if found is None else found[0]

    def find_user(self, token_hash: str) -> tuple[User, str] | None:
        with self._users_guard:
            name = self._by_hash.get(token_hash)
            return None if name is None else self._users[name]

    def list_users(self) -> list[User]:
        with self._users_guard:
            users = [user for user, _ in self._users.values()]
        return sorted(users, key=lambda u: (u.created_at, u.name))

    def update_user(
        self, name: str, changes: Mapping[str, Any], *, token_hash: str | None = None
    ) -> User | None:
        check_user_changes(changes)
        with self._users_guard:
            found = self._users.get(name)
            if found is None:
                return None
            user, old_hash = replace(found[0], **changes), found[1]
            if token_hash is not None:
                del self._by_hash[old_hash]
                self._by_hash[token_hash] = name
            self._users[name] = (user, old_hash if token_hash is None else token_hash)
            return user

    # In memory there is nothing to wait for: no thread hop for the async twins.
    async def afind_user(self, token_hash: str) -> tuple[User, str] | None:
        return self.find_user(token_hash)


class MemoryTitles(TitleBackend):
    """Session titles in a dict of this process."""

    def __init__(self) -> None:
        self._titles: dict[str, str] = {}

    def titles(self, session_ids: Sequence[str]) -> dict[str, str]:
        found = {sid: self._titles.get(sid) for sid in session_ids}
        return {sid: title for sid, title in found.items() if title is not None}

    def set_title(self, session_id: str, title: str | None) -> None:
        if title is None:
            self._titles.pop(session_id, None)
        else:
            self._titles[session_id] = title


class MemoryStore(MemoryLedger, MemoryUsers, MemoryTitles, HistoryStore):
    """Sessions in this process's memory; gone when it exits. The library's default store.

    Example:
        >>> store = MemoryStore()
        >>> store("dp123").add_user_message("hi")
        >>> store.sessions(), store.count("dp123")
        (['dp123'], 1)
    """

    def __init__(self, *, lock_timeout: float = 120.0) -> None:
        self._histories: dict[str, SessionHistory] = {}
        self._created: dict[str, datetime] = {}
        self._updated: dict[str, datetime] = {}
        self._summaries: dict[str, Summary] = {}
        self._pending: dict[str, tuple[str, str]] = {}  # session id -> (token, record)
        MemoryLedger.__init__(self)
        MemoryUsers.__init__(self)
        MemoryTitles.__init__(self)
        self._locks = SessionLocks(lock_timeout)

    @classmethod
    def from_url(cls, url: str = "memory://", *, lock_timeout: float = 120.0) -> MemoryStore:
        """A new, empty store for ``memory://`` (what `open_store` calls; the URL says no more)."""
        return cls(lock_timeout=lock_timeout)

    def __call__(self, session_id: str) -> SessionHistory:
        """The session's `ChatMessageHistory` (the same object on every call)."""
        history = self._histories.get(session_id)
        if history is None:
            with self._guard:
                history = self._histories.setdefault(session_id, SessionHistory())
        return history

    def append(self, session_id: str, messages: Sequence[BaseMessage]) -> None:
        with self._guard:
            self(session_id).add_messages(messages)
            now = utcnow()
            self._created.setdefault(session_id, now)
            self._updated[session_id] = now

    def load(self, session_id: str, start: int = 0, stop: int | None = None) -> list[BaseMessage]:
        history = self._histories.get(session_id)
        return [] if history is None else history.messages[start:stop]

    def count(self, session_id: str) -> int:
        history = self._histories.get(session_id)
        return 0 if history is None else len(history.messages)

    def sessions(self) -> list[str]:
        with self._guard:
            live = [sid for sid, history in self._histories.items() if history.messages]
            return sorted(live, key=lambda sid: self._created.get(sid, utcnow()))

    def info(self, session_id: str) -> SessionInfo | None:
        with self._guard:
            count = self.count(session_id)
            if not count:
                return None
            now = utcnow()
            created = self._created.get(session_id, now)
            return SessionInfo(session_id, count, created, self._updated.get(session_id, created))

    def session_infos(self, prefix: str = "", limit: int | None = None) -> list[SessionInfo]:
        # A pass over the ids in memory, without a lookup per session of other users.
        with self._guard:
            matches = [sid for sid in self._histories if sid.startswith(prefix)]
            infos = [info for sid in matches if (info := self.info(sid)) is not None]
        return newest_first(infos, limit)

    def delete(self, session_id: str) -> None:
        with self._guard:
            for table in (self._histories, self._created, self._updated, self._summaries):
                table.pop(session_id, None)

    def prune(self, before: datetime) -> list[str]:
        with self._guard:
            old = [sid for sid in self.sessions() if self._updated.get(sid, before) < before]
            for session_id in old:
                self.delete(session_id)
            return old

    def get_summary(self, session_id: str) -> Summary | None:
        return self._summaries.get(session_id)

    def set_summary(self, session_id: str, summary: Summary) -> None:
        with self._guard:
            self._summaries[session_id] = summary

    def replace_session(
        self,
        session_id: str,
        messages: Sequence[BaseMessage],
        summary: Summary | None = None,
        *,
        created_at: datetime | None = None,
        updated_at: datetime | None = None,
    ) -> None:
        created, updated = session_times(created_at, updated_at)
        with self._guard:
            # One assignment, so a reader (who takes no guard) sees the old list or the new;
            # the history object stays the one `__call__` handed out.
            self(session_id).messages = list(messages)
            self._created[session_id] = created
            self._updated[session_id] = updated
            if summary is None:
                self._summaries.pop(session_id, None)
            else:
                self._summaries[session_id] = summary

    def write_pending(self, session_id: str, token: str, record: str) -> bool:
        with self._guard:
            held = self._pending.get(session_id)
            if held is not None and held[0] != token:
                return False
            self._pending[session_id] = (token, record)
            return True

    def read_pending(self, session_id: str) -> tuple[str, str] | None:
        with self._guard:
            return self._pending.get(session_id)

    def drop_pending(self, session_id: str, token: str) -> bool:
        with self._guard:
            held = self._pending.get(session_id)
            if held is None or held[0] != token:
                return False
            del self._pending[session_id]
            return True

    def pending_sessions(self) -> list[str]:
        with self._guard:
            return sorted(self._pending)

    async def awrite_pending(self, session_id: str, token: str, record: str) -> bool:
        return self.write_pending(session_id, token, record)  # no I/O: no thread

    async def aread_pending(self, session_id: str) -> tuple[str, str] | None:
        return self.read_pending(session_id)

    async def adrop_pending(self, session_id: str, token: str) -> bool:
        return self.drop_pending(session_id, token)

    def lock(self, session_id: str) -> AbstractContextManager[Fence | None]:
        return self._locks.locked(session_id)  # in one process a lock cannot be lost: no fence

    def alock(self, session_id: str) -> AbstractAsyncContextManager[Fence | None]:
        return self._locks.alocked(session_id)

    def commit_turn(
        self,
        session_id: str,
        messages: Sequence[BaseMessage],
        entry: UsageEntry | None = None,
        *,
        release: str | None = None,
        fence: Fence | None = None,
    ) -> None:
        with self._guard:  # the base's steps, as one step for every other writer
            if entry is not None and entry.id in self._entry_ids:  # saved before (a replay)
                self.record_usage(entry, release=release)
                return
            super().commit_turn(session_id, messages, entry, release=release, fence=fence)

    async def acommit_turn(
        self,
        session_id: str,
        messages: Sequence[BaseMessage],
        entry: UsageEntry | None = None,
        *,
        release: str | None = None,
        fence: Fence | None = None,
    ) -> None:
        self.commit_turn(session_id, messages, entry, release=release, fence=fence)

    # In memory there is nothing to wait for: no thread hop for the async twins.
    async def aappend(self, session_id: str, messages: Sequence[BaseMessage]) -> None:
        self.append(session_id, messages)

    async def aload(
        self, session_id: str, start: int = 0, stop: int | None = None
    ) -> list[BaseMessage]:
        return self.load(session_id, start, stop)

    async def acount(self, session_id: str) -> int:
        return self.count(session_id)

    async def adelete(self, session_id: str) -> None:
        self.delete(session_id)

    async def aget_summary(self, session_id: str) -> Summary | None:
        return self.get_summary(session_id)

    async def aset_summary(self, session_id: str, summary: Summary) -> None:
        self.set_summary(session_id, summary)
