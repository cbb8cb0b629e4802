"""A turn's commit: its ledger entry, the one write that stores it, and the journal that
keeps a billed turn when the store fails.

A turn is saved in one atomic write (`save_flow`): the user's message, the tool rounds, the
reply and the usage entry, the budget hold ended with it, refused (but for the usage) if the
turn lost its lock. A turn whose reply is not kept still records what the endpoint billed
(`meter_only_flow`, `record_billed_flow`, and the turn's end: `_unmetered`). When the store
fails as a billed turn is saved, the turn waits in the journal (`_journal`) and is saved at
the session's next turn (`_replay_flow`, under its lock) or after any other (`replay_others`).

`TurnCommit` is one part of `chatchain._turn.Turn` (see that module for how the parts fit).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, NoReturn, cast

from langchain_core.messages import AIMessage, BaseMessage

from chatchain import _hooking, _metering
from chatchain._flow import Flow, blocking, call, run
from chatchain._journal import Journal, JournaledTurn, replay_in_background
from chatchain._money import format_usd
from chatchain._turn_money import TurnMoney
from chatchain.errors import SessionLockLostError, StoreError, TurnJournaledError
from chatchain.usage import UsageEntry

if TYPE_CHECKING:
    from chatchain._turn import Turn
    from chatchain.stores import Fence
    from chatchain.usage import Usage

__all__ = ["TurnCommit", "text_of"]

logger = logging.getLogger("chatchain")


class TurnCommit(TurnMoney):
    """The commit part of a `Turn`: its entry, its save, its journal.

    The turn's hooks are told of its events with the whole `Turn` (``cast``: this part is
    only ever one of its bases).
    """

    if TYPE_CHECKING:  # the state of `Turn` this part reads and writes
        input_messages: list[BaseMessage]
        fence: Fence | None
        started: float
        first_token_s: float | None
        entry: UsageEntry | None
        usage: Usage | None
        entry_id: str
        _metered: bool

        def streamed_reply(self) -> BaseMessage: ...

        def _exchange(self) -> list[BaseMessage]: ...

    def _entry(self, reply: BaseMessage) -> UsageEntry:
        """The turn's ledger entry. It never raises once the endpoint billed a call: the
        notices are written apart (a bug there costs a notice, not the entry), and should the
        entry itself fail to build, what the turn held is recorded instead."""
        _hooking.model_ended(cast("Turn", self), reply)
        try:
            self._explain(reply)
        except Exception:
            logger.exception("Session %r: a notice of the turn failed", self.session_id)
        model = reply.response_metadata.get("model_name") or self.spec.default_model
        try:
            entry = self._metered_entry(reply, model)
        except Exception:
            logger.exception(
                "Session %r: the turn's usage could not be counted; its hold is recorded",
                self.session_id,
            )
            return replace(self._held_entry(model), id=self.entry_id)
        if self._estimated_calls and not entry.estimated:
            entry = replace(entry, estimated=True)
        return entry

    def _metered_entry(self, reply: BaseMessage, model: str | None) -> UsageEntry:
        self._settle_call(self._call_output(reply))
        self._report_estimate(model)
        entry = _metering.entry_from(
            self.handler,
            session_id=self.session_id,
            user_id=self.user_id,
            model=model,
            pricer=self.spec.pricer,
            latency_s=time.perf_counter() - self.started,
            first_token_s=self.first_token_s,
            estimate=self._estimated,
            configured_model=self.spec.default_model,
        )
        return replace(entry, id=self.entry_id)  # the id its write-ahead record names

    def _held_entry(self, model: str | None) -> UsageEntry:
        """What the turn's hold covered, as an estimated entry (the last resort of `_entry`)."""
        tokens, usd = self._hold_size
        counted = self.handler.prompt_tokens + self.handler.completion_tokens
        return UsageEntry(
            self.session_id,
            model=model,
            prompt_tokens=self.handler.prompt_tokens,
            completion_tokens=max(0, tokens - self.handler.prompt_tokens),
            total_tokens=max(tokens, counted),
            requests=max(1, self.handler.successful_requests),
            cost_usd=usd if self.budgeted else None,
            estimated=True,
            user_id=self.user_id,
        )

    def _recorded(self, entry: UsageEntry, reply: BaseMessage) -> list[BaseMessage]:
        self.entry = entry
        self.usage = entry.usage()
        return [*self.input_messages, *self.steps, *self._exchange(), reply]

    def save(self, reply: BaseMessage) -> None:
        """Store the turn, record its usage and end its budget hold, in one atomic write.

        The write is fenced by the session's lock (`fence`): if the turn lost it, the store
        keeps the usage (the endpoint billed it) but not the messages, and this raises.

        Raises:
            SessionLockLostError: Another turn took the session; the reply was not saved.
        """
        run(self.save_flow(reply))

    def save_flow(self, reply: BaseMessage) -> Flow[None]:
        """`save`, as a flow (see `_flow`); the turn's hooks are told of the commit."""
        return _hooking.committing(cast("Turn", self), reply, self._save_flow(reply))

    def _save_flow(self, reply: BaseMessage) -> Flow[None]:
        """`save`, as a flow (see `_flow`)."""
        entry = self._entry(reply)
        messages = self._recorded(entry, reply)
        store = self.spec.store
        # The hold stays the turn's until the write that ends it succeeds: should it fail,
        # the turn's end still gives it back (see `_release_flow`) instead of stranding it.
        if store is not None and self.spec.ledger.store is store:
            try:
                yield call(
                    store,
                    "commit_turn",
                    self.session_id,
                    messages,
                    entry,
                    release=self._hold,
                    fence=self.fence,
                )
            except SessionLockLostError as exc:
                self._hold, self._metered = None, True  # the store kept the usage
                self._lock_lost(exc)
                raise
            except StoreError as exc:  # the endpoint billed it: keep it for later
                _raise_kept((yield blocking(self._journal, messages, entry, exc)), exc)
            self._hold, self._metered = None, True
            return
        # The ledger lives elsewhere: usage first, as the endpoint has billed the call.
        try:
            yield call(self.spec.ledger, "record", entry, release=self._hold)
        except StoreError as exc:
            if store is not None:  # the messages go elsewhere: they cannot wait in the journal
                raise
            _raise_kept((yield blocking(self._journal, [], entry, exc)), exc)
        self._hold, self._metered = None, True
        if store is not None:
            yield call(store, "commit_turn", self.session_id, messages, fence=self.fence)
        else:
            yield call(self.spec.get_history(self.session_id), "add_messages", messages)

    # -- a turn whose reply is not stored: what the endpoint billed is recorded all the same --

    def meter_only_flow(self, reply: BaseMessage) -> Flow[None]:
        """Record what a call cost when its reply is not kept (a structured reply that does
        not validate): the endpoint billed it. Nothing is stored in the history."""
        entry = self._entry(reply)
        self._recorded(entry, reply)
        try:
            yield call(self.spec.ledger, "record", entry, release=self._hold)
        except StoreError as exc:
            yield blocking(self._journal_usage, entry, exc)
        self._hold, self._metered = None, True

    def record_billed_flow(self) -> Flow[None]:
        """A turn failed after tool rounds: record what its finished calls cost, store nothing.

        The endpoint billed those calls; a failed turn without tool rounds made none.
        """
        if not self.steps or self.handler.successful_requests == 0:
            return
        entry = self._billed_entry()
        try:
            yield call(self.spec.ledger, "record", entry, release=self._hold)
            self._hold, self._metered = None, True
        except StoreError as exc:  # the turn's own error is what the caller must see
            yield blocking(partial(self._journal_usage, quiet=True), entry, exc)
        except Exception:
            logger.exception(
                "Session %r: the usage of a failed turn was not recorded", self.session_id
            )

    def _billed_entry(self) -> UsageEntry:
        model = next(
            (m.response_metadata.get("model_name") for m in self.steps if m.type == "ai"), None
        )
        self._settle_call(self._call_output(None))
        self._report_estimate(model or self.spec.default_model)
        entry = _metering.entry_from(
            self.handler,
            session_id=self.session_id,
            user_id=self.user_id,
            model=model or self.spec.default_model,
            pricer=self.spec.pricer,
            latency_s=time.perf_counter() - self.started,
            estimate=self._estimated,
            configured_model=self.spec.default_model,
        )
        entry = replace(entry, id=self.entry_id)
        self.entry, self.usage = entry, entry.usage()
        return entry

    def _metered_or_unbilled(self) -> bool:
        """Whether the ledger has all the endpoint billed for the turn (or it billed nothing)."""
        return self._metered or not (self.handler.successful_requests or self.has_reply)

    # Whatever fails between a call's reply and the turn's commit (a notice, a reply that
    # cannot be merged or stored, a bug), the turn's end runs: it records the calls the
    # endpoint billed that nothing recorded yet, so the ledger never loses a call.

    def _unmetered(self) -> UsageEntry | None:
        """The entry of the turn's billed calls when nothing recorded them, else ``None``."""
        if self._metered:
            return None
        if not (self.handler.successful_requests or self.has_reply):
            return None  # nothing was sent, or the endpoint refused it: nothing billed
        try:
            reply = self.streamed_reply()
        except Exception:
            reply = AIMessage(content="")
        return self._entry(reply)

    def _unmetered_recorded(self) -> None:
        self._hold, self._metered = None, True
        logger.error(
            "Session %r: the turn failed after the endpoint billed it; its usage was recorded, "
            "its messages were not stored.",
            self.session_id,
        )

    def _lock_lost(self, exc: SessionLockLostError) -> None:
        logger.error("Session %r: %s", self.session_id, exc)

    # -- the journal: a store that fails as a billed turn is saved -----------------------------

    def _keep(
        self, messages: list[BaseMessage], entry: UsageEntry, exc: StoreError
    ) -> StoreError | None:
        """Put the turn's commit in the journal: ``None`` once it is there, else the error.

        The hold goes with it (the replay ends it, else it expires): until the turn is in
        the ledger, the hold is what counts its cost against the caps.
        """
        journal = self.spec.journal
        if journal is None or self.spec.ledger.store is not journal.store:
            return exc
        try:
            journal.add(JournaledTurn(self.session_id, messages, entry, self._hold))
        except (OSError, sqlite3.Error) as failure:
            return self._not_journaled(journal, entry, exc, failure)
        self._hold, self._metered = None, True  # the journal keeps its bill
        return None

    def _journal(
        self, messages: list[BaseMessage], entry: UsageEntry, exc: StoreError
    ) -> StoreError:
        """Keep the finished turn in the journal; the error that tells the user so."""
        error = self._keep(messages, entry, exc)
        if error is not None:
            return error
        assert self.spec.journal is not None
        path = self.spec.journal.path
        reply = next((m for m in reversed(messages) if m.type == "ai"), None)
        cost = "" if entry.cost_usd is None else f", {format_usd(entry.cost_usd)}"
        message = (
            f"The reply on session {self.session_id!r} was delivered and billed "
            f"({entry.total_tokens:,} tokens{cost}), but the store could not save the turn: "
            f"{exc} The turn ({'its messages and ' if messages else ''}its usage) is kept "
            f"in the journal {path} and will be saved to the store once it is reachable "
            "again (at the session's next turn, or after any other turn): do not send the "
            "message again. The reply is in this error's `reply` attribute."
        )
        logger.error("Session %r: %s", self.session_id, message)
        return TurnJournaledError(
            message,
            session_id=self.session_id,
            reply=text_of(reply) if reply is not None else "",
            journal=str(path),
            entry_id=entry.id,
        )

    def _journal_usage(self, entry: UsageEntry, exc: StoreError, *, quiet: bool = False) -> None:
        """Keep the usage of a call whose reply is not stored; raise if it cannot be kept
        (unless ``quiet``: the turn's own error is what the caller must see)."""
        error = self._keep([], entry, exc)
        if error is None:
            logger.warning(
                "Session %r: the usage of a billed call could not be recorded (%s); it is kept "
                "in the journal %s until the store can take it.",
                self.session_id,
                exc,
                self.spec.journal.path if self.spec.journal else None,
            )
            return
        if not quiet:
            _raise_kept(error, exc)
        logger.error("Session %r: the usage of a failed turn was not recorded", self.session_id)

    def _not_journaled(
        self, journal: Journal, entry: UsageEntry, exc: StoreError, failure: Exception
    ) -> StoreError:
        # The last place the bill can go: the log (the entry holds no message text).
        logger.error(
            "Session %r: a billed turn could be neither saved (%s) nor journaled in %s (%s). "
            "Its usage entry: %s",
            self.session_id,
            exc,
            journal.path,
            failure,
            entry.to_json(),
        )
        return StoreError(
            f"{exc} The turn could not be kept in the journal {journal.path} either "
            f"({failure}): its usage entry was written to the log. Make "
            f"{journal.path.parent} writable, or set CHATCHAIN_JOURNAL to a folder that is."
        )

    def _replay_flow(self) -> Flow[None]:
        """Save the session's journaled turns first, under its lock (before its history is
        read, so that they come before this turn).

        Raises:
            StoreError: The store still fails them (nothing was sent).
        """
        # The first step under the lock, on every entry point.
        _hooking.turn_started(cast("Turn", self))
        if self.spec.journal is not None and self.spec.store is not None:
            yield from self.spec.journal.replay_flow(self.session_id, self.fence)

    def replay_others(self) -> None:
        """The turn went well, so the store is up: save other sessions' journaled turns, in
        a thread (each takes its session's lock, which a long turn may hold)."""
        if self.spec.journal is not None:
            replay_in_background(self.spec.journal)


def _raise_kept(error: StoreError, exc: StoreError) -> NoReturn:
    """Raise what `TurnCommit._journal` made of the store's failure ``exc``."""
    if error is exc:  # there is no journal: the store's own error, as it was
        raise exc
    raise error from exc


def text_of(message: BaseMessage) -> str:
    return message.text if isinstance(message.text, str) else str(message.content)
