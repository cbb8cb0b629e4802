"""Hostile endpoints (issue 11): trickles, slow retries, aliased model names, invalid Unicode.

Driven through the real `ChatOpenAI` by `OpenAITestServer`'s hostile modes, through each
entry point, with a short whole-turn deadline (``CHATCHAIN_TURN_DEADLINE``):

- an endpoint that keeps a stream alive with SSE comments, or sends its body a byte a second,
  never trips the per-read timeout; the deadline ends the turn as a `TurnDeadlineError`, frees
  the session's lock (for another process too) and leaves the history consistent;
- a reply holding a lone surrogate is stored with U+FFFD (on SQLite, Redis and PostgreSQL),
  billed once, and the reply says so in its notices.

Each trickle lasts 30 s: a turn that is not bounded by its deadline runs for all of it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage

from chatchain import Chatbot, EndpointTimeoutError, TurnDeadlineError
from chatchain.stores import HistoryStore
from chatchain.testing import Fault, OpenAITestServer
from chatchain.usage import UsageLedger
from tests.entry_points import each_library_way
from tests.reliability import test_endpoint_faults as faults
from tests.reliability.conftest import assert_ledger_adds_up, assert_no_hold_left
from tests.reliability.test_endpoint_faults import (
    KEY,
    SID,
    BotFactory,
    assert_one_exact_entry,
    assert_turn_added,
    snapshot,
    take_turn,
)

pytestmark = pytest.mark.slow  # each turn runs until its deadline

# The endpoint-fault tests' fixtures: one server per test, one event loop for the module.
server = faults.server
loop = faults.loop
make_bot = faults.make_bot

DEADLINE = 1.5
SLACK = 5.0  # generous: the turn must end near its deadline, not after the 30 s trickle
TRICKLE = 30.0

# For the tests that bring their own store (make_bot would otherwise run them per local store).
OWN_STORE = pytest.param("memory://", id="own-store")

HOSTILE = [
    pytest.param(Fault(keep_alive=TRICKLE, stall_after=2), id="keep-alive-trickle"),
    pytest.param(Fault(drip=TRICKLE), id="byte-a-second"),
    # The client's own retries, each honouring a long Retry-After: 3 tries take 10 s.
    pytest.param(Fault(status=503, retry_after=5.0, times=3), id="slow-retries"),
]


def hostile_bot(make_bot: BotFactory, server: OpenAITestServer, **overrides: Any) -> Chatbot:
    return make_bot(server.base_url, timeout=2.0, turn_deadline=DEADLINE, **overrides)


@each_library_way()
@pytest.mark.parametrize("fault", HOSTILE)
def test_a_hostile_endpoint_is_cut_at_the_turn_deadline(
    server: OpenAITestServer,
    make_bot: BotFactory,
    loop: asyncio.AbstractEventLoop,
    mode: str,
    fault: Fault,
) -> None:
    bot = hostile_bot(make_bot, server)
    bot.chat("seed", session_id=SID)
    before = snapshot(bot)
    server.clear()
    server.add_fault(fault)

    pieces: list[str] = []
    started = time.perf_counter()
    with pytest.raises(TurnDeadlineError) as caught:
        take_turn(bot, mode, "one two three", loop, pieces)
    elapsed = time.perf_counter() - started

    assert DEADLINE <= elapsed < DEADLINE + SLACK, elapsed
    assert isinstance(caught.value, EndpointTimeoutError)
    assert "CHATCHAIN_TURN_DEADLINE" in str(caught.value) and KEY not in str(caught.value)
    if fault.keep_alive and mode in ("stream", "astream"):
        # Two chunks came before the comments: the reply so far is kept, marked, estimated.
        assert pieces == ["Echo:", " one"]
        assert "kept, marked interrupted" in str(caught.value)
        history = bot.store.load(SID)
        assert history[: len(before.messages)] == before.messages
        human, partial = history[len(before.messages) :]
        assert (human.type, human.text) == ("human", "one two three")
        assert (partial.type, partial.text) == ("ai", "Echo: one")
        assert partial.response_metadata["interrupted"] is True
        assert "CHATCHAIN_TURN_DEADLINE" in partial.response_metadata["interrupted_reason"]
        (entry,) = bot.usage_entries(session_id=SID)[len(before.entries) :]
        assert (entry.estimated, entry.requests) == (True, 1)
        assert entry.prompt_tokens > 0 and entry.completion_tokens > 0
    else:
        assert pieces == []
        assert "Nothing was stored" in str(caught.value)
        assert snapshot(bot) == before  # history, entries and totals untouched
    assert_no_hold_left(bot, SID)
    assert_ledger_adds_up(bot)

    # The session is free at once (the trickle goes on for 30 s): the next turn is served.
    server.clear()
    after = snapshot(bot)
    done = take_turn(bot, mode, "are you there?", loop)
    assert done.text == "Echo: are you there?"
    assert_turn_added(bot, after, "are you there?", done.text)
    assert_one_exact_entry(bot, after, server, done.text)
    assert_no_hold_left(bot, SID)


@pytest.mark.parametrize("mode", ["chat", "achat"])
def test_the_summary_call_counts_against_the_deadline(
    server: OpenAITestServer, make_bot: BotFactory, loop: asyncio.AbstractEventLoop, mode: str
) -> None:
    bot = hostile_bot(make_bot, server, window_turns=1, summarize=True)
    seeded = [HumanMessage(f"q{i}") if i % 2 == 0 else AIMessage(f"a{i}") for i in range(20)]
    bot.store.append(SID, seeded)
    server.add_fault(Fault(keep_alive=TRICKLE))  # the first request: the summary's

    started = time.perf_counter()
    with pytest.raises(TurnDeadlineError):
        take_turn(bot, mode, "and now?", loop)
    elapsed = time.perf_counter() - started

    assert DEADLINE <= elapsed < DEADLINE + SLACK, elapsed
    (request,) = server.requests
    assert "summary" in request["body"]["messages"][0]["content"].lower()
    assert bot.store.load(SID) == seeded and bot.summary(SID) is None
    assert bot.usage_entries() == []
    assert_no_hold_left(bot, SID)


OTHER_PROCESS = """
import sys
from chatchain import Chatbot, Settings
from chatchain.testing import FakeChatModel

settings = Settings(api_key="sk-test", store_url=sys.argv[1], lock_timeout=10.0)
with Chatbot(settings, llm=FakeChatModel(replies=["from the other process"])) as bot:
    print(bot.chat("my turn", session_id=sys.argv[2]).text)
"""


@pytest.mark.parametrize("store_url", [OWN_STORE])
def test_another_process_gets_the_session_once_the_deadline_passes(
    server: OpenAITestServer, make_bot: BotFactory, loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    # Without the deadline the first turn would hold the session's lock for the whole 30 s
    # trickle, and the other process would give up after its 10 s lock timeout.
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    bot = hostile_bot(make_bot, server, store_url=url)
    server.add_fault(Fault(keep_alive=TRICKLE))
    outcome: list[BaseException] = []

    def stuck_turn() -> None:
        try:
            bot.chat("stuck", session_id=SID)
        except BaseException as exc:
            outcome.append(exc)

    first = threading.Thread(target=stuck_turn)
    first.start()
    try:
        other = subprocess.run(
            [sys.executable, "-c", OTHER_PROCESS, url, SID],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        first.join(timeout=60)
    assert [type(exc) for exc in outcome] == [TurnDeadlineError]
    assert other.returncode == 0, other.stderr[-1500:]
    assert other.stdout.strip() == "from the other process"
    assert [(m.type, m.text) for m in bot.history(SID)] == [
        ("human", "my turn"),
        ("ai", "from the other process"),
    ]


@each_library_way()
def test_a_reply_under_another_model_name_is_stored_and_billed_once(
    server: OpenAITestServer, make_bot: BotFactory, loop: asyncio.AbstractEventLoop, mode: str
) -> None:
    bot = make_bot(server.base_url)
    before = snapshot(bot)
    server.add_fault(Fault(answer_model="openrouter/gpt-4o-mini"))

    done = take_turn(bot, mode, "who are you?", loop)

    assert done.text == "Echo: who are you?"
    assert_turn_added(bot, before, "who are you?", done.text)
    assert_one_exact_entry(bot, before, server, done.text)
    assert_no_hold_left(bot, SID)


@pytest.mark.parametrize("store_url", [OWN_STORE])
@each_library_way()
@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgres"])
def test_a_lone_surrogate_is_stored_as_u_fffd_with_a_notice(
    request: pytest.FixtureRequest,
    server: OpenAITestServer,
    make_bot: BotFactory,
    loop: asyncio.AbstractEventLoop,
    backend: str,
    mode: str,
) -> None:
    store: HistoryStore = request.getfixturevalue(f"{backend}_store")  # fresh, read back below
    bot = make_bot(server.base_url, store_url=request.getfixturevalue(f"{backend}_url"))
    server.add_fault(Fault(lone_surrogate=True))

    pieces: list[str] = []
    done = take_turn(bot, mode, "smile", loop, pieces)

    if mode in ("stream", "astream"):  # the user saw the text as it came
        assert "".join(pieces) == "Echo: smile \ud83d"
    else:  # the reply returned is the one stored
        assert done.text == "Echo: smile \ufffd"
    assert any("U+FFFD" in notice for notice in done.notices)
    history = store.load(SID)  # through a connection of its own
    assert [(m.type, m.text) for m in history] == [("human", "smile"), ("ai", "Echo: smile \ufffd")]
    assert not history[-1].response_metadata.get("interrupted")
    (entry,) = UsageLedger(store).entries(session_id=SID)
    assert (entry.requests, entry.estimated) == (1, False)
    assert entry.completion_tokens == server.count_tokens("Echo: smile \ud83d")
    assert_no_hold_left(bot, SID)
    assert_ledger_adds_up(bot)
    aclose = getattr(bot.store, "aclose", None)
    if aclose is not None:  # Redis's async connections, opened in this module's event loop
        loop.run_until_complete(aclose())
