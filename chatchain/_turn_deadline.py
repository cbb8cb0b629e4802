"""A turn's deadline (``CHATCHAIN_TURN_DEADLINE``): when it starts, and the calls it bounds.

The deadline counts from when the session's lock is taken (waiting for another turn is
bounded by ``CHATCHAIN_LOCK_TIMEOUT`` instead). It bounds the summary call, the model call
with the client's retries, and a stream until its last chunk; the final writes are not cut
short. How a blocking call is given up on is `_deadline`'s; this is the turn's side of it.

`TurnDeadline` is one part of `chatchain._turn.Turn` (see that module for how the parts fit).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from chatchain import _deadline
from chatchain._flow import Do, Effect
from chatchain.errors import TurnDeadlineError

if TYPE_CHECKING:
    from chatchain._turn import TurnSpec

__all__ = ["TurnDeadline"]


class TurnDeadline:
    """The deadline part of a `Turn`: `start_deadline`, `expired`, and the bounded calls."""

    if TYPE_CHECKING:  # the state of `Turn` this part reads and writes
        spec: TurnSpec
        deadline_at: float | None

        @property
        def has_reply(self) -> bool: ...

    def start_deadline(self) -> None:
        """The turn runs (its lock is held): its deadline starts counting."""
        if self.spec.deadline is not None:
            self.deadline_at = time.monotonic() + self.spec.deadline

    @property
    def expired(self) -> bool:
        return self.deadline_at is not None and time.monotonic() >= self.deadline_at

    def deadline_error(self) -> TurnDeadlineError:
        """The error of a turn stopped by its deadline (logged once, by `failure`)."""
        kept = (
            "The reply so far was kept, marked interrupted."
            if self.has_reply
            else "Nothing was stored."
        )
        return TurnDeadlineError(
            f"The turn ran past its deadline of {self.spec.deadline:g} s "
            "(CHATCHAIN_TURN_DEADLINE) and was stopped: the endpoint answered too slowly, or "
            f"kept the connection open without finishing. {kept} Try again, or raise "
            "CHATCHAIN_TURN_DEADLINE."
        )

    def bounded(self, call: Callable[[], Any]) -> Any:
        """``call()`` (a blocking model call), given up on at the deadline.

        It runs in the caller's thread when the chain's models end their own calls at the
        deadline (chatchain's HTTP transport, see `_deadline`), else in a worker thread
        that is abandoned at the deadline (a model that may block without a byte).

        Raises:
            TurnDeadlineError: The deadline passed first.
        """
        if self.expired:  # not even started: nothing may be sent after the deadline
            raise self.deadline_error()
        in_thread = not self.spec.deadline_in_transport
        return _deadline.call(call, self.deadline_at, self.deadline_error, in_thread=in_thread)

    def bounded_stream(self, chunks: Generator[Any, None, None]) -> Generator[Any, None, None]:
        """``chunks`` (a blocking stream), given up on at the deadline.

        The caller's thread reads them when the chain's models end their own calls at the
        deadline (see `bounded`); the deadline is also checked before each chunk.
        """
        in_thread = not self.spec.deadline_in_transport
        return _deadline.iterate(chunks, self.deadline_at, self.deadline_error, in_thread=in_thread)

    def abounded(self) -> AbstractAsyncContextManager[None]:
        """A block cancelled at the deadline, which then raises `TurnDeadlineError`."""
        return _deadline.abounded(self.deadline_at, self.deadline_error)

    def bounded_effect(self, effect: Effect) -> Effect:
        """``effect`` (a model call), given up on at the deadline (`bounded`, `abounded`)."""
        return Do(lambda: self.bounded(effect.run), lambda: self._abounded_run(effect))

    async def _abounded_run(self, effect: Effect) -> Any:
        async with self.abounded():
            return await effect.arun()
