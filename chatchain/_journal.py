"""Turns the store could not save, kept in a local file until it can: billed, never lost.

A turn ends with one atomic write (`HistoryStore.commit_turn`: its messages, its ledger entry
and the end of its budget hold). When the store is unreachable at that moment (Redis
restarting, PostgreSQL failing over, a SQLite file locked by a stuck process), the endpoint
has already billed the call. The turn's write is then appended to a journal: a small SQLite
file on this machine, written with ``synchronous=FULL`` (on disk before the user is told),
which survives the process. It is replayed into the store:

- at the start of the session's next turn, under its lock and before its history is read,
  so the replayed turn comes before the new one, as it happened;
- after any turn of a chain on the store ends well, for every other session, in a thread
  (each session under its own lock, taken one at a time, none held meanwhile).

Replayed turns are appended whole (messages, entry, end of hold) under the session's lock,
so a replay never overwrites a newer turn: a journaled turn is older than any turn that
follows it on its session, since that turn replays it first. Budget holds move with their
turn into the journal and end when it is saved (or expire, ``HOLD_TTL``).

Replaying is idempotent: a store's `commit_turn` writes nothing for an entry id it holds
already (see its contract), and a journaled turn is removed only after its commit succeeded.
A replay that dies between the two commits again next time, and changes nothing.

Where the journal lives (``CHATCHAIN_JOURNAL`` names a folder for it instead):

- SQLite store: beside the database file, ``chat.db.unsaved-turns``;
- Redis and PostgreSQL: the user's data folder (``CHATCHAIN_DATA_DIR``, else the
  platform's, e.g. ``~/.local/share/chatchain``), ``journal/redis-<hash>.unsaved-turns``,
  one file per store;
- the in-memory store needs none (it cannot be unreachable).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from langchain_core.messages import BaseMessage, message_to_dict, messages_from_dict

from chatchain._flow import Flow, arun, blocking, call, run
from chatchain.errors import SessionLockLostError
from chatchain.stores import Fence, HistoryStore
from chatchain.usage import UsageEntry

__all__ = [
    "DATA_DIR_ENV",
    "SUFFIX",
    "Journal",
    "JournaledTurn",
    "journal_for",
    "replay_in_background",
]

logger = logging.getLogger("chatchain")

DATA_DIR_ENV = "CHATCHAIN_DATA_DIR"
SUFFIX = ".unsaved-turns"
_BUSY_TIMEOUT_S = 10.0  # other processes of this machine write the same file now and then

_SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    entry_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    entry TEXT NOT NULL,
    messages TEXT NOT NULL,
    hold TEXT,
    journaled_at REAL NOT NULL
)
"""


@dataclass(frozen=True)
class JournaledTurn:
    """One turn's commit, as `HistoryStore.commit_turn` takes it.

    Attributes:
        session_id: The session it belongs to.
        messages: The turn's messages (empty for the usage of a turn that stored none).
        entry: Its ledger entry; its id makes the replay idempotent.
        hold: The budget hold the commit ends, if any.
    """

    session_id: str
    messages: Sequence[BaseMessage]
    entry: UsageEntry
    hold: str | None = None


class Journal:
    """The unsaved turns of one store, in a SQLite file of this machine.

    The file is created when the first turn is journaled; reading a journal that has no file
    costs one ``stat``.

    Args:
        path: The journal file.
        store: The store its turns are replayed into.
    """

    def __init__(self, path: Path, store: HistoryStore) -> None:
        self.path = path
        self.store = store
        self._empty_at: tuple[int, bytes] | None = None  # the file, when last seen empty

    def _version(self) -> tuple[int, bytes] | None:
        """The file and its SQLite change counter (bumped by every commit), or ``None`` when
        there is no file: a few bytes read, to skip the query of a journal known empty."""
        try:
            with self.path.open("rb") as handle:
                header = handle.read(28)
                return os.fstat(handle.fileno()).st_ino, header[24:28]
        except (FileNotFoundError, NotADirectoryError):  # no journal could be there
            return None

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        with closing(conn):
            conn.execute("PRAGMA synchronous=FULL")  # on disk before the user is told
            yield conn

    def add(self, turn: JournaledTurn) -> None:
        """Keep ``turn`` until the store takes it (on disk when this returns).

        Raises:
            OSError: The folder cannot be created.
            sqlite3.Error: The file cannot be written (disk full, read-only).
        """
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        messages = json.dumps([message_to_dict(m) for m in turn.messages], ensure_ascii=False)
        with self._connection() as conn:
            conn.execute(_SCHEMA)
            conn.execute(
                "INSERT OR IGNORE INTO turns VALUES (?, ?, ?, ?, ?, ?)",
                (
                    turn.entry.id,
                    turn.session_id,
                    turn.entry.to_json(),
                    messages,
                    turn.hold,
                    time.time(),
                ),
            )
        os.chmod(self.path, 0o600)  # messages are the users' words

    def pending(self, session_id: str | None = None) -> list[JournaledTurn]:
        """The turns still to save (of one session, or all), in the order they were journaled."""
        version = self._version()
        if version is None or version == self._empty_at:
            return []
        where, args = ("", ()) if session_id is None else (" WHERE session_id = ?", (session_id,))
        with self._connection() as conn:
            conn.execute(_SCHEMA)
            if conn.execute("SELECT NOT EXISTS (SELECT 1 FROM turns)").fetchone()[0]:
                self._empty_at = version
                return []
            rows = conn.execute(
                "SELECT session_id, messages, entry, hold FROM turns"
                f"{where} ORDER BY journaled_at, rowid",
                args,
            ).fetchall()
        return [
            JournaledTurn(sid, messages_from_dict(json.loads(msgs)), UsageEntry.from_json(e), h)
            for sid, msgs, e, h in rows
        ]

    def done(self, entry_id: str) -> None:
        """Forget a turn the store has taken."""
        with self._connection() as conn:
            conn.execute("DELETE FROM turns WHERE entry_id = ?", (entry_id,))

    # -- replay --------------------------------------------------------------------------------

    def replay(self, session_id: str, fence: Fence | None) -> int:
        """Save the session's journaled turns, oldest first, under its lock (``fence``).

        Returns:
            How many were saved.

        Raises:
            StoreError: The store is still failing (the turns stay journaled).
            SessionLockLostError: The lock was lost meanwhile: the usage was saved, the
                messages were not (the other turn's history is kept whole).
        """
        return run(self.replay_flow(session_id, fence))

    async def areplay(self, session_id: str, fence: Fence | None) -> int:
        """`replay` for async callers (the journal's file is read in a thread)."""
        return await arun(self.replay_flow(session_id, fence))

    def replay_flow(self, session_id: str, fence: Fence | None) -> Flow[int]:
        """`replay`, as a flow (see `_flow`): the turn's own replay yields from it."""
        turns = yield blocking(self.pending, session_id)
        for turn in turns:
            try:
                yield call(
                    self.store,
                    "commit_turn",
                    turn.session_id,
                    turn.messages,
                    turn.entry,
                    release=turn.hold,
                    fence=fence,
                )
            except SessionLockLostError:
                yield blocking(self.done, turn.entry.id)  # its usage is in the ledger
                raise
            yield blocking(self.done, turn.entry.id)
            _replayed(turn, self.path)
        return len(turns)

    def replay_all(self) -> int:
        """Save every journaled turn, each session under its own lock, taken in turn.

        Returns:
            How many were saved.

        Raises:
            StoreError: The store is still failing (what is left stays journaled).
        """
        saved = 0
        for session_id in dict.fromkeys(turn.session_id for turn in self.pending()):
            with self.store.lock(session_id) as fence:
                saved += self.replay(session_id, fence)
        return saved

    async def areplay_all(self) -> int:
        """`replay_all` for async callers."""
        import asyncio

        saved = 0
        pending = await asyncio.to_thread(self.pending)
        for session_id in dict.fromkeys(turn.session_id for turn in pending):
            async with self.store.alock(session_id) as fence:
                saved += await self.areplay(session_id, fence)
        return saved


# The journals a thread of this process is replaying: one thread per file at a time.
_replaying: set[Path] = set()
_replaying_guard = threading.Lock()


def replay_in_background(journal: Journal) -> None:
    """Replay every journaled turn in a thread, if there are any and no thread is at it.

    A failure is logged (the turns stay journaled, for the next try).
    """
    if not journal.pending():
        return
    with _replaying_guard:
        if journal.path in _replaying:
            return
        _replaying.add(journal.path)
    threading.Thread(
        target=_replay_quietly, args=(journal,), name="chatchain-journal", daemon=True
    ).start()


def _replay_quietly(journal: Journal) -> None:
    try:
        journal.replay_all()
    except Exception as exc:  # tried again after the next turn that goes well
        logger.warning("Turns journaled in %s still wait for the store: %s", journal.path, exc)
    finally:
        with _replaying_guard:
            _replaying.discard(journal.path)


def _replayed(turn: JournaledTurn, path: Path) -> None:
    logger.warning(
        "Session %r: a turn journaled in %s while the store was unreachable is now saved "
        "(usage entry %s).",
        turn.session_id,
        path,
        turn.entry.id,
    )


def data_dir() -> Path:
    """The user's chatchain data folder: ``CHATCHAIN_DATA_DIR``, else the platform's."""
    chosen = os.environ.get(DATA_DIR_ENV)
    if chosen:
        return Path(chosen).expanduser()
    try:  # installed with chatchain[cli]; the library alone falls back to the XDG default
        import platformdirs
    except ImportError:
        base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        return Path(base) / "chatchain"
    return Path(platformdirs.user_data_dir("chatchain"))


# The built-in stores that can be unreachable (by name: their modules load on first use).
_KINDS = {
    "chatchain.stores._sqlite.SQLiteStore": "sqlite",
    "chatchain.stores._redis.RedisStore": "redis",
    "chatchain.stores._postgres.PostgresStore": "postgres",
}


def journal_for(store: HistoryStore, folder: str | os.PathLike[str] | None) -> Journal | None:
    """The journal of a built-in shared or file store, or ``None`` for any other store.

    Args:
        store: The store.
        folder: Where journals go (``CHATCHAIN_JOURNAL``), or ``None`` for the default.
    """
    names = (f"{cls.__module__}.{cls.__qualname__}" for cls in type(store).__mro__)
    kind = next((_KINDS[name] for name in names if name in _KINDS), None)
    if kind is None:
        return None
    if kind == "sqlite":
        path = Path(store.path)  # type: ignore[attr-defined]
        identity = str(path)
        if folder is None:
            return Journal(path.with_name(path.name + SUFFIX), store)
    else:  # the repr names the server (without its password) and the key or table prefix
        identity = repr(store)
    where = Path(folder).expanduser() if folder is not None else data_dir() / "journal"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return Journal(where / f"{kind}-{digest}{SUFFIX}", store)
