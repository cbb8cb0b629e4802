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

from chatchain.stores import open_store

pytestmark = pytest.mark.slow  # kills processes mid-turn, many times

KILLS = 3

_CHILD = """
import sys
from chatchain import Chatbot, Settings
from chatchain.testing import FakeChatModel

url, session_id = sys.argv[1], sys.argv[2]
settings = Settings(api_key="sk-test", store=url, summarize=False, window_turns=2)
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


if __name__ == "__main__":
    store_url, count = sys.argv[1], int(sys.argv[2])
    started = time.monotonic()
    broken_kills, saved_turns = kill_many(store_url, count)
    print(
        f"{store_url.split(':')[0]}: {broken_kills} of {count} kills left a billed turn without "
        f"its messages ({saved_turns} turns saved, {time.monotonic() - started:.0f} s)"
    )
