"""Each rule of a turn is written once (`chatchain._flow`): sync and async callers get the same.

These tests pin rules that the sync and async copies of the turn once wrote differently.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from langchain_core.messages import ChatMessageChunk
from langchain_core.outputs import ChatGenerationChunk
from langchain_openai.chat_models.base import OpenAIAPIContextOverflowError
from pydantic import Field

from chatchain import (
    Budget,
    Chatbot,
    ContextTooLongError,
    Settings,
    TurnDeadlineError,
    UsageLedger,
    create_chat_chain,
)
from chatchain._flow import END, Do, Pull, arun, astream, blocking, call, run, stream
from chatchain._turn import Turn
from chatchain.stores import MemoryStore
from chatchain.testing import FakeChatModel
from chatchain.usage import BudgetHold, BudgetLimit

SID = "s"


def _turn(budget: Budget | None = None) -> tuple[Turn, UsageLedger]:
    store = MemoryStore()
    ledger = UsageLedger(store)
    chain = create_chat_chain(
        FakeChatModel(model_name="gpt-4o-mini"),
        get_session_history=store,
        ledger=ledger,
        budget=budget,
    )
    turn = chain._begin({"input": "hello"}, {"configurable": {"session_id": SID}})
    return turn, ledger


def _held_tokens(ledger: UsageLedger) -> int:
    """The tokens the session's holds keep aside (probed with a hold no cap admits)."""
    limit = BudgetLimit("session", SID, max_tokens=1)
    probe = BudgetHold(SID, 10**9, 0.0, datetime.now(UTC) + timedelta(minutes=1))
    refusal = ledger.hold(probe, [limit])
    assert refusal is not None
    return refusal.held_tokens


# -- the sending guard: nothing goes out once the turn is over ----------------------------------


@pytest.mark.parametrize("way", ["sync", "async"])
@pytest.mark.parametrize("over", ["ended", "expired"])
def test_a_call_of_a_turn_that_is_over_is_not_sent(way: str, over: str) -> None:
    turn, _ = _turn()
    if over == "ended":
        turn.end()
    else:
        turn.deadline_at = time.monotonic() - 1.0
    counted: list[int] = []

    def count() -> int:
        counted.append(1)
        return 10

    with pytest.raises(TurnDeadlineError, match="CHATCHAIN_TURN_DEADLINE"):
        if way == "sync":
            turn.sending(count)
        else:
            asyncio.run(turn.asending(count))
    assert counted == []  # refused before anything about the call was prepared
    assert turn._call is None


# -- a hold being taken holds the turn's end off ------------------------------------------------


@pytest.mark.parametrize("way", ["sync", "async"])
def test_a_turn_that_ends_while_its_hold_is_taken_gives_the_hold_back(
    way: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The turn ends (its deadline passed; `end` runs in the caller's thread) while its call
    # is still taking its budget hold (an abandoned worker, or the event loop's task): the
    # end must wait for the hold and give it back, not leave it held till it expires.
    turn, ledger = _turn(Budget(session_tokens=100_000))
    store = ledger.store
    entered, go = threading.Event(), threading.Event()
    real_hold, real_ahold = store.hold_budget, store.ahold_budget

    def slow_hold(*args: Any) -> Any:
        entered.set()
        go.wait(5)
        return real_hold(*args)

    async def slow_ahold(*args: Any) -> Any:
        entered.set()
        await asyncio.to_thread(go.wait, 5)
        return await real_ahold(*args)

    monkeypatch.setattr(store, "hold_budget", slow_hold)
    monkeypatch.setattr(store, "ahold_budget", slow_ahold)
    ended = threading.Event()

    def end_meanwhile() -> None:
        entered.wait(5)
        turn.end()
        ended.set()

    ender = threading.Thread(target=end_meanwhile)
    ender.start()
    try:
        if way == "sync":
            caller = threading.Thread(target=turn.sending, args=(lambda: 10,))
            caller.start()
            ended.wait(0.3)
            go.set()
            caller.join(5)
        else:

            async def send() -> None:
                sending = asyncio.create_task(turn.asending(lambda: 10))
                await asyncio.to_thread(ended.wait, 0.3)
                go.set()
                await sending

            asyncio.run(send())
    finally:
        go.set()
        ender.join(5)
    monkeypatch.undo()
    assert ended.is_set()
    assert _held_tokens(ledger) == 0  # nothing stranded: the end gave the hold back


# -- the drivers ------------------------------------------------------------------------------


class _Box:
    """A store-like object with x / ax twins, recording which one ran."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def put(self, value: int) -> int:
        self.ran.append("put")
        return value + 1

    async def aput(self, value: int) -> int:
        self.ran.append("aput")
        return value + 2

    def fail(self) -> None:
        raise KeyError("sync")

    async def afail(self) -> None:
        raise KeyError("async")


def _flow(box: _Box) -> Any:
    got = yield call(box, "put", 1)
    try:
        yield call(box, "fail")
    except KeyError as exc:  # the effect's exception, where the flow yielded it
        caught = exc.args[0]
    side = yield Do(lambda: "sync", lambda: asyncio.sleep(0, "async"))
    off = yield blocking(threading.current_thread)
    return got, caught, side, off is threading.main_thread()


def test_run_and_arun_drive_the_same_flow_with_their_own_io() -> None:
    box = _Box()
    assert run(_flow(box)) == (2, "sync", "sync", True)
    assert asyncio.run(arun(_flow(box))) == (3, "async", "async", False)
    assert box.ran == ["put", "aput"]


def _items(box: _Box, saved: list[str]) -> Any:
    source = Pull(lambda: iter("abc"), lambda: _aiter("abc"))
    got = ""
    try:
        while (item := (yield source)) is not END:
            got += item
            yield item
        saved.append("whole:" + got)
    except (GeneratorExit, asyncio.CancelledError):
        yield source.close()
        saved.append(f"partial:{got}:{(yield call(box, 'put', 0))}")
        raise


async def _aiter(text: str) -> Any:
    for piece in text:
        yield piece


def test_a_stream_stopped_early_still_runs_the_flows_cleanup_effects() -> None:
    box, saved = _Box(), []
    items: Iterator[str] = stream(_items(box, saved))
    assert next(items) == "a"
    items.close()  # type: ignore[attr-defined]

    async def consume() -> None:
        items = astream(_items(box, saved))
        assert await anext(items) == "a"
        assert await anext(items) == "b"
        await items.aclose()  # type: ignore[attr-defined]

    asyncio.run(consume())
    assert saved == ["partial:a:1", "partial:ab:2"]
    assert "".join(stream(_items(box, saved))) == "abc"
    assert saved[-1] == "whole:abc"


# -- the retry with less history: only while the caller has seen nothing -----------------------


class _OverflowAfterAPiece(FakeChatModel):
    """Streams one piece under another role than "assistant" (a `ChatMessageChunk`, as
    langchain-openai makes of a delta whose role it does not know), then reports a context
    overflow inside the stream; its first plain call overflows at once."""

    overflowed: list[str] = Field(default_factory=list)

    def _overflow(self) -> Exception:
        self.overflowed.append("yes")
        return OpenAIAPIContextOverflowError(
            "Your input exceeds the context window of this model.",
            request=httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions"),
            body=None,
        )

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any) -> Any:
        if not self.overflowed:
            raise self._overflow()
        return super()._generate(messages, stop, run_manager, **kw)

    async def _agenerate(
        self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> Any:
        return self._generate(messages, stop, run_manager, **kw)

    def _stream(self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any) -> Any:
        if not self.overflowed:
            yield ChatGenerationChunk(message=ChatMessageChunk(content="Sure! ", role="model"))
            raise self._overflow()
        yield from super()._stream(messages, stop, run_manager, **kw)

    async def _astream(
        self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> Any:
        for chunk in self._stream(messages, stop, run_manager, **kw):
            yield chunk


def _take(bot: Chatbot, mode: str) -> tuple[str, list[str]]:
    """What the caller of ``mode`` received (text, or the error's class) and the notices."""
    if mode in ("chat", "achat"):
        reply = (
            bot.chat("again", session_id=SID)
            if mode == "chat"
            else asyncio.run(bot.achat("again", session_id=SID))
        )
        return reply.text, list(reply.notices)
    pieces: list[str] = []
    try:
        if mode == "stream":
            pieces.extend(bot.stream("again", session_id=SID))
        else:

            async def consume() -> None:
                async for piece in bot.astream("again", session_id=SID):
                    pieces.append(piece)

            asyncio.run(consume())
    except ContextTooLongError as exc:
        return "".join(pieces) + f"<{type(exc).__name__}>", []
    return "".join(pieces), []


@pytest.mark.parametrize("mode", ["chat", "stream", "achat", "astream"])
def test_an_overflow_after_the_caller_saw_a_piece_is_not_retried(
    settings: Settings, mode: str
) -> None:
    # A retry with less history repeats the reply from its start: fine while nothing of it
    # reached the caller (a plain call), not once a piece did, whatever that piece was.
    model = _OverflowAfterAPiece(model_name="gpt-4o-mini")
    bot = Chatbot(settings, llm=model, system="Be brief.")
    model.overflowed.append("not yet")  # the first turn goes through: a history to drop
    bot.chat("first", session_id=SID)
    model.overflowed.clear()
    calls = len(model.calls)

    text, notices = _take(bot, mode)

    if mode in ("chat", "achat"):  # nothing was shown: retried with the newest messages
        assert text == "Echo: again"
        assert any("retried with the newest" in notice for notice in notices)
        assert len(model.calls) == calls + 1  # the retry (the overflowing call raised first)
    else:  # the caller saw "Sure! ": no second reply after it
        assert text == "Sure! <ContextTooLongError>"
        assert model.overflowed == ["yes"]
