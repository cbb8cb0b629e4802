"""Endpoint faults through the real `ChatOpenAI`, and what they leave in the history and ledger.

Every fault of `OpenAITestServer` is driven through each entry point (``chat``, ``stream``,
``achat``, ``astream``) over both local stores (memory and SQLite). Beyond the error class the
user sees (tests/e2e covers that for ``chat``), each test checks the store afterwards:

- a failed turn stores nothing, records no ledger entry and leaves no budget hold;
- a turn retried by the client and then answered is one entry with ``requests == 1``, billed
  exactly as the server billed the request that succeeded, however many the server logged;
- a stream cut midway keeps the partial reply, marked interrupted, and one ``estimated`` entry;
- "context length exceeded" is retried with half the history sent, and billed once.

Every bot has a (huge) token budget, so that each turn takes a budget hold before it is sent:
`assert_no_hold_left` then proves none outlives its turn.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

from chatchain import (
    BadRequestError,
    Chatbot,
    ContextTooLongError,
    EndpointConnectionError,
    EndpointError,
    EndpointTimeoutError,
    RateLimitError,
    ServerError,
    Settings,
)
from chatchain.testing import Fault, OpenAITestServer
from chatchain.usage import UsageEntry
from tests.entry_points import STREAMS, Turned, each_library_way, turn
from tests.reliability.conftest import assert_ledger_adds_up, assert_no_hold_left

KEY = "sk-LEAKCHECK-endpoint-0123456789abcdef"
SID = "s"
TIMEOUT = 4.75

BotFactory = Callable[..., Chatbot]


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The event loop of every async turn in this module, as in a long-lived application.

    langchain-openai shares one async HTTP client per (base URL, timeout) across the process,
    and its pooled connections belong to the loop that opened them: a turn run by a second
    ``asyncio.run`` fails (see `test_async_turns_from_one_event_loop_after_another`).
    """
    loop = asyncio.new_event_loop()
    yield loop
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


@pytest.fixture
def server() -> Iterator[OpenAITestServer]:
    # One server per test: a fault or a slow reply never spills into the next test.
    with OpenAITestServer() as server:
        yield server


_unique = itertools.count(1)


@pytest.fixture
def make_bot(
    store_url: str, bots: list[Chatbot], loop: asyncio.AbstractEventLoop
) -> Iterator[BotFactory]:
    made: list[Chatbot] = []

    def make(base_url: str, **overrides: Any) -> Chatbot:
        values: dict[str, Any] = {
            "api_key": KEY,
            "base_url": base_url,
            "model": "gpt-4o-mini",
            "max_retries": 2,
            "timeout": TIMEOUT,
            "store_url": store_url,
            "window_turns": 4,
            "window_tokens": None,
            "summarize": False,
            # Far above what any test spends: only there so that every turn takes a hold.
            "budget_session_tokens": 10**9,
        }
        values.update(overrides)
        # A timeout of this test's own (by a microsecond): no other test gets its cached
        # async client, which is closed below.
        values["timeout"] += next(_unique) * 1e-6
        bot = Chatbot(Settings(**values), system="Be brief.")
        made.append(bot)
        bots.append(bot)
        return bot

    yield make
    for bot in made:  # close the async connections while their event loop still runs
        client = getattr(bot.chain.model, "root_async_client", None)
        if client is not None:
            loop.run_until_complete(client.close())


def take_turn(
    bot: Chatbot,
    mode: str,
    text: str,
    loop: asyncio.AbstractEventLoop,
    pieces: list[str] | None = None,
) -> Turned:
    """One turn on session `SID` through ``mode``, async ones on the module's ``loop``;
    streamed pieces are appended to ``pieces``."""
    return turn(bot, mode, text, session_id=SID, loop=loop, pieces=pieces)


@dataclass(frozen=True)
class Snapshot:
    messages: list[BaseMessage]
    entries: list[UsageEntry]
    turns: int
    total_tokens: int


def snapshot(bot: Chatbot) -> Snapshot:
    total = bot.usage(SID)
    return Snapshot(
        bot.store.load(SID), bot.usage_entries(session_id=SID), total.turns, total.total_tokens
    )


def billed(server: OpenAITestServer, request: dict[str, Any], reply: str) -> tuple[int, int]:
    """The prompt and completion tokens the server reported for one logged request."""
    messages = request["body"]["messages"]
    prompt = sum(server.count_tokens(m["content"]) + 4 for m in messages) + 3
    return prompt, server.count_tokens(reply)


def assert_turn_added(bot: Chatbot, before: Snapshot, text: str, reply: str) -> None:
    """The history is what it was plus this turn, once, not interrupted."""
    history = bot.store.load(SID)
    assert history[: len(before.messages)] == before.messages
    assert [(m.type, m.text) for m in history[len(before.messages) :]] == [
        ("human", text),
        ("ai", reply),
    ]
    assert not history[-1].response_metadata.get("interrupted")


def assert_one_exact_entry(
    bot: Chatbot, before: Snapshot, server: OpenAITestServer, reply: str
) -> UsageEntry:
    """The turn added one entry, for one request, billed as the server's last request."""
    after = snapshot(bot)
    assert after.entries[: len(before.entries)] == before.entries
    (entry,) = after.entries[len(before.entries) :]
    assert (entry.requests, entry.estimated, entry.summary) == (1, False, False)
    prompt, completion = billed(server, server.requests[-1], reply)
    assert (entry.prompt_tokens, entry.completion_tokens) == (prompt, completion)
    assert after.turns == before.turns + 1
    assert after.total_tokens == before.total_tokens + entry.total_tokens
    return entry


# How LiteLLM's proxy and llama.cpp's server say that the prompt does not fit.
LITELLM_OVERFLOW = (
    "litellm.ContextWindowExceededError: litellm.BadRequestError: ContextWindowExceededError: "
    "OpenAIException - Input is too long for requested model."
)
LLAMA_CPP_OVERFLOW = (
    "request (9412 tokens) exceeds the available context size (8192 tokens), try increasing it"
)

# -- retried by the client, then answered ----------------------------------------------------

# (fault, requests the server sees, least and most seconds the retries may take): the client
# waits what Retry-After says, neither less (429) nor its own longer backoff, which would be
# at least 0.375 + 0.75 s for two retries (the bursts).
RETRIED = [
    pytest.param(Fault(status=429, retry_after=0.3), 2, 0.3, 60.0, id="429-retry-after"),
    pytest.param(Fault(status=503, retry_after=0.01, times=2), 3, 0.02, 1.0, id="503-burst"),
    pytest.param(Fault(status=500, retry_after=0.01, times=2), 3, 0.02, 1.0, id="500-burst"),
]


@each_library_way()
@pytest.mark.parametrize(("fault", "requests", "least", "most"), RETRIED)
def test_a_fault_retried_away_is_one_turn_and_one_entry(
    server: OpenAITestServer,
    make_bot: BotFactory,
    loop: asyncio.AbstractEventLoop,
    mode: str,
    fault: Fault,
    requests: int,
    least: float,
    most: float,
) -> None:
    bot = make_bot(server.base_url)
    bot.chat("seed", session_id=SID)
    before = snapshot(bot)
    server.clear()
    server.add_fault(fault)

    started = time.perf_counter()
    done = take_turn(bot, mode, "hello after a hiccup", loop)
    elapsed = time.perf_counter() - started

    assert done.text == "Echo: hello after a hiccup"
    assert least <= elapsed < most  # Retry-After was honoured
    logged = server.requests
    assert len(logged) == requests
    assert all(r["body"]["messages"] == logged[0]["body"]["messages"] for r in logged)
    assert_turn_added(bot, before, "hello after a hiccup", done.text)
    assert_one_exact_entry(bot, before, server, done.text)
    assert_no_hold_left(bot, SID)
    assert_ledger_adds_up(bot)


# -- failed after the client's retries: nothing changes ---------------------------------------

FAILURES = [
    pytest.param(
        Fault(status=500, retry_after=0.01, times=3), ServerError, 3, {}, id="500-after-retries"
    ),
    pytest.param(
        Fault(status=503, retry_after=0.01, times=3), ServerError, 3, {}, id="503-after-retries"
    ),
    pytest.param(
        Fault(status=429, retry_after=0.01, times=3), RateLimitError, 3, {}, id="429-after-retries"
    ),
    pytest.param(
        Fault(delay=3.0, times=2),
        EndpointTimeoutError,
        2,
        {"timeout": 0.25, "max_retries": 1},
        id="slow-past-timeout",
    ),
    pytest.param(Fault(malformed=True), ServerError, 1, {}, id="malformed-json"),
    pytest.param(
        Fault(status=400, code="context_length_exceeded", times=2),
        ContextTooLongError,
        2,  # the first try, and the retry with half the history sent (none of the seed turn)
        {},
        id="context-length-exceeded",
    ),
    pytest.param(
        Fault(status=400, code="400", message=LITELLM_OVERFLOW, times=2),
        ContextTooLongError,
        2,  # as above: LiteLLM's words are a context overflow too
        {},
        id="litellm-context-window-exceeded",
    ),
    pytest.param(
        Fault(status=408, retry_after=0.01, times=3),
        EndpointTimeoutError,  # a gateway's timeout, retried by the client like one
        3,
        {},
        id="408-after-retries",
    ),
]


@pytest.mark.slow  # 159 faults x stores x entry points
@each_library_way()
@pytest.mark.parametrize(("fault", "error", "requests", "overrides"), FAILURES)
def test_a_failed_turn_stores_nothing_records_nothing_and_holds_nothing(
    server: OpenAITestServer,
    make_bot: BotFactory,
    loop: asyncio.AbstractEventLoop,
    mode: str,
    fault: Fault,
    error: type[EndpointError],
    requests: int,
    overrides: dict[str, Any],
) -> None:
    bot = make_bot(server.base_url, **overrides)
    bot.chat("seed", session_id=SID)
    before = snapshot(bot)
    server.clear()
    server.add_fault(fault)

    pieces: list[str] = []
    with pytest.raises(error) as caught:
        take_turn(bot, mode, "this one fails", loop, pieces)

    assert caught.value.__cause__ is not None
    assert KEY not in str(caught.value)
    assert pieces == []  # nothing arrived, so there is no partial reply to keep
    assert len(server.requests) == requests
    assert snapshot(bot) == before  # history, entries and totals untouched
    assert_no_hold_left(bot, SID)
    assert_ledger_adds_up(bot)

    # Service resumes on the same session, and the failure is not counted late.
    server.clear()
    done = take_turn(bot, mode, "and this one works", loop)
    assert done.text == "Echo: and this one works"
    assert_turn_added(bot, before, "and this one works", done.text)
    assert_one_exact_entry(bot, before, server, done.text)
    assert_no_hold_left(bot, SID)


@each_library_way()
def test_connection_refused_changes_nothing_and_the_bot_recovers(
    make_bot: BotFactory, loop: asyncio.AbstractEventLoop, mode: str
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bot = make_bot(f"http://127.0.0.1:{port}/v1", max_retries=0)

    with pytest.raises(EndpointConnectionError, match="OPENAI_BASE_URL") as caught:
        take_turn(bot, mode, "anyone there?", loop)

    assert caught.value.__cause__ is not None
    assert bot.store.load(SID) == [] and bot.usage_entries() == []
    assert bot.usage().turns == 0
    assert_no_hold_left(bot, SID)

    # The endpoint comes up on that port: the same bot talks to it.
    with OpenAITestServer(port=port) as server:
        before = snapshot(bot)
        done = take_turn(bot, mode, "now?", loop)
        assert done.text == "Echo: now?"
        assert_one_exact_entry(bot, before, server, done.text)
    assert_no_hold_left(bot, SID)


# -- a stream cut midway ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", STREAMS)
def test_a_cut_stream_keeps_the_partial_reply_and_one_estimated_entry(
    server: OpenAITestServer,
    make_bot: BotFactory,
    loop: asyncio.AbstractEventLoop,
    mode: str,
) -> None:
    bot = make_bot(server.base_url)
    bot.chat("seed", session_id=SID)
    before = snapshot(bot)
    server.clear()
    server.add_fault(Fault(cut_after=3))

    pieces: list[str] = []
    with pytest.raises(EndpointConnectionError) as caught:
        take_turn(bot, mode, "one two three four five", loop, pieces)

    assert caught.value.__cause__ is not None
    assert "".join(pieces) == "Echo: one two"
    history = bot.store.load(SID)
    assert history[: len(before.messages)] == before.messages
    human, partial = history[len(before.messages) :]
    assert (human.type, human.text) == ("human", "one two three four five")
    assert (partial.type, partial.text) == ("ai", "Echo: one two")
    assert partial.response_metadata["interrupted"] is True
    # One request, billed by the endpoint but never reported: one estimated entry.
    assert len(server.requests) == 1
    entries = bot.usage_entries(session_id=SID)
    assert entries[: len(before.entries)] == before.entries
    (entry,) = entries[len(before.entries) :]
    assert (entry.estimated, entry.requests, entry.summary) == (True, 1, False)
    assert entry.prompt_tokens > 0 and entry.completion_tokens > 0
    assert entry.cost_usd is not None and entry.cost_usd > 0
    assert bot.usage(SID).turns == before.turns + 1
    assert_no_hold_left(bot, SID)
    assert_ledger_adds_up(bot)

    # The next turn is sent the partial reply, and is billed once, exactly.
    server.clear()
    before = snapshot(bot)
    done = take_turn(bot, mode, "go on", loop)
    sent = server.requests[0]["body"]["messages"]
    assert {"role": "assistant", "content": "Echo: one two"} in [
        {"role": m["role"], "content": m["content"]} for m in sent
    ]
    assert_one_exact_entry(bot, before, server, done.text)


# -- context length exceeded ------------------------------------------------------------------


def seed_long_turns(bot: Chatbot, turns: int) -> list[BaseMessage]:
    """Turns written straight to the store (no request, no entry), ~50 tokens per message."""
    messages: list[BaseMessage] = []
    for i in range(turns):
        messages += [HumanMessage(f"fact {i}: " + "x" * 190), AIMessage(f"noted {i}: " + "y" * 190)]
    bot.store.append(SID, messages)
    return messages


@each_library_way()
def test_context_length_exceeded_is_retried_with_half_the_history_sent(
    make_bot: BotFactory, loop: asyncio.AbstractEventLoop, mode: str
) -> None:
    # A real context window: the 4-turn window (~470 tokens) does not fit, 2 turns do.
    with OpenAITestServer(context_window=350) as server:
        bot = make_bot(server.base_url)
        seeded = seed_long_turns(bot, 4)
        before = snapshot(bot)

        done = take_turn(bot, mode, "what was fact 3?", loop)

        assert done.text == "Echo: what was fact 3?"
        assert any("retried with the newest 4 of the 8" in notice for notice in done.notices)
        first, retry = server.requests
        # system + 4 turns + input, then system + 2 turns + input
        assert [len(r["body"]["messages"]) for r in (first, retry)] == [10, 6]
        assert retry["body"]["messages"][1]["content"] == seeded[4].text
        assert bot.store.load(SID)[:8] == seeded and len(bot.store.load(SID)) == 10
        assert_one_exact_entry(bot, before, server, done.text)  # billed once, as the retry
        assert_no_hold_left(bot, SID)
        assert_ledger_adds_up(bot)


@each_library_way()
@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Fault(status=400, code="400", message=LITELLM_OVERFLOW), id="litellm"),
        pytest.param(Fault(status=400, message=LLAMA_CPP_OVERFLOW), id="llama.cpp"),
    ],
)
def test_other_servers_context_overflow_is_retried_with_half_the_history_sent(
    server: OpenAITestServer,
    make_bot: BotFactory,
    loop: asyncio.AbstractEventLoop,
    mode: str,
    fault: Fault,
) -> None:
    bot = make_bot(server.base_url)
    seeded = seed_long_turns(bot, 4)
    before = snapshot(bot)
    server.add_fault(fault)

    done = take_turn(bot, mode, "what was fact 3?", loop)

    assert done.text == "Echo: what was fact 3?"
    assert any("retried with the newest 4 of the 8" in notice for notice in done.notices)
    first, retry = server.requests
    assert [len(r["body"]["messages"]) for r in (first, retry)] == [10, 6]
    assert bot.store.load(SID)[:8] == seeded and len(bot.store.load(SID)) == 10
    assert_one_exact_entry(bot, before, server, done.text)
    assert_no_hold_left(bot, SID)


# -- what a gateway's status means -------------------------------------------------------------


@each_library_way()
def test_a_gateways_408_makes_the_fallback_model_answer(
    server: OpenAITestServer, make_bot: BotFactory, loop: asyncio.AbstractEventLoop, mode: str
) -> None:
    bot = make_bot(server.base_url, max_retries=0, fallback_model="gpt-4o")
    before = snapshot(bot)
    server.add_fault(Fault(status=408))

    done = take_turn(bot, mode, "still there?", loop)

    assert done.text == "Echo: still there?"
    assert [r["body"]["model"] for r in server.requests] == ["gpt-4o-mini", "gpt-4o"]
    assert_turn_added(bot, before, "still there?", done.text)
    assert_no_hold_left(bot, SID)


def test_a_refused_request_does_not_make_the_fallback_model_answer(
    server: OpenAITestServer, make_bot: BotFactory
) -> None:
    bot = make_bot(server.base_url, max_retries=0, fallback_model="gpt-4o")
    server.add_fault(Fault(status=400, message="Invalid value for 'temperature'."))
    with pytest.raises(BadRequestError):
        bot.chat("hi", session_id=SID)
    assert [r["body"]["model"] for r in server.requests] == ["gpt-4o-mini"]


def test_a_base_url_without_v1_says_to_check_the_base_url(
    server: OpenAITestServer, make_bot: BotFactory
) -> None:
    base_url = server.base_url.removesuffix("/v1")
    bot = make_bot(base_url, max_retries=0)
    with pytest.raises(BadRequestError, match="Check OPENAI_BASE_URL") as caught:
        bot.chat("hi", session_id=SID)
    assert f"{base_url}/chat/completions" in str(caught.value)
    assert "/v1" in str(caught.value)
    assert bot.store.load(SID) == []


# -- a known upstream bug ---------------------------------------------------------------------
# -- one event loop after another --------------------------------------------------------------

SEQUENTIAL_LOOPS = """
import asyncio, gc, threading
from langchain_openai import ChatOpenAI
from chatchain import Chatbot, Settings
from chatchain.testing import OpenAITestServer

async def astream(bot, text):
    return "".join([piece async for piece in bot.astream(text, session_id="s")])

with OpenAITestServer() as server:
    settings = Settings(api_key="sk-test", base_url=server.base_url, max_retries=0)
    own = ChatOpenAI(model="gpt-4o-mini", api_key="sk-test", base_url=server.base_url)
    for bot in (Chatbot(settings), Chatbot(settings, llm=own)):
        for text in ("one", "two"):
            print(asyncio.run(bot.achat(text, session_id="s")).text)
        print(*[r.text for r in asyncio.run(bot.achat_many([("a", "three"), ("b", "four")]))])
        print(asyncio.run(bot.achat("five", session_id="s")).text)
        print(asyncio.run(astream(bot, "six")))
        threads = [
            threading.Thread(target=asyncio.run, args=(bot.achat(t, session_id=t),))
            for t in ("x", "y")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(sorted(m.text for sid in ("x", "y") for m in bot.history(sid)))
    del bot, own
    gc.collect()
"""


@pytest.mark.slow  # many event loops
def test_async_turns_from_one_event_loop_after_another() -> None:
    # A script or a worker that runs each async turn with its own asyncio.run(), and two
    # threads with a loop each: with chatchain's model and with the user's own ChatOpenAI.
    # langchain-openai alone shares one async client across loops (langchain-ai/langchain#35783).
    # In a process of its own, showing every ResourceWarning: sockets left open by a loop
    # would otherwise be reported in whichever test runs next.
    done = subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", "-c", SEQUENTIAL_LOOPS],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-1500:]
    each_bot = [
        "Echo: one",
        "Echo: two",
        "Echo: three Echo: four",
        "Echo: five",
        "Echo: six",
        "['Echo: x', 'Echo: y', 'x', 'y']",
    ]
    assert done.stdout.splitlines() == each_bot * 2
    assert "ResourceWarning" not in done.stderr, done.stderr[-1500:]
