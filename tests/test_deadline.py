"""The whole-turn deadline with a user-supplied model, and replies that are not valid Unicode.

The hostile endpoints themselves (keep-alive trickles, a body a byte a second) are driven
through the real `ChatOpenAI` in tests/reliability/test_hostile_endpoint.py.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence

import httpx2
import pytest
from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import BaseMessage

from chatchain import Chatbot, Settings, TurnDeadlineError, _deadline, create_chat_chain
from chatchain._turn import _valid_unicode
from chatchain.testing import FakeChatModel
from tests.entry_points import each_library_way, turn

DEADLINE = 0.3


def _turn(bot: Chatbot, mode: str, text: str = "hello") -> str:
    return turn(bot, mode, text).text


def _join_workers() -> None:
    """Wait for the workers that turns gave up on (they end when their call returns)."""
    for thread in threading.enumerate():
        if thread.name.startswith("chatchain-"):
            thread.join(timeout=10)


@pytest.mark.slow  # runs until its deadline
@each_library_way()
def test_a_slow_user_model_is_stopped_at_the_deadline(settings: Settings, mode: str) -> None:
    slow = FakeChatModel(model_name="gpt-4o-mini", delay=6.0)  # per reply, and per chunk
    bot = Chatbot(settings.model_copy(update={"turn_deadline": DEADLINE}), llm=slow)

    started = time.perf_counter()
    with pytest.raises(TurnDeadlineError, match="CHATCHAIN_TURN_DEADLINE") as caught:
        _turn(bot, mode)
    elapsed = time.perf_counter() - started

    assert DEADLINE <= elapsed < 4.5, elapsed  # not the 6 s the model takes
    assert "Nothing was stored" in str(caught.value)
    assert bot.history("s") == [] and bot.usage_entries() == []
    # The session is free: a turn on it runs at once (the model answers fast now).
    slow.delay = 0.0
    assert _turn(bot, mode, "again") == "Echo: again"
    assert [m.text for m in bot.history("s")] == ["again", "Echo: again"]
    _join_workers()


def test_without_a_deadline_a_slow_turn_runs_to_its_end(settings: Settings) -> None:
    slow = FakeChatModel(model_name="gpt-4o-mini", delay=0.5)
    bot = Chatbot(settings.model_copy(update={"turn_deadline": None}), llm=slow)
    assert bot.chat("hi", session_id="s").text == "Echo: hi"


class _SlowHistory(BaseChatMessageHistory):
    """A history that takes its time to load: the deadline passes while the turn reads it."""

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        time.sleep(1.0)
        return []

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        raise AssertionError("the turn stored nothing")

    def clear(self) -> None:
        pass


def test_a_call_given_up_on_sends_nothing_afterwards(settings: Settings) -> None:
    # The turn abandons its worker while the history loads; the worker must then neither
    # take a budget hold nor send the request (which would be billed and never recorded).
    fake = FakeChatModel(model_name="gpt-4o-mini")
    history = _SlowHistory()

    def get_history(session_id: str) -> BaseChatMessageHistory:
        return history

    chain = create_chat_chain(
        fake,
        settings=settings.model_copy(
            update={"turn_deadline": DEADLINE, "budget_session_tokens": 10**6}
        ),
        get_session_history=get_history,
        window=False,
    )
    config = {"configurable": {"session_id": "s"}}
    with pytest.raises(TurnDeadlineError):
        chain.invoke({"input": "hi"}, config)
    _join_workers()  # the worker has now loaded the history and met the fence
    assert fake.calls == []
    assert chain.ledger.entries() == []


@each_library_way()
def test_a_lone_surrogate_in_a_reply_is_stored_as_u_fffd_with_a_notice(
    bot: Chatbot, fake: FakeChatModel, mode: str
) -> None:
    fake.queue("half an emoji \ud83d")
    text = _turn(bot, mode)

    stored = bot.history("s")[-1]
    assert stored.text == "half an emoji \ufffd"
    if mode in ("chat", "achat"):
        assert text == stored.text
    (entry,) = bot.usage_entries()  # billed once, as the endpoint reported it
    assert (entry.requests, entry.estimated) == (1, False)


def test_the_notice_is_on_the_reply(bot: Chatbot, fake: FakeChatModel) -> None:
    fake.queue("a \ud800 b \udfff", "fine")
    reply = bot.chat("x", session_id="s")
    assert reply.text == "a \ufffd b \ufffd"
    (notice,) = reply.notices
    assert "2 invalid code point(s)" in notice and "U+FFFD" in notice
    assert bot.chat("y", session_id="s").notices == ()
    fake.queue("c \udc00")
    stream = bot.stream("z", session_id="s")
    assert "".join(stream) == "c \udc00"  # the user saw what came
    assert any("U+FFFD" in notice for notice in stream.notices)


def test_a_surrogate_pair_split_across_chunks_is_joined_not_lost(
    bot: Chatbot, fake: FakeChatModel
) -> None:
    fake.queue("smile \ud83d\ude00")  # two code points, as two chunks' JSON escapes give
    reply = bot.chat("x", session_id="s")
    assert reply.text == "smile \U0001f600" and reply.notices == ()
    assert bot.history("s")[-1].text == "smile \U0001f600"


def test_valid_unicode_walks_nested_values_and_keeps_valid_ones_as_they_are() -> None:
    valid = {"a": ["b", ("c", 1)], "d": None}
    assert _valid_unicode(valid) == (valid, 0) and _valid_unicode(valid)[0] is valid
    fixed, count = _valid_unicode({"a": ["ok", ("\ud800", 1)], "b": "\ufffd kept"})
    assert (fixed, count) == ({"a": ["ok", ("\ufffd", 1)], "b": "\ufffd kept"}, 1)


def test_a_read_that_blocks_late_in_a_reply_ends_at_the_deadline() -> None:
    # httpcore takes a response body's read timeout once, when the body starts: capping it
    # at the time left when the request went out (1 s) would let a read that starts 0.6 s
    # later block until 1.6 s. Each read of chatchain's transport waits only the time left.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
            time.sleep(0.6)
            conn.sendall(b"1\r\nb\r\n")
            time.sleep(3.0)  # then silence, well within the read timeout

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    pieces: list[bytes] = []
    with httpx2.Client(transport=_deadline.DeadlineTransport(), timeout=5.0) as client:
        started = time.monotonic()
        with (
            pytest.raises(TurnDeadlineError),
            _deadline.running(started + 1.0, lambda: TurnDeadlineError("late")),
            client.stream("GET", f"http://127.0.0.1:{port}/") as response,
        ):
            for piece in response.iter_raw():
                pieces.append(piece)
        elapsed = time.monotonic() - started
    assert pieces == [b"a", b"b"]
    assert 1.0 <= elapsed < 1.3, elapsed
    server.join(timeout=5)
    listener.close()
