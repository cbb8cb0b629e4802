"""Write-ahead records of turns in flight, and the recovery of the turns a crash cut off.

Before a turn's request goes out, the store keeps a record of it (`WriteAhead`): the user's
message, the turn's budget hold, the prompt's token count, the model and the id the turn's
ledger entry will have. While the reply streams, the record takes the text received so far,
at most every `CHECKPOINT_S` seconds. When the turn ends (stored, or failed), the record is
dropped.

A process killed in between (``kill -9``, a lost machine) leaves its record behind. The next
holder of the session's lock finds it (`recover`: the next turn on the session does this
first, or `recover_session` from a sweep); as one turn at a time holds a session, a record
that is not the holder's own belongs to a turn whose process is gone, or lost the lock. The
holder stores the user's message and the reply so far, marked interrupted
(``interrupted_reason="crashed"``), records what the call cost (``estimated``: the prompt's
count plus the tokens of the text received) and ends the crashed turn's hold, in one
`HistoryStore.commit_turn` fenced by its own lock; then it drops the record.

Exactly once: the recovery runs under the session's lock, and its entry has the id the
crashed turn chose before sending, which a ledger records once; so a slow turn that lost its
lock and commits late adds nothing to the ledger (and the fence refuses its messages), and a
record whose turn was stored but not yet dropped (a crash between the two writes) is seen by
its entry in the ledger and only dropped.

A store that keeps no records (`HistoryStore.write_pending` returns False: the default for
third-party stores) recovers nothing; a chain whose ledger is not its history store writes
none, as recovering needs both in one write.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import TYPE_CHECKING, Any
from uuid import uuid4

from langchain_core.messages import AIMessage, BaseMessage, message_to_dict, messages_from_dict

from chatchain import _metering
from chatchain._flow import Effect, Flow, blocking, call, run
from chatchain._metering import Estimate
from chatchain.stores import HistoryStore

if TYPE_CHECKING:
    from chatchain._turn import Turn, TurnSpec
    from chatchain.stores import Fence
    from chatchain.usage import UsageEntry

__all__ = ["CHECKPOINT_S", "CRASHED", "Recovery", "WriteAhead", "plan_recovery"]

logger = logging.getLogger("chatchain")

CHECKPOINT_S = 1.0
"""How often, at most, a streaming turn's record takes the reply so far: what a crash can
lose of a reply (the ledger's estimate counts the text kept)."""

CRASHED = "crashed"
"""The ``interrupted_reason`` of a reply whose process died mid-turn."""

_FORMAT = 1


def store_of(spec: TurnSpec) -> HistoryStore | None:
    """The store that keeps the spec's turns and their ledger, or ``None`` (no records)."""
    store = spec.store
    if store is None or spec.ledger.store is not store:
        return None
    keeps = type(store).write_pending is not HistoryStore.write_pending
    return store if keeps else None


@dataclass
class WriteAhead:
    """The record of one turn in flight, as its store keeps it.

    Attributes:
        store: Where the record is kept.
        session_id: The turn's session.
        token: Names this turn's record (a record of another token is another turn's).
        record: What a recovery needs (see `plan_recovery`), written as JSON.
        kept: Whether the store holds the record (False: it keeps none; nothing to drop).
        due: When (``time.monotonic``) the next checkpoint of the reply may be written.
    """

    store: HistoryStore
    session_id: str
    token: str
    record: dict[str, Any]
    kept: bool = False
    due: float = 0.0

    @classmethod
    def open(cls, turn: Turn, store: HistoryStore) -> WriteAhead:
        """The record of ``turn``, not written yet."""
        record = {
            "format": _FORMAT,
            "messages": [message_to_dict(m) for m in turn.input_messages],
            "user_id": turn.user_id,
            "model": turn.spec.default_model,
            "entry_id": turn.entry_id,
            "started": datetime.now(UTC).isoformat(),
            "reply": "",
        }
        return cls(store, turn.session_id, uuid4().hex, record)

    def sending(self, prompt_tokens: int, reply_tokens: int, hold: str | None) -> str:
        """Note a call about to go out; returns the record's text to write."""
        self.record.update(prompt_tokens=prompt_tokens, reply_tokens=reply_tokens, hold=hold)
        return self.text()

    def text(self) -> str:
        self.due = time.monotonic() + CHECKPOINT_S
        self.record["written"] = datetime.now(UTC).isoformat()  # the last sign of life
        return _json(self.record)

    def checkpoint(self, reply: str) -> str | None:
        """The record's text with the reply so far, or ``None`` when no write is due."""
        if not self.kept or time.monotonic() < self.due or reply == self.record["reply"]:
            return None
        self.record["reply"] = reply
        return self.text()

    def written(self, kept: bool) -> None:
        if not kept and not self.kept:
            logger.debug(
                "Session %r: the store keeps no record of turns in flight.", self.session_id
            )
        self.kept = self.kept or kept


_SLICE = 1 << 16  # characters of the reply escaped at a time


def _json(record: dict[str, Any]) -> str:
    """``json.dumps(record)``, its ``reply`` (the record's long string) last, built without
    a whole escaped copy of it.

    The store holds the record's previous text while this one is made: `json.dumps` would
    add an escaped copy of the reply and of the messages, then their join (~4x the reply's
    bytes with a prompt as long). Here the reply is escaped a slice at a time onto the text
    (``+=`` on a string no one else holds grows it in place in CPython).
    """
    head = {key: value for key, value in record.items() if key != "reply"}
    text = json.dumps(head, ensure_ascii=False, separators=(",", ":"))[:-1]
    text += ',"reply":"'
    reply = str(record.get("reply") or "")
    for start in range(0, len(reply), _SLICE):
        text += encode_basestring(reply[start : start + _SLICE])[1:-1]
    text += '"}'
    return text


@dataclass(frozen=True)
class Recovery:
    """What to store for a turn that a crash cut off (see `plan_recovery`).

    Attributes:
        token: The crashed turn's record.
        messages: The user's message(s) and the reply so far, marked interrupted.
        entry: The call's ledger entry, estimated, under the id the crashed turn chose.
        hold: The crashed turn's budget hold, ended by the same write.
        started: When the crashed turn sent its call.
    """

    token: str
    messages: list[BaseMessage]
    entry: UsageEntry
    hold: str | None
    started: datetime

    def stored_already(self, store: HistoryStore) -> bool:
        """Whether the crashed turn was stored after all (then its record is only dropped)."""
        found = store.usage_entries(session_id=self.entry.session_id, since=self.started)
        return any(entry.id == self.entry.id for entry in found)


def plan_recovery(spec: TurnSpec, session_id: str, token: str, text: str) -> Recovery:
    """What to store for the crashed turn whose record is ``text``.

    The reply is the text its last checkpoint kept; the entry counts the prompt as the
    crashed turn counted it and the reply's tokens with the chain's counter (the endpoint
    never reported them), priced as the crashed turn's model.
    """
    record = json.loads(text)
    reply_text = str(record.get("reply") or "")
    metadata = {
        "interrupted": True,
        "interrupted_reason": CRASHED,
        "model_name": record.get("model"),
    }
    reply = AIMessage(content=reply_text, response_metadata=metadata)
    counted = spec.recall.counter([AIMessage(reply_text)]) if reply_text else 0
    prompt = int(record.get("prompt_tokens") or 0)
    started = datetime.fromisoformat(record["started"])
    # What the crashed turn took until its last write, not until it was found.
    written = datetime.fromisoformat(record.get("written") or record["started"])
    entry = _metering.entry_from(
        _metering.new_handler(),
        session_id=session_id,
        user_id=record.get("user_id"),
        model=record.get("model"),
        pricer=spec.pricer,
        latency_s=max(0.0, (written - started).total_seconds()),
        estimate=Estimate(prompt, int(record.get("reply_tokens") or 0) + counted, requests=1),
        configured_model=spec.default_model,
    )
    return Recovery(
        token=token,
        messages=[*messages_from_dict(record["messages"]), reply],
        entry=replace(entry, id=str(record["entry_id"])),
        hold=record.get("hold"),
        started=started,
    )


def recover_flow(spec: TurnSpec, session_id: str, fence: Fence | None) -> Flow[bool]:
    """Store the turn a crash cut off on this session, if there is one; True if one was.

    The caller holds the session's lock (``fence`` is its fence) and has written no record
    of its own yet. Driven by `recover` and `arecover` (see `_flow`).

    Raises:
        SessionLockLostError: The caller lost the lock meanwhile; nothing was stored.
    """
    store = store_of(spec)
    if store is None:
        return False
    found = yield call(store, "read_pending", session_id)
    if found is None:
        return False
    recovery = plan_recovery(spec, session_id, *found)
    if (yield blocking(recovery.stored_already, store)):
        yield call(store, "drop_pending", session_id, recovery.token)
        return False
    yield call(
        store,
        "commit_turn",
        session_id,
        recovery.messages,
        recovery.entry,
        release=recovery.hold,
        fence=fence,
    )
    yield call(store, "drop_pending", session_id, recovery.token)
    _recovered(session_id, recovery)
    return True


def recover(spec: TurnSpec, session_id: str, fence: Fence | None) -> bool:
    """`recover_flow` in the caller's thread."""
    return run(recover_flow(spec, session_id, fence))


def recover_session(spec: TurnSpec, session_id: str) -> bool:
    """Take the session's lock and store the turn a crash cut off on it, if any.

    For a sweep (e.g. when a service starts) of `HistoryStore.pending_sessions`: a session
    whose turn is still running elsewhere waits for that turn's lock (the record is then
    gone when it ends).

    Raises:
        SessionBusyError: The session stayed locked for the store's lock timeout.
    """
    store = store_of(spec)
    if store is None:
        return False
    with store.lock(session_id) as fence:
        return recover(spec, session_id, fence)


def _recovered(session_id: str, recovery: Recovery) -> None:
    logger.warning(
        "Session %r: a turn cut off by a crash (its process died mid-turn) was stored with "
        "its reply so far (%d characters), marked interrupted; its usage was recorded as "
        "estimated.",
        session_id,
        len(str(recovery.messages[-1].content)),
    )


def once(count: Callable[[], int]) -> Callable[[], int]:
    """``count``, counted on its first call only (a prompt's tokens do not change)."""
    memo: list[int] = []

    def counted() -> int:
        if not memo:
            memo.append(count())
        return memo[0]

    return counted


RECOVERED = (
    "The previous turn on this session was cut off (its process stopped mid-reply): its "
    "message and the reply so far were kept, marked interrupted, and its usage recorded "
    "as estimated."
)
"""The notice on the turn that stored a crashed one first."""


def logged(ahead: WriteAhead, what: str, write: Effect) -> Flow[None]:
    """Run ``write`` (a write of the record), logging (not raising) its failure: the turn
    goes on.

    A checkpoint that fails keeps the older text. A record that could not be dropped (the
    store failed just then) is dropped by the next holder of the lock if the turn was stored
    (its entry is in the ledger); that of a turn that failed is stored as a crashed one.
    """
    try:
        kept = yield write
    except Exception as exc:
        logger.warning(
            "Session %r: could not %s its turn's record: %s", ahead.session_id, what, exc
        )
        return
    if what == "checkpoint":
        ahead.written(kept)
