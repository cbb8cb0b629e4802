"""A turn's money: its budget holds, the usage the endpoint did not report, and the reply
read no further than what was held.

Before each call goes out the turn holds what the call may cost (`_take_hold_flow`, sized by
`chatchain.budgets`), and sends it with the ``max_tokens`` that hold pays for
(`BudgetedModel`); a reply that runs past it is stopped and counted here (`ReplyMeter`,
`cut_at_hold`). A call whose usage never arrives (a stream cut before its usage chunk) is
counted here too (`_settle_call`): the endpoint billed it. The turn's commit
(`_turn_commit`) records the usage and ends the hold in one write.

`TurnMoney` is one part of `chatchain._turn.Turn` (see that module for how the parts fit).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.runnables import Runnable, RunnableConfig

from chatchain import _metering, _streaming, budgets
from chatchain._flow import Do, Flow, call
from chatchain._metering import Estimate
from chatchain._options import options_of
from chatchain._tokens import TokenCounter
from chatchain._turn_deadline import TurnDeadline
from chatchain.budgets import MIN_REPLY_TOKENS, BudgetHold, BudgetLimit, BudgetRefusal, HoldSizing
from chatchain.errors import BudgetExceeded

if TYPE_CHECKING:
    from chatchain.usage import Usage

__all__ = ["CUT_AT_HOLD", "TURN_KEY", "BudgetedModel", "ReplyMeter", "TurnMoney", "holding"]

logger = logging.getLogger("chatchain")

_NO_HITS = _metering.CacheHits()

CUT_AT_HOLD = "cut_at_hold"
"""The ``response_metadata`` key (``True``) of a reply chatchain stopped reading at its budget
hold because the endpoint went on past the ``max_tokens`` it was sent with."""

TURN_KEY = "__chatchain_turn"
"""Where a run's configurable carries its `Turn` (``__``: LangChain never copies it to tracing)."""


class TurnMoney(TurnDeadline):
    """The money part of a `Turn`: its holds, its calls' usage, its budget notices."""

    if TYPE_CHECKING:  # the state of `Turn` this part reads and writes
        session_id: str
        user_id: str | None
        config: RunnableConfig
        handler: Any
        limits: tuple[BudgetLimit, ...]
        summary_usage: Usage | None
        reply_limit: int | None
        steps: list[BaseMessage]
        text: _streaming.SharedText
        _reply: _streaming.StreamedReply
        _open: tuple[AIMessage, dict[str, ToolMessage]] | None
        _count_prompt: Callable[[], int] | None
        _hold: str | None
        _ended: bool
        _ending: threading.Lock
        _cut_by: tuple[BudgetLimit, bool] | None
        _spent: tuple[int, int]
        _call: _Call | None
        _estimated: Estimate | None
        _estimate_reported: bool
        _hold_size: tuple[int, float]
        _cut_at_hold: int | None
        _estimated_calls: int

        def notice(self, text: str) -> None: ...

    @property
    def budgeted(self) -> bool:
        """Whether any cap applies to this turn: the budget's, or the call's own."""
        return bool(self.spec.budget) or bool(self.limits)

    @property
    def asked_tokens(self) -> int | None:
        """The call's own ``max_tokens`` (`ModelOptions`, a client's), or ``None``."""
        options = options_of(self.config)
        return None if options is None else options.max_tokens

    @property
    def reply_cap(self) -> int | None:
        """The cap on one reply: the deployment's (`TurnSpec.max_tokens`) lowered to the
        call's own ``max_tokens``, never raised by it; ``None`` when neither sets one."""
        caps = [cap for cap in (self.spec.max_tokens, self.asked_tokens) if cap is not None]
        return min(caps) if caps else None

    @property
    def reply_ceiling(self) -> int:
        """The most reply tokens this turn's budgeted call is sent with (`TurnSpec.
        reply_ceiling`, lowered to the call's own ``max_tokens``)."""
        asked = self.asked_tokens
        ceiling = self.spec.reply_ceiling
        return ceiling if asked is None else min(ceiling, asked)

    def reply_meter(self) -> ReplyMeter:
        """A meter of this call's reply, stopping it at the reply tokens held for it."""
        assert self.reply_limit is not None
        # With tools its text has the calls' arguments too: not the turn's text then.
        text = self.text if self.spec.tools is None else None
        return ReplyMeter(self.spec.recall.counter, self.reply_limit, text)

    def cut_at_hold(self, meter: ReplyMeter) -> None:
        """The endpoint went on past what was held and the call was stopped (see
        `ReplyMeter`): it never sends its usage then, so what it billed is counted here, the
        prompt and every reply token that arrived, and metered as the call's usage."""
        prompt = self._count_prompt() if self._count_prompt is not None else 0
        usage = {
            "input_tokens": prompt,
            "output_tokens": meter.counted,
            "total_tokens": prompt + meter.counted,
        }
        model = self.spec.default_model or ""
        message = AIMessage(
            content="", usage_metadata=usage, response_metadata={"model_name": model}
        )
        self.handler.on_llm_end(LLMResult(generations=[[ChatGeneration(message=message)]]))
        self._cut_at_hold = meter.limit
        self._estimated_calls += 1

    # -- usage the endpoint did not report -----------------------------------------------------

    def _next_call(self, count_prompt: Callable[[], int]) -> None:
        """A call is about to be sent: settle the one before it (a tool round's), start this."""
        if self._call is not None and len(self.steps) > self._call.steps:
            self._settle_call(self.steps[self._call.steps])
        handler = self.handler
        self._call = _Call(
            count_prompt,
            handler.prompt_tokens,
            handler.completion_tokens,
            handler.successful_requests,
            len(self.steps),
            getattr(getattr(handler, "hits", None), "calls", 0),
        )
        self._count_prompt = count_prompt
        extra = self._estimated or Estimate(0, 0, 0)
        self._spent = (
            handler.prompt_tokens + extra.prompt_tokens,
            handler.completion_tokens + extra.completion_tokens,
        )

    def _report_estimate(self, model: str | None) -> None:
        """Let the user's `get_openai_callback` see what the ledger will: once a turn."""
        if self._estimated is None or self._estimate_reported:
            return
        self._estimate_reported = True
        _metering.report_estimate(self.config, self.handler, self._estimated, model)

    def _call_output(self, reply: BaseMessage | None) -> BaseMessage | None:
        """What the latest call produced: a tool step's message, or ``reply`` if any."""
        if self._open is not None:
            return self._open[0]
        call = self._call
        if call is not None and len(self.steps) > call.steps:
            return self.steps[call.steps]
        if reply is not None and (self._reply or reply.content):
            return reply
        return None

    def _settle_call(self, output: BaseMessage | None) -> None:
        """The latest call is over, with ``output`` (``None``: it produced nothing). If the
        endpoint reported no usage for it (a stream cut before its usage chunk, or an
        endpoint that never sends one), count its prompt and output here: it was billed."""
        call, self._call = self._call, None
        if call is None or output is None or not call.unreported(self.handler):
            return
        counter = self.spec.recall.counter
        ended = self.handler.successful_requests > call.requests  # else counted as a request here
        this = Estimate(call.count_prompt(), counter([output]), 0 if ended else 1)
        was = self._estimated or Estimate(0, 0, 0)
        self._estimated = Estimate(
            was.prompt_tokens + this.prompt_tokens,
            was.completion_tokens + this.completion_tokens,
            was.requests + this.requests,
        )

    # -- budget holds --------------------------------------------------------------------------

    def _sizing(self, summary: bool = False) -> HoldSizing:
        """How this call's hold is sized (see `chatchain.budgets`). A call after tool calls
        holds what the turn's earlier calls used too; a summary call, made before them, is
        priced as the summary model."""
        spec = self.spec
        model = spec.default_model
        if summary:  # the summary model
            model = spec.recall.summary_model_name or model
        needs_price = spec.budget.needs_price or any(x.max_usd is not None for x in self.limits)
        return HoldSizing(
            self.session_id,
            self.user_id,
            (*spec.budget.limits(self.session_id, self.user_id), *self.limits),
            spec.pricer,
            model,
            needs_price,
            spec.hold_ttl,
            (0, 0) if summary else self._spent,
        )

    def _first_hold(
        self, prompt_tokens: int, summary: bool
    ) -> tuple[BudgetHold, list[BudgetLimit]]:
        self._cut_by = None
        reply = self.reply_ceiling
        if summary:  # capped at the summary call's own max_tokens
            reply = self.spec.recall.summary_reply_tokens or self.spec.reply_ceiling
        sizing = self._sizing(summary)
        return sizing.hold(prompt_tokens, reply), list(sizing.limits)

    def _smaller_hold(
        self, prompt_tokens: int, hold: BudgetHold, refusal: BudgetRefusal, summary: bool
    ) -> BudgetHold:
        if summary:  # never cut: a summary cut short would be kept as the memory
            raise self._exceeded(refusal, hold)
        sizing = self._sizing()
        cut = sizing.smaller(prompt_tokens, hold, refusal)
        if cut is None:
            raise self._exceeded(refusal, sizing.hold(prompt_tokens, MIN_REPLY_TOKENS))
        self._cut_by = (cut.limit, cut.in_usd)
        return cut.hold

    def _held(self, hold: BudgetHold, prompt_tokens: int) -> int:
        self._hold = hold.id
        self._hold_size = (hold.tokens, hold.cost_usd)
        self.reply_limit = self._sizing().reply_tokens(hold, prompt_tokens)
        return self.reply_limit

    def _take_hold_flow(self, prompt_tokens: int, summary: bool = False) -> Flow[int]:
        """Hold what this call may cost; returns the ``max_tokens`` to send it with."""
        # A worker abandoned at the deadline must not hold, nor send, afterwards: the turn's
        # end waits for a hold being taken, then gives it back.
        yield from holding(self._ending)
        try:
            if self._ended or self.expired:
                raise self.deadline_error()
            yield from self._release_flow()
            hold, limits = self._first_hold(prompt_tokens, summary)
            while (refusal := (yield call(self.spec.ledger, "hold", hold, limits))) is not None:
                hold = self._smaller_hold(prompt_tokens, hold, refusal, summary)
            return self._held(hold, prompt_tokens)
        finally:
            self._ending.release()

    # -- what the user is told -----------------------------------------------------------------

    def _exceeded(self, refusal: BudgetRefusal, hold: BudgetHold) -> BudgetExceeded:
        error = budgets.exceeded(refusal, hold, self._sent_so_far())
        logger.warning("Session %r: %s", self.session_id, error)
        return error

    def _sent_so_far(self) -> str:
        """What a refused turn had already sent (tool rounds, a summary)."""
        handler = self.handler
        calls = handler.successful_requests - getattr(handler, "hits", _NO_HITS).calls
        tokens = handler.prompt_tokens + handler.completion_tokens
        return budgets.sent_so_far(calls, tokens, self.summary_usage is not None)

    def _explain(self, reply: BaseMessage) -> None:
        """The notices of a turn's reply: cut by the budget, or billed past its hold."""
        limit = self.reply_limit
        if limit is None:
            return
        if self._cut_at_hold is not None:
            self.notice(budgets.past_hold_notice(self._cut_at_hold))
            return
        billed = self.handler.completion_tokens - self._spent[1]
        if billed > limit:
            self.notice(budgets.billed_past_notice(billed, limit))
        self._note_cut(reply)

    def _note_cut(self, reply: BaseMessage) -> None:
        """Tell the user when the budget, not their own cap, cut the reply short."""
        limit = self.reply_limit
        if limit is None or reply.response_metadata.get("finish_reason") != "length":
            return
        text = budgets.cut_notice(limit, self._cut_by, self.reply_cap)
        if text is not None:
            self.notice(text)

    def _release_flow(self) -> Flow[None]:
        """Give back the turn's budget hold, if it still has one (the turn failed)."""
        if self._hold is not None:
            hold, self._hold = self._hold, None
            yield call(self.spec.ledger, "release", hold)


@dataclass(frozen=True)
class _Call:
    """One call of a turn: how to count its prompt, and its handler's counts before it."""

    count_prompt: Callable[[], int]
    prompt_tokens: int
    completion_tokens: int
    requests: int
    steps: int
    hits: int

    def unreported(self, handler: Any) -> bool:
        """Whether the endpoint reported no usage for this call (and no cache answered it)."""
        tokens = (handler.prompt_tokens, handler.completion_tokens)
        hits = getattr(getattr(handler, "hits", None), "calls", 0)
        return tokens == (self.prompt_tokens, self.completion_tokens) and hits == self.hits


def holding(lock: threading.Lock) -> Flow[None]:
    """Take ``lock``: at once when it is free (the common case), else waiting in a thread
    (an async caller must not block its event loop; see `_acquire`)."""
    if not lock.acquire(blocking=False):
        yield Do(lock.acquire, partial(_acquire, lock))


async def _acquire(lock: threading.Lock) -> bool:
    """Wait for ``lock`` in a thread; a cancelled wait gives it back once the thread has it."""
    waiting = asyncio.ensure_future(asyncio.to_thread(lock.acquire))
    try:
        return await asyncio.shield(waiting)
    except asyncio.CancelledError:
        waiting.add_done_callback(lambda _: lock.release())
        raise


class ReplyMeter:
    """Counts a streamed reply's tokens as they arrive, to stop reading at the budget hold.

    An endpoint that ignores ``max_tokens`` (some proxies and local servers do) would bill a
    reply of any length: the call's hold must bound it all the same. A chunk that brings more
    text once the count has passed the held reply tokens is the proof: the reply is read no
    further (at most one chunk past the hold was generated, and it is counted). Text is not
    refused before that point, so an endpoint that honours ``max_tokens`` is not cut where
    the counter agrees with it; its last chunks (finish reason, usage) carry no text and
    always pass.

    The count is the sum of each chunk's count plus one (cheap, and not below the count of
    the whole: a counter rounds each piece, and a token may span two chunks); once it passes
    the limit the whole text so far is counted again, so that this margin does not stop a
    reply early. The count of the whole is what the call is metered with when it is cut.
    """

    def __init__(
        self, counter: TokenCounter, limit: int, text: _streaming.SharedText | None = None
    ) -> None:
        self.counter = counter
        self.limit = limit
        self.counted = 0
        # The reply's text (in the turn's ``text`` while it is the same), counted again whole
        # once past the hold.
        self._text = _streaming.TextBuffer(text)
        self._empty = counter([AIMessage(content="")])

    def _count(self, text: str) -> int:
        return max(0, self.counter([AIMessage(content=text)]) - self._empty)

    def _bound(self, text: str) -> int:
        """Not below what ``text`` adds to the count of the text before it."""
        return self._count(text) + 1

    def past_hold(self, chunk: Any) -> bool:
        """Whether ``chunk`` brings text beyond the hold (then it is not read)."""
        text = _chunk_text(chunk)
        if not text:
            return False
        self._text.write(text)
        if self.counted > self.limit:  # it was generated, so billed: count it too
            self.counted = self._count(self._text.getvalue())
            return True
        self.counted += self._bound(text)
        if self.counted > self.limit:
            self.counted = self._count(self._text.getvalue())
        return False


def _chunk_text(chunk: Any) -> str:
    """The text a chunk adds to the reply: its content and its tool calls' arguments."""
    if not isinstance(chunk, AIMessageChunk):
        return ""
    calls = "".join(str(call.get("args") or "") for call in chunk.tool_call_chunks)
    return chunk.text + calls


def _cut_chunk() -> AIMessageChunk:
    """The last chunk of a reply stopped at its hold: marks it cut (``finish_reason``)."""
    return AIMessageChunk(
        content="", response_metadata={"finish_reason": "length", CUT_AT_HOLD: True}
    )


class BudgetedModel(Runnable[Any, Any]):
    """The chat model, sent with the ``max_tokens`` its turn's budget hold allows.

    The turn is found in the run's configurable (`TURN_KEY`); without one, or without a
    budget and without a call's own ``max_tokens`` (`ModelOptions`), the model is called as
    it is. Under a budget the reply is read only up to what was held (`ReplyMeter`), for
    endpoints that ignore ``max_tokens``: a budgeted call is therefore always streamed,
    ``invoke`` included (its chunks are merged into the reply it returns), since a reply
    sent whole cannot be stopped and would be billed whole. A call's own ``max_tokens``
    without a budget is sent, and the reply read, the same way.
    """

    def __init__(self, model: Runnable[Any, Any]) -> None:
        self.model = model

    @staticmethod
    def _turn(config: RunnableConfig | None) -> TurnMoney | None:
        turn = (config or {}).get("configurable", {}).get(TURN_KEY)
        return turn if isinstance(turn, TurnMoney) and turn.reply_limit is not None else None

    @staticmethod
    def _limited(turn: TurnMoney | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments, with the ``max_tokens`` of its hold (an argument of the call
        rather than a binding: the response cache's key then has it however it is called)."""
        if turn is None or turn.reply_limit is None:
            return kwargs
        return {**kwargs, "max_tokens": turn.reply_limit}

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        if self._turn(config) is None:
            return self.model.invoke(input, config, **kwargs)
        return _streaming.merged(self.stream(input, config, **kwargs))

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        if self._turn(config) is None:
            return await self.model.ainvoke(input, config, **kwargs)
        reply = _streaming.StreamedReply()
        async for chunk in self.astream(input, config, **kwargs):
            if isinstance(chunk, AIMessageChunk):
                reply.add(chunk)
        return reply.message()

    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        turn = self._turn(config)
        # Through `_streaming`: the model's chunks are not kept (by langchain-core) either.
        inner = _streaming.stream(self.model, input, config, **self._limited(turn, kwargs))
        if turn is None:
            yield from inner
            return
        meter = turn.reply_meter()
        try:
            for chunk in inner:
                if meter.past_hold(chunk):
                    break
                yield chunk
            else:
                return
        finally:
            inner.close()  # type: ignore[attr-defined]
        turn.cut_at_hold(meter)
        yield _cut_chunk()

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        turn = self._turn(config)
        inner = _streaming.astream(self.model, input, config, **self._limited(turn, kwargs))
        if turn is None:
            async for chunk in inner:
                yield chunk
            return
        meter = turn.reply_meter()
        try:
            async for chunk in inner:
                if meter.past_hold(chunk):
                    break
                yield chunk
            else:
                return
        finally:
            await inner.aclose()  # type: ignore[attr-defined]
        turn.cut_at_hold(meter)
        yield _cut_chunk()
