"""A process killed (``kill -9``) at a random moment of its turns leaves no billed turn without
its messages: the usage and the messages of a turn are one write on SQLite, Redis and
PostgreSQL.

Each kill hits a child process running turns in a loop on a session of its own (a killed
holder's lease would otherwise keep the session for its length). After each kill, the
session's turns in the ledger must equal its stored question-and-answer pairs.

The figure in the report comes from more kills::

    python -m tests.reliability.test_kills postgresql://... 30
"""

from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest

from chatchain import Chatbot, Settings
from chatchain._pending import CRASHED
from chatchain.stores import open_store
from chatchain.testing import OpenAITestServer

pytestmark = pytest.mark.slow  # kills processes mid-turn, many times

KILLS = 3

_CHILD = """
import sys
from chatchain import Chatbot, Settings
from chatchain.testing import FakeChatModel

url, session_id = sys.argv[1], sys.argv[2]
settings = Settings(api_key="sk-test", store_url=url, summarize=False, window_turns=2)
bot = Chatbot(settings, llm=FakeChatModel())
bot.chat("warm up", session_id=session_id + "-warm")
print("ready", flush=True)
while True:
    bot.chat("hello", session_id=session_id)
"""


def orphans_after_kill(url: str, session_id: str, rng: random.Random) -> tuple[int, int]:
    """Kill a child mid-loop; return (billed turns without their messages, turns saved)."""
    with subprocess.Popen(
        [sys.executable, "-c", _CHILD, url, session_id], stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 0.5))  # where in a turn the kill lands is the point
        finally:
            child.kill()
            child.wait(30)
    store = open_store(url)
    try:
        billed = [e for e in store.usage_entries(session_id=session_id) if not e.summary]
        pairs = store.count(session_id) // 2
    finally:
        store.close()
    return len(billed) - pairs, pairs


def kill_many(url: str, kills: int, seed: int = 11) -> tuple[int, int]:
    """(kills that left a billed turn without its messages, turns saved) over ``kills``."""
    rng = random.Random(seed)
    stem = f"killed-{time.time_ns()}"
    broken = saved = 0
    for i in range(kills):
        orphans, pairs = orphans_after_kill(url, f"{stem}-{i}", rng)
        assert orphans >= 0, "messages without their usage"
        broken += orphans > 0
        saved += pairs
    return broken, saved


@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgres"])
def test_a_kill_at_any_moment_leaves_no_billed_turn_without_its_messages(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(f"{backend}_url")
    broken, saved = kill_many(url, KILLS)
    assert saved > 0  # the kills landed among turns
    assert broken == 0


# A streaming turn against the test server, told when it is mid-reply (with a checkpoint of
# the reply so far behind it: they are written at most every second).
_STREAMER = """
import sys, time
from chatchain import Chatbot, Settings

url, base_url, session_id = sys.argv[1:4]
settings = Settings(api_key="sk-test", base_url=base_url, store_url=url, summarize=False,
                    max_retries=0, budget_session_tokens=1_000_000)
bot = Chatbot(settings)
started = None
for piece in bot.stream("Tell me a long story", session_id=session_id):
    started = started or time.monotonic()
    if time.monotonic() - started > 1.5:
        print("mid-reply", flush=True)
        time.sleep(60)  # killed here
"""

STORY = " ".join(f"word{i}" for i in range(400))


def kill_mid_stream(url: str, server: OpenAITestServer, session_id: str) -> float:
    """Kill (SIGKILL) a process streaming a turn mid-reply; return when, by the monotonic clock."""
    server.queue_replies(STORY)
    with subprocess.Popen(
        [sys.executable, "-c", _STREAMER, url, server.base_url, session_id],
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "mid-reply"
        finally:
            child.kill()
            child.wait(30)
    return time.monotonic()


@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgres"])
def test_a_stream_killed_mid_reply_keeps_the_message_and_the_bill(
    backend: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    url = request.getfixturevalue(f"{backend}_url")
    session_id = f"streamed-{time.time_ns()}"
    with OpenAITestServer(chunk_interval=0.02) as server:
        killed_at = kill_mid_stream(url, server, session_id)
        calls = len(server.requests)
        settings = Settings(
            api_key="sk-test",
            base_url=server.base_url,
            store_url=url,
            summarize=False,
            max_retries=0,
        )
        bot = Chatbot(settings)
        try:
            reply = bot.chat("Are you there?", session_id=session_id)  # waits for the lock
            usable_after = time.monotonic() - killed_at
            messages = bot.history(session_id)
            entries = [e for e in bot.usage_entries(session_id=session_id) if not e.summary]
        finally:
            bot.close()
        calls = len(server.requests)
    assert reply.text == "Echo: Are you there?"
    assert [m.type for m in messages] == ["human", "ai", "human", "ai"]
    assert messages[0].content == "Tell me a long story"
    cut = messages[1]
    assert cut.response_metadata["interrupted_reason"] == CRASHED
    assert str(cut.content).startswith("word0 word1") and len(str(cut.content)) < len(STORY)
    assert len(entries) == calls == 2  # every call the endpoint served is in the ledger
    assert entries[0].estimated and entries[0].completion_tokens > 0
    assert usable_after < 30  # the lease (10 s) at most, with room for a loaded machine
    with capsys.disabled():
        print(f"\n{backend}: the killed session's next turn succeeded {usable_after:.1f} s later")


if __name__ == "__main__":
    store_url, count = sys.argv[1], int(sys.argv[2])
    started = time.monotonic()
    broken_kills, saved_turns = kill_many(store_url, count)
    print(
        f"{store_url.split(':')[0]}: {broken_kills} of {count} kills left a billed turn without "
        f"its messages ({saved_turns} turns saved, {time.monotonic() - started:.0f} s)"
    )
