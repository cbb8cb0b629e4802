"""The storage contract every history store meets, and the message history it hands out.

A store keeps, per session id: the full transcript (messages in order, never trimmed), a
running summary of older messages, and when the session was created and last written. It
also provides one writer per session (a lock that spans processes for shared backends).

The contract is four small ones that a store combines: `HistoryBackend` (transcripts),
`SummaryBackend`, `LockBackend` and `LedgerBackend`; `HistoryStore` is all four plus session
times, and is what the built-in stores implement. Everything else (the
`BaseChatMessageHistory` view, export and import, async twins) is built on the primitives
here, so behaviour cannot drift between backends. The built-in stores also keep the users of
a chat service (`UserBackend`), the titles people give their sessions (`TitleBackend`) and
each user's requests per minute and open streams, counted for every process at once
(`ThrottleBackend`).
Messages are stored as JSON
(``langchain_core.messages.message_to_dict``), never pickled.
"""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import BaseMessage, message_to_dict, messages_from_dict

from chatchain.budgets import BudgetHold, BudgetLimit, BudgetRefusal
from chatchain.errors import (
    ConfigurationError,
    InvalidInputError,
    SessionExistsError,
    SessionLockLostError,
    UserExistsError,
)
from chatchain.usage import Scope, Usage, UsageEntry
from chatchain.users import User

__all__ = [
    "DEFAULT_LEASE",
    "EXPORT_FORMAT",
    "USER_CHANGES",
    "Fence",
    "HistoryBackend",
    "HistoryStore",
    "LedgerBackend",
    "LockBackend",
    "SessionInfo",
    "StoreHistory",
    "Summary",
    "SummaryBackend",
    "ThrottleBackend",
    "TitleBackend",
    "UserBackend",
    "driver_missing",
    "dump_message",
    "load_message",
]

EXPORT_FORMAT = "chatchain.session/1"

DEFAULT_LEASE = 10.0
"""Seconds a session's lock outlives a process that died holding it (SQLite and Redis; a
PostgreSQL lock goes with its connection at once). A live holder renews it every third of
that, so it never bounds a turn; it is short so that the session of a killed process is
usable again within seconds. A process stalled for longer loses its lock, and the fence then
refuses its reply (`SessionLockLostError`)."""


def dump_message(message: BaseMessage) -> str:
    """A message as JSON text: every type, field and metadata, any Unicode."""
    return json.dumps(message_to_dict(message), ensure_ascii=False, separators=(",", ":"))


def load_message(text: str | bytes) -> BaseMessage:
    """The message `dump_message` wrote."""
    return messages_from_dict([json.loads(text)])[0]


def driver_missing(store: str, extra: str, exc: ImportError) -> ConfigurationError:
    """The error for a store whose optional driver is not installed: which extra fixes it.

    Args:
        store: The store's name, as a user knows it (``"Redis"``).
        extra: The chatchain extra that installs its driver (``"redis"``).
        exc: The import error (its message is kept).
    """
    return ConfigurationError(
        f"The {store} store needs its driver, which is not installed ({exc}): "
        f"pip install 'chatchain[{extra}]'."
    )


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Fence:
    """Proof that a turn holds its session's lock, which `HistoryStore.commit_turn` checks.

    `HistoryStore.lock` yields one (or ``None`` where a lock cannot be lost, as in memory).
    It is opaque: pass it back as it is.

    Attributes:
        session_id: The session the lock is for.
        token: What names this holder of the lock in the store (a lease owner or lock token).
    """

    session_id: str
    token: str


def lock_lost(session_id: str, messages: Sequence[BaseMessage]) -> SessionLockLostError:
    """The error for a turn whose fenced write the store refused: it lost its lock."""
    reply = next((m for m in reversed(messages) if m.type == "ai"), None)
    text = "" if reply is None else reply.text if isinstance(reply.text, str) else str(reply.text)
    return SessionLockLostError(
        f"The reply on session {session_id!r} was not saved: this turn's lock on the session "
        "expired while it ran (the process or the store stalled for longer than the lock's "
        "lease) and another turn took the session and wrote to it, so saving this one would "
        "have mixed the two. Its usage was recorded, as the endpoint billed it. The reply is "
        "in this error's `reply` attribute: show it, or send the message again.",
        session_id=session_id,
        reply=text,
        messages=list(messages),
    )


@dataclass(frozen=True)
class Summary:
    """A running summary of a session's oldest messages.

    Attributes:
        text: The summary.
        covers: How many of the session's first messages it summarises.
    """

    text: str
    covers: int


@dataclass(frozen=True)
class SessionInfo:
    """What a store knows about a session besides its messages."""

    session_id: str
    message_count: int
    created_at: datetime
    updated_at: datetime


class HistoryBackend(ABC):
    """Transcripts: the one part of the storage contract every store provides.

    A third-party store may implement only this (five methods); `as_store` then adds the
    rest in this process (see ``docs/writing-a-store.md`` for what that gives up). A
    backend is itself a ``get_session_history`` callable.

    The async twins run the sync methods in a thread by default; backends with an async
    driver override them.
    """

    @abstractmethod
    def append(self, session_id: str, messages: Sequence[BaseMessage]) -> None:
        """Add messages at the end of a session, all or none, creating it if needed."""

    @abstractmethod
    def load(self, session_id: str, start: int = 0, stop: int | None = None) -> list[BaseMessage]:
        """The messages ``[start:stop]`` of a session, oldest first, as Python slices them.

        ``start`` may be negative (``-10`` is the last ten). ``stop`` is ``None`` or >= 0.
        A backend reads only the messages asked for: loading the last ten costs the same for
        a session of ten messages as for one of a hundred thousand.
        """

    @abstractmethod
    def count(self, session_id: str) -> int:
        """How many messages a session holds (0 for an unknown session)."""

    @abstractmethod
    def sessions(self) -> list[str]:
        """The ids of the sessions that hold messages, oldest first."""

    @abstractmethod
    def delete(self, session_id: str) -> None:
        """Forget a session: messages, summary and times. An unknown id is not an error."""

    def __call__(self, session_id: str) -> BaseChatMessageHistory:
        """The session's history, as `RunnableWithMessageHistory` expects it."""
        return StoreHistory(self, session_id)

    async def aappend(self, session_id: str, messages: Sequence[BaseMessage]) -> None:
        """`append` for async callers."""
        await asyncio.to_thread(self.append, session_id, messages)

    async def aload(
        self, session_id: str, start: int = 0, stop: int | None = None
    ) -> list[BaseMessage]:
        """`load` for async callers."""
        return await asyncio.to_thread(self.load, session_id, start, stop)

    async def acount(self, session_id: str) -> int:
        """`count` for async callers."""
        return await asyncio.to_thread(self.count, session_id)

    async def adelete(self, session_id: str) -> None:
        """`delete` for async callers."""
        await asyncio.to_thread(self.delete, session_id)


class SummaryBackend(ABC):
    """A running summary per session (the window's summary of older turns)."""

    @abstractmethod
    def get_summary(self, session_id: str) -> Summary | None:
        """The session's running summary, if it has one."""

    @abstractmethod
    def set_summary(self, session_id: str, summary: Summary) -> None:
        """Replace the session's running summary."""

    async def aget_summary(self, session_id: str) -> Summary | None:
        """`get_summary` for async callers."""
        return await asyncio.to_thread(self.get_summary, session_id)

    async def aset_summary(self, session_id: str, summary: Summary) -> None:
        """`set_summary` for async callers."""
        await asyncio.to_thread(self.set_summary, session_id, summary)


class LockBackend(ABC):
    """One writer per session: threads, and other processes for shared stores."""

    @abstractmethod
    def lock(self, session_id: str) -> AbstractContextManager[Fence | None]:
        """Take the session for one turn (threads, and other processes for shared stores).

        Yields the `Fence` that `commit_turn` checks, where the lock is a lease that a
        stalled holder can lose (``None`` where it cannot).

        Raises:
            SessionBusyError: Another turn kept it past the lock timeout.
        """

    @abstractmethod
    def alock(self, session_id: str) -> AbstractAsyncContextManager[Fence | None]:
        """`lock` for asyncio tasks, without blocking the event loop.

        Raises:
            SessionBusyError: Another turn kept it past the lock timeout.
        """


class LedgerBackend(ABC):
    """The usage ledger: entries, totals per scope and budget holds (see chatchain.usage)."""

    @abstractmethod
    def record_usage(self, entry: UsageEntry, *, release: str | None = None) -> None:
        """Add ``entry`` to the ledger, and drop the budget hold ``release``, all or nothing.

        The entry counts towards the totals of its session, of its user (when it has one) and
        of ``"all"``; `usage_total` must read them without scanning the entries. Recording an
        entry whose id is already in the ledger changes nothing.
        """

    @abstractmethod
    def usage_total(self, scope: Scope, key: str) -> Usage:
        """The total of a session (``"session"``, id), a user (``"user"``, id) or of
        everything (``"all"``, ``""``); ``model`` and ``first_token_s`` are ``None``.

        Costs: ``cost_usd`` is the sum of the priced entries, or ``None`` when ``unpriced``
        (the count of entries without a price) is above 0.
        """

    @abstractmethod
    def usage_entries(
        self,
        *,
        session_id: str | None = None,
        user_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[UsageEntry]:
        """The entries matching every filter given, oldest first; ``since <= at < until``."""

    @abstractmethod
    def hold_budget(self, hold: BudgetHold, limits: Sequence[BudgetLimit]) -> BudgetRefusal | None:
        """Keep ``hold`` unless it would pass one of ``limits``, atomically.

        For each limit, the scope's spending is its `usage_total` plus the unexpired holds
        that count for it (`BudgetHold.counts_for`); `chatchain.budgets.first_refusal`
        decides (call it inside the atomic step).
        The check of every limit and the keeping of the hold are one atomic step across
        threads and processes, so concurrent turns cannot overspend together. Returns
        ``None`` when the hold is kept, else the first refusal (and keeps nothing).
        """

    @abstractmethod
    def release_budget(self, hold_id: str) -> None:
        """Drop a hold (unknown or expired ids are not an error)."""

    async def arecord_usage(self, entry: UsageEntry, *, release: str | None = None) -> None:
        """`record_usage` for async callers."""
        await asyncio.to_thread(self.record_usage, entry, release=release)

    async def ahold_budget(
        self, hold: BudgetHold, limits: Sequence[BudgetLimit]
    ) -> BudgetRefusal | None:
        """`hold_budget` for async callers."""
        return await asyncio.to_thread(self.hold_budget, hold, limits)

    async def arelease_budget(self, hold_id: str) -> None:
        """`release_budget` for async callers."""
        await asyncio.to_thread(self.release_budget, hold_id)


USER_CHANGES = frozenset(
    {"budget_usd", "daily_usd", "monthly_usd", "requests_per_minute", "revoked", "streams"}
)
"""The `User` fields `UserBackend.update_user` changes (the name and creation time never)."""


def user_exists(name: str) -> UserExistsError:
    """The error for adding a user whose name is taken."""
    return UserExistsError(
        f"There is a user {name!r} already: pick another name, or give them a new token with "
        f"chatchain users rotate {name}."
    )


def check_user_changes(changes: Mapping[str, object]) -> None:
    """Refuse changes `UserBackend.update_user` does not make (a bug in the caller)."""
    unknown = set(changes) - USER_CHANGES
    if unknown:
        raise ValueError(f"Cannot change {sorted(unknown)} of a user: only {sorted(USER_CHANGES)}.")


class UserBackend(ABC):
    """The users of a chat service (`chatchain.users.Users`), kept in the store so that every
    process sharing it sees them: each user's `User` record and the SHA-256 hash of their
    token (never the token).

    The async twins run the sync methods in a thread by default.
    """

    @abstractmethod
    def add_user(self, user: User, token_hash: str) -> None:
        """Add a user, atomically across processes.

        Raises:
            UserExistsError: A user of that name exists (``user`` was not stored).
        """

    @abstractmethod
    def get_user(self, name: str) -> User | None:
        """The user of that name, or ``None``."""

    @abstractmethod
    def find_user(self, token_hash: str) -> tuple[User, str] | None:
        """The user whose token hashes to ``token_hash``, with the hash as stored; ``None``
        when there is none. Revoked users are found too (the caller refuses them)."""

    @abstractmethod
    def list_users(self) -> list[User]:
        """Every user, oldest first (then by name)."""

    @abstractmethod
    def update_user(
        self, name: str, changes: Mapping[str, Any], *, token_hash: str | None = None
    ) -> User | None:
        """Change a user's fields (`USER_CHANGES`) and, when given, replace their token's
        hash (the old token then finds no one), in one atomic step.

        Returns:
            The user as changed, or ``None`` if there is no user of that name.
        """

    async def aadd_user(self, user: User, token_hash: str) -> None:
        """`add_user` for async callers."""
        await asyncio.to_thread(self.add_user, user, token_hash)

    async def aget_user(self, name: str) -> User | None:
        """`get_user` for async callers."""
        return await asyncio.to_thread(self.get_user, name)

    async def afind_user(self, token_hash: str) -> tuple[User, str] | None:
        """`find_user` for async callers."""
        return await asyncio.to_thread(self.find_user, token_hash)

    async def alist_users(self) -> list[User]:
        """`list_users` for async callers."""
        return await asyncio.to_thread(self.list_users)

    async def aupdate_user(
        self, name: str, changes: Mapping[str, Any], *, token_hash: str | None = None
    ) -> User | None:
        """`update_user` for async callers."""
        return await asyncio.to_thread(
            partial(self.update_user, token_hash=token_hash), name, changes
        )


class TitleBackend(ABC):
    """The titles people give their sessions (the chat page's rename), apart from the
    transcript: a title is not a message, and setting one never touches the session's
    messages, times or lock. A session without one is shown by its first message."""

    @abstractmethod
    def titles(self, session_ids: Sequence[str]) -> dict[str, str]:
        """The titles of those of ``session_ids`` that have one."""

    @abstractmethod
    def set_title(self, session_id: str, title: str | None) -> None:
        """Give ``session_id`` the title ``title``; ``None`` removes its title."""


class ThrottleBackend(ABC):
    """Each user's requests per minute and open streams, counted in the store so that a limit
    holds across the workers and machines that share it (`chatchain.server`'s throttle).

    Both counts are checked and changed in one atomic step, so that processes counting at
    the same moment never let more through than the limit between them. Times are the
    store's own clock where it has one (Redis, PostgreSQL), the machine's for SQLite.

    - Requests: a moving window. A request is counted when fewer than ``limit`` were counted
      for the user in the ``window`` seconds before it; a refused one is not counted.
    - Streams: leases. A stream takes a slot that expires ``lease`` seconds later unless its
      holder renews it, so the slots of a process that died come back by themselves; a
      stream that ends gives its slot back at once.

    The async twins run the sync methods in a thread by default.
    """

    @abstractmethod
    def count_request(self, user: str, limit: int, window: float) -> float | None:
        """Count one request of ``user`` unless ``limit`` were counted in the last ``window``
        seconds.

        Returns:
            ``None`` when the request was counted; otherwise (nothing counted) the seconds
            until the oldest of the counted requests leaves the window.
        """

    @abstractmethod
    def take_stream(self, user: str, slot: str, limit: int, lease: float) -> bool:
        """Take the stream slot ``slot`` (a fresh unique id) for ``user`` unless ``limit`` of
        their slots are held (leases that have not expired); it expires in ``lease`` seconds.

        Returns:
            Whether the slot was taken.
        """

    @abstractmethod
    def renew_stream(self, user: str, slot: str, lease: float) -> bool:
        """Make ``user``'s slot ``slot`` expire ``lease`` seconds from now; whether it was still
        held (an expired slot is not taken again)."""

    @abstractmethod
    def release_stream(self, user: str, slot: str) -> None:
        """Give back ``user``'s slot ``slot`` (nothing happens if it is not held)."""

    async def acount_request(self, user: str, limit: int, window: float) -> float | None:
        """`count_request` for async callers."""
        return await asyncio.to_thread(self.count_request, user, limit, window)

    async def atake_stream(self, user: str, slot: str, limit: int, lease: float) -> bool:
        """`take_stream` for async callers."""
        return await asyncio.to_thread(self.take_stream, user, slot, limit, lease)

    async def arenew_stream(self, user: str, slot: str, lease: float) -> bool:
        """`renew_stream` for async callers."""
        return await asyncio.to_thread(self.renew_stream, user, slot, lease)

    async def arelease_stream(self, user: str, slot: str) -> None:
        """`release_stream` for async callers."""
        await asyncio.to_thread(self.release_stream, user, slot)


class HistoryStore(HistoryBackend, SummaryBackend, LockBackend, LedgerBackend):
    """Where sessions live: transcripts, summaries, one writer per session and the ledger.

    The full contract of the built-in stores: the four small ones (`HistoryBackend`,
    `SummaryBackend`, `LockBackend`, `LedgerBackend`) plus session times (`info`, `prune`),
    an atomic `commit_turn` and `replace_session`. A store is itself a
    ``get_session_history`` callable, so it can be handed straight to
    `RunnableWithMessageHistory` or `create_chat_chain`.
    """

    @abstractmethod
    def info(self, session_id: str) -> SessionInfo | None:
        """Counts and times of a session, or ``None`` if it holds no messages."""

    @abstractmethod
    def prune(self, before: datetime) -> list[str]:
        """Delete the sessions last written before ``before``; return their ids."""

    def session_infos(self, prefix: str = "", limit: int | None = None) -> list[SessionInfo]:
        """The sessions whose ids start with ``prefix``, the one written last first (then by
        id), at most ``limit`` of them.

        The built-in stores read only the ids in that range (an index range), so listing one
        user's sessions (``"name:"``) costs the same in a store of ten sessions as in one of
        a million. This default, for other stores, filters `sessions` and reads `info` for
        each match: it reads every id.

        Example:
            >>> from chatchain.stores import MemoryStore
            >>> store = MemoryStore()
            >>> for sid in ("ann:trip", "annie:x", "ann:work"):
            ...     store(sid).add_user_message("hi")
            >>> sorted(info.session_id for info in store.session_infos("ann:"))
            ['ann:trip', 'ann:work']
        """
        infos = [
            info
            for session_id in self.sessions()
            if session_id.startswith(prefix) and (info := self.info(session_id)) is not None
        ]
        return newest_first(infos, limit)

    def commit_turn(
        self,
        session_id: str,
        messages: Sequence[BaseMessage],
        entry: UsageEntry | None = None,
        *,
        release: str | None = None,
        fence: Fence | None = None,
    ) -> None:
        """Store a finished turn: its messages, its usage ``entry`` and the end of its budget
        hold ``release``, in one atomic write.

        With a ``fence`` (from `lock`), the same write first checks that the lock is still
        the turn's. If another turn took the session meanwhile, the messages are not written
        (the history keeps only the other turn's), the entry is recorded all the same (the
        endpoint billed it) and the hold dropped; then `SessionLockLostError` is raised.

        In the built-in stores, a turn whose ``entry`` id is in the ledger already was saved
        before: only its hold is dropped, and its messages are not written again. So a turn
        replayed from the journal (``CHATCHAIN_JOURNAL``) after a partial success is never
        stored twice. (This default does not check: the journal serves the built-in stores.)

        The SQLite, Redis and PostgreSQL stores do all of this in one transaction (one Lua
        script on Redis), so a failure or a kill leaves either the whole turn or none of it.
        This default, for stores that cannot, records the entry first and then appends the
        messages: a failure in between leaves the usage without the messages (what was
        billed is never lost), and it cannot check a fence.

        Raises:
            SessionLockLostError: The fence shows the turn lost its lock (messages not saved).
        """
        if entry is not None:
            self.record_usage(entry, release=release)
        elif release is not None:
            self.release_budget(release)
        self.append(session_id, messages)

    async def acommit_turn(
        self,
        session_id: str,
        messages: Sequence[BaseMessage],
        entry: UsageEntry | None = None,
        *,
        release: str | None = None,
        fence: Fence | None = None,
    ) -> None:
        """`commit_turn` for async callers."""
        await asyncio.to_thread(
            partial(self.commit_turn, release=release, fence=fence), session_id, messages, entry
        )

    # -- write-ahead records of turns in flight (see `chatchain._pending`) -------------------

    def write_pending(self, session_id: str, token: str, record: str) -> bool:
        """Keep ``record`` as the write-ahead record of the session's turn in flight.

        A session has at most one, named by its turn's ``token``: the write stores it when
        the session has none, replaces it when it has this token's, and changes nothing when
        another turn's record is there (a turn that lost its lock cannot overwrite the
        record of the one that took over). The record is opaque text (JSON) to the store.

        This default keeps nothing: a store that cannot keep records does not recover the
        turns of a crashed process.

        Returns:
            Whether the record was stored.
        """
        return False

    def read_pending(self, session_id: str) -> tuple[str, str] | None:
        """The session's write-ahead record as ``(token, record)``, or ``None``."""
        return None

    def drop_pending(self, session_id: str, token: str) -> bool:
        """Delete the session's write-ahead record if it is ``token``'s; True if it was."""
        return False

    def pending_sessions(self) -> list[str]:
        """The sessions that hold a write-ahead record (a turn in flight, or a crashed one)."""
        return []

    async def awrite_pending(self, session_id: str, token: str, record: str) -> bool:
        """`write_pending` for async callers."""
        return await asyncio.to_thread(self.write_pending, session_id, token, record)

    async def aread_pending(self, session_id: str) -> tuple[str, str] | None:
        """`read_pending` for async callers."""
        return await asyncio.to_thread(self.read_pending, session_id)

    async def adrop_pending(self, session_id: str, token: str) -> bool:
        """`drop_pending` for async callers."""
        return await asyncio.to_thread(self.drop_pending, session_id, token)

    def close(self) -> None:
        """Release connections and files."""

    # -- built on the primitives -----------------------------------------------------------

    def export_session(self, session_id: str) -> dict[str, Any]:
        """A session as a JSON-ready dict: messages, summary and times.

        Raises:
            InvalidInputError: The session holds no messages.
        """
        info = self.info(session_id)
        if info is None:
            raise InvalidInputError(f"There is no session {session_id!r} to export.")
        summary = self.get_summary(session_id)
        return {
            "format": EXPORT_FORMAT,
            "session_id": session_id,
            "created_at": info.created_at.isoformat(),
            "updated_at": info.updated_at.isoformat(),
            "summary": None
            if summary is None
            else {"text": summary.text, "covers": summary.covers},
            "messages": [message_to_dict(m) for m in self.load(session_id)],
        }

    def import_session(
        self, data: Mapping[str, Any], *, session_id: str | None = None, replace: bool = False
    ) -> str:
        """Store a session that `export_session` produced; return its id.

        The whole export is checked first (`chatchain.stores._export.validate_export`), then
        stored in one step by `replace_session`: a bad export changes nothing, and a replaced
        session is never left half-written. The export's creation and last-write times are
        kept, so `prune` sees the session's real age.

        Args:
            data: The exported dict.
            session_id: Store it under this id instead of the exported one.
            replace: Overwrite an existing session of that id (otherwise refuse).

        Raises:
            InvalidInputError: The data is not a valid export (the message says what is
                wrong and where).
            SessionExistsError: The session holds messages already and ``replace`` is false.
        """
        # Imported here: the export checks use the session-id rules of the turn module,
        # which itself builds on this one.
        from chatchain.stores._export import validate_export

        export = validate_export(data, session_id=session_id)
        target = export.session_id
        with self.lock(target):
            if not replace and self.count(target):
                raise SessionExistsError(
                    f"Session {target!r} exists already: pass replace=True to overwrite it, or "
                    "session_id=... to import it under another id.",
                    session_id=target,
                )
            self.replace_session(
                target,
                export.messages,
                export.summary,
                created_at=export.created_at,
                updated_at=export.updated_at,
            )
        return target

    def replace_session(
        self,
        session_id: str,
        messages: Sequence[BaseMessage],
        summary: Summary | None = None,
        *,
        created_at: datetime | None = None,
        updated_at: datetime | None = None,
    ) -> None:
        """Make a session hold exactly ``messages`` and ``summary``, whatever it held before.

        The built-in stores do it in one transaction: readers see the old session or the new
        one, and a failure leaves the old one whole. This default, for other stores, is
        `delete`, `append` and `set_summary` in turn: not atomic, and the times are the
        store's clock (override it to do better). The caller holds the session's `lock` and
        has checked the data (`import_session` does both).

        Args:
            session_id: The session to overwrite (or create).
            messages: Its transcript, oldest first.
            summary: Its running summary, if any.
            created_at: When it was created (default: ``updated_at``, else now).
            updated_at: When it was last written (default: now).
        """
        self.delete(session_id)
        self.append(session_id, messages)
        if summary is not None:
            self.set_summary(session_id, summary)


def session_times(
    created_at: datetime | None, updated_at: datetime | None
) -> tuple[datetime, datetime]:
    """The creation and last-write times `HistoryStore.replace_session` stores, in UTC
    (naive times are UTC, as `utcnow` gives)."""

    def utc(moment: datetime) -> datetime:
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)

    updated = utcnow() if updated_at is None else utc(updated_at)
    created = updated if created_at is None else utc(created_at)
    return created, max(created, updated)


def newest_first(infos: Sequence[SessionInfo], limit: int | None) -> list[SessionInfo]:
    """``infos`` in the order of `HistoryStore.session_infos`, the first ``limit`` of them."""
    ordered = sorted(infos, key=lambda info: info.session_id)
    ordered.sort(key=lambda info: info.updated_at, reverse=True)  # stable: ties by id
    return ordered if limit is None else ordered[: max(0, limit)]


def prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix``, in code point order
    (that of SQLite's BINARY collation and PostgreSQL's ``"C"`` on UTF-8), or ``None`` when
    there is none (an empty prefix, or one of U+10FFFF only).

    So ``prefix <= id < prefix_end(prefix)`` is ``id.startswith(prefix)``, as an index range
    (no LIKE, whose ``%`` and ``_`` an id may hold).

    Example:
        >>> prefix_end("ann:"), prefix_end("")
        ('ann;', None)
    """
    chars = list(prefix)
    while chars:
        last = ord(chars.pop()) + 1
        if last <= 0x10FFFF:
            # Surrogates are not characters of UTF-8 text: the next one is U+E000.
            return "".join(chars) + chr(0xE000 if 0xD800 <= last <= 0xDFFF else last)
    return None


class StoreHistory(BaseChatMessageHistory):
    """One session of a store, seen as a LangChain chat message history.

    ``messages`` is the full transcript; the chain itself loads only the window it needs.
    """

    def __init__(self, store: HistoryBackend, session_id: str) -> None:
        self.store = store
        self.session_id = session_id

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        return self.store.load(self.session_id)

    async def aget_messages(self) -> list[BaseMessage]:
        return await self.store.aload(self.session_id)

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        self.store.append(self.session_id, messages)

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        await self.store.aappend(self.session_id, messages)

    def clear(self) -> None:
        self.store.delete(self.session_id)

    async def aclear(self) -> None:
        await self.store.adelete(self.session_id)
