"""Soak: 20,000 turns in one process, with a bounded window, must not grow the process.

The transcript and the ledger grow with every turn, so they live in a SQLite file (on a tmpfs,
/dev/shm: outside the process's memory, and without an fsync per write, which on this
machine's disk costs ~20 ms a turn); what the process keeps must not grow. RSS is read from
/proc/self/statm (the current resident set; ``ru_maxrss`` is only a high-water mark) after a
warm-up that fills SQLite's page caches (2 MiB per connection), and at the end.

Summaries are off: each turn then does the same bounded work (window of 4 turns, one model
call), so any growth of the process has a single cause, a leak; and 20,000 turns take ~60 s
here, where with summaries on (a second, metered model call every few turns) they took
~97 s, over the time this suite may take. The window still trims every prompt.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatchain import Chatbot, Settings
from chatchain.stores._sqlite import SQLiteStore
from chatchain.testing import FakeChatModel

TURNS = 20_000
WARM_UP = 4_000
SESSIONS = 4
# A leak of 1 KB a turn would add 16 MB over the 16,000 turns measured; this bound also
# catches one of 0.4 KB a turn. The process itself is ~110 MB.
MAX_GROWTH_MB = 6.0

pytestmark = [
    pytest.mark.slow,  # 20,000 turns
    # Coverage's tracer, not chatchain, would grow the process (40 MiB over 16,000 turns).
    pytest.mark.no_cover,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm"),
]


def rss_mb() -> float:
    """The current resident set size of this process, in MiB."""
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture
def tmpfs_dir() -> Iterator[Path]:
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        pytest.skip("needs a writable tmpfs at /dev/shm (20,000 fsynced turns take ~7 min)")
    directory = Path(tempfile.mkdtemp(prefix="chatchain-soak-", dir=shm))
    yield directory
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()


# The turns take ~60 s on a quiet 2-core machine and several times that on a loaded one; the
# bound is for a hang, not a speed check (speed lives in benchmarks/).
@pytest.mark.timeout(900)
def test_twenty_thousand_turns_do_not_grow_the_process(
    tmpfs_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(
        api_key="sk-test",
        model="gpt-4o-mini",
        window_turns=4,
        window_tokens=3000,
        summarize=False,
    )
    fake = FakeChatModel()
    store = SQLiteStore(tmpfs_dir / "soak.db")
    loaded: dict[int, int] = {}  # turn -> messages the store read for that turn's window
    load = store.load

    def counting_load(session_id: str, start: int = 0, stop: int | None = None) -> list[Any]:
        messages = load(session_id, start, stop)
        loaded[turn] = loaded.get(turn, 0) + len(messages)
        return messages

    store.load = counting_load  # type: ignore[method-assign]
    samples: list[tuple[int, float, float]] = []  # (turns, RSS MiB, seconds)
    with Chatbot(settings, llm=fake, store=store) as bot:
        started = time.perf_counter()
        for turn in range(1, TURNS + 1):
            text = f"turn {turn}: what do you know about {turn}?"
            reply = bot.chat(text, session_id=f"s{turn % SESSIONS}")
            assert reply.text == f"Echo: {text}"
            # The prompt stays bounded: system, at most 4 turns of history, the input.
            (call,) = fake.calls
            assert len(call) <= 1 + 2 * 4 + 1
            # The fake keeps every call's messages for inspection; the library must not.
            fake._calls.clear()
            if turn == WARM_UP or turn % 2_000 == 0:
                gc.collect()
                samples.append((turn, rss_mb(), time.perf_counter() - started))

        # The stored transcript and ledger did grow: 40,000 messages, 20,000 entries.
        assert sum(store.count(f"s{i}") for i in range(SESSIONS)) == 2 * TURNS
        assert bot.usage().turns == TURNS
        db_mb = sum(p.stat().st_size for p in tmpfs_dir.iterdir()) / 2**20

    warm = next(rss for turns, rss, _ in samples if turns == WARM_UP)
    end = samples[-1][1]
    with capsys.disabled():
        print(
            f"\nsoak: {TURNS} turns in {samples[-1][2]:.0f} s; store {db_mb:.1f} MiB on tmpfs; "
            "RSS MiB by turns: " + ", ".join(f"{t}: {r:.1f}" for t, r, _ in samples)
        )
    assert end - warm < MAX_GROWTH_MB, f"RSS grew {end - warm:.1f} MiB after the warm-up"
    assert db_mb > 10  # the transcript grew on disk by far more than the process did
    # Loading a turn's window reads as much at 10,000 messages a session as at 2,000: counted
    # in messages read, not seconds, so a loaded machine cannot make it flaky.
    early = max(loaded[t] for t in range(WARM_UP, WARM_UP + 2_000))
    late = max(loaded[t] for t in range(TURNS - 2_000, TURNS + 1))
    assert late == early <= 2 * 4, f"a late turn read {late} messages, an early one {early}"
