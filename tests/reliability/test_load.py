"""Load: a thousand sessions at once in one process, and several processes on shared sessions.

In one process, `Chatbot.achat_many` runs 1,000 sessions concurrently, round after round, on
the memory store and on SQLite (on a tmpfs when there is one: this is about concurrency, not
about the disk's fsyncs, which cost ~17 s a round here). Across processes (spawned, as on
separate machines), each runs its rounds through ``achat_many`` too, on the *same* sessions of
one Redis or PostgreSQL store. Every reply says how many messages it was sent (`_reply` of
tests/stores/test_multiprocess.py), so a stored transcript proves that each turn saw exactly
the turns before it: nothing lost, duplicated or interleaved. The ledger must count exactly
the stored turns. (test_multiprocess.py runs sync turns and checks no ledger; this extends
it.)
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatchain import Chatbot, Settings
from chatchain.stores import HistoryStore, open_store
from chatchain.testing import FakeChatModel
from chatchain.usage import total_of
from tests.stores.test_multiprocess import _reply

pytestmark = pytest.mark.slow  # 1,000 sessions at once, and processes

SESSIONS = 1000
ROUNDS = 2
DELAY = 0.1  # each reply "thinks" this long: one after another, a round would take 100 s


def load_settings(store: str) -> Settings:
    # The whole history is sent, so that each reply can say how much of it there was.
    return Settings(
        api_key="sk-test",
        model="gpt-4o-mini",
        store_url=store,
        window_turns=None,
        window_tokens=None,
        summarize=False,
        lock_timeout=120.0,
    )


def assert_transcripts(
    store: HistoryStore, questions: dict[str, list[str]], *, in_order: bool = True
) -> None:
    """Each session holds exactly its questions, each answered having seen all before it."""
    for session_id, asked in questions.items():
        history = store.load(session_id)
        assert len(history) == 2 * len(asked), session_id
        for position in range(0, len(history), 2):
            human, ai = history[position], history[position + 1]
            assert (human.type, ai.type) == ("human", "ai")
            assert ai.text == f"Echo: {human.text} | saw {position}"
        stored = [m.text for m in history[0::2]]
        assert stored == asked if in_order else sorted(stored) == sorted(asked)


def assert_ledger_counts(store: HistoryStore, turns: int, per_session: dict[str, int]) -> None:
    entries = store.usage_entries()
    assert len(entries) == turns
    total = store.usage_total("all", "")
    assert total.turns == turns and total.summaries == 0
    assert total.total_tokens == total_of(entries).total_tokens
    assert total.successful_requests == turns
    for session_id, count in per_session.items():
        assert store.usage_total("session", session_id).turns == count, session_id


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder on a tmpfs when there is one: the disk's fsyncs are not what is measured."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(prefix="chatchain-load-", dir=shm))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_thousand_sessions_at_once_keep_their_turns_and_their_count(
    backend: str, fast_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "memory://" if backend == "memory" else f"sqlite:///{fast_dir / 'load.db'}"
    sessions = [f"user-{i:04d}" for i in range(SESSIONS)]
    asked: dict[str, list[str]] = {sid: [] for sid in sessions}
    timings: list[float] = []
    with Chatbot(load_settings(url), llm=FakeChatModel(respond=_reply, delay=DELAY)) as bot:

        async def rounds() -> None:
            for round_ in range(ROUNDS):
                turns = [(sid, f"round {round_} from {sid}") for sid in sessions]
                started = time.perf_counter()
                replies = await bot.achat_many(turns)
                timings.append(time.perf_counter() - started)
                for (sid, text), reply in zip(turns, replies, strict=True):
                    assert (reply.session_id, reply.text) == (
                        sid,
                        f"Echo: {text} | saw {2 * round_}",
                    )
                    asked[sid].append(text)
                # The ledger counts every turn of the round, once.
                assert bot.usage().turns == SESSIONS * (round_ + 1)

        asyncio.run(rounds())
        assert_transcripts(bot.store, asked)
        assert_ledger_counts(bot.store, SESSIONS * ROUNDS, {sid: ROUNDS for sid in sessions})
    with capsys.disabled():
        rounds_text = ", ".join(f"{t:.1f} s" for t in timings)
        print(f"\nload, {backend}: {SESSIONS} sessions at once; rounds took {rounds_text}")
    # Concurrent for real: one after another, the model alone would take DELAY s per turn.
    assert max(timings) < SESSIONS * DELAY / 2


# -- several processes on the same sessions ---------------------------------------------------

WORKERS = 3
SHARED = 10
MP_ROUNDS = 3


def _worker(url: str, worker: int) -> None:
    settings = load_settings(url)
    with Chatbot(settings, llm=FakeChatModel(respond=_reply, delay=0.002)) as bot:

        async def rounds() -> None:
            for round_ in range(MP_ROUNDS):
                # All the shared sessions at once, while the other processes do the same.
                await bot.achat_many(
                    [(f"shared-{i}", f"w{worker}-r{round_}-s{i}") for i in range(SHARED)]
                )

        asyncio.run(rounds())


@pytest.mark.parametrize("backend", ["redis", "postgres"])
def test_processes_on_the_same_sessions_lose_nothing_and_count_every_turn(
    backend: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    request.getfixturevalue(f"{backend}_store")  # an empty store, ledger included
    url = request.getfixturevalue(f"{backend}_url")
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker, args=(url, w)) for w in range(WORKERS)]
    started = time.perf_counter()
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=100)
        assert process.exitcode == 0
    elapsed = time.perf_counter() - started
    with capsys.disabled():
        print(
            f"\nload, {backend}: {WORKERS} processes x {MP_ROUNDS * SHARED} turns on {SHARED} "
            f"shared sessions in {elapsed:.1f} s (spawning included)"
        )

    store = open_store(url)
    try:
        expected = {
            f"shared-{i}": [f"w{w}-r{r}-s{i}" for w in range(WORKERS) for r in range(MP_ROUNDS)]
            for i in range(SHARED)
        }
        # Processes interleave on a session, so its questions come in any order across them...
        assert_transcripts(store, expected, in_order=False)
        for session_id, asked in expected.items():
            questions = [m.text for m in store.load(session_id)[0::2]]
            for w in range(WORKERS):  # ...but each process's own turns in the order it sent them
                mine = [q for q in questions if q.startswith(f"w{w}-")]
                assert mine == [q for q in asked if q.startswith(f"w{w}-")]
        turns = WORKERS * MP_ROUNDS * SHARED
        stored = sum(store.count(sid) for sid in store.sessions()) // 2
        assert stored == turns
        assert_ledger_counts(store, turns, {sid: WORKERS * MP_ROUNDS for sid in expected})
    finally:
        store.close()
