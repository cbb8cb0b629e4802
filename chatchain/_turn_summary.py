"""A turn's running summary: old turns folded into it before the turn's own call, if due.

The summary call is a separate metered call, held for and bounded by the turn's deadline
like the turn's own; if it fails (but for the budget, the deadline, or the configuration)
the turn goes on with the window alone.

`TurnSummary` is one part of `chatchain._turn.Turn` (see that module for how the parts fit).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from langchain_core.messages import BaseMessage

from chatchain import _metering
from chatchain._flow import Flow, call
from chatchain._turn_money import TurnMoney
from chatchain.errors import BudgetExceeded, ConfigurationError, TurnDeadlineError

if TYPE_CHECKING:
    from chatchain.usage import UsageEntry
    from chatchain.window import SummaryCall

__all__ = ["TurnSummary"]

logger = logging.getLogger("chatchain")


class TurnSummary(TurnMoney):
    """The summary part of a `Turn`: `_summarize_flow`, run as the turn opens."""

    if TYPE_CHECKING:  # the state of `Turn` this part reads and writes
        notices: list[str]

    def _summarize_flow(self) -> Flow[None]:
        """Fold old turns into the running summary first, if due (a separate metered call).

        Raises:
            BudgetExceeded: The summary call could pass a cap (the turn would too).
        """
        store = self.spec.store
        if store is None:
            return
        check = self._summary_check if self.budgeted else None
        try:
            summary = yield from self.spec.recall.summary_flow(
                store, self.session_id, check, self.bounded_effect
            )
        except (BudgetExceeded, ConfigurationError, TurnDeadlineError):
            raise
        except Exception as exc:  # the turn can go on without a fresher summary
            yield from self._release_flow()
            self._summary_failed(exc)
            return
        if summary is not None:
            yield call(self.spec.ledger, "record", self._summary_entry(summary), release=self._hold)
            self._hold = None

    def _summary_check(self, request: list[BaseMessage]) -> Flow[int]:
        return self._take_hold_flow(self.spec.recall.counter(request), summary=True)

    def _summary_entry(self, call: SummaryCall) -> UsageEntry:
        entry = _metering.entry_from(
            call.handler,
            session_id=self.session_id,
            user_id=self.user_id,
            model=call.model or self.spec.default_model,
            pricer=self.spec.pricer,
            latency_s=call.latency_s,
            summary=True,
            configured_model=self.spec.recall.summary_model_name or self.spec.default_model,
        )
        self.summary_usage = entry.usage()
        return entry

    def _summary_failed(self, exc: Exception) -> None:
        error = self.spec.describe_failure(exc) or exc
        self.notices.append(
            f"The running summary could not be updated ({error}); "
            "the turn went on with the window alone."
        )
        logger.warning("Summary on session %r failed: %s", self.session_id, error)
