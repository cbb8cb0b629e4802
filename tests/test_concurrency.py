"""One writer per session: concurrent turns on a session are serialised; sessions are not."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from chatchain import Chatbot, SessionBusyError, Settings
from chatchain.testing import FakeChatModel


def assert_whole_turns(bot: Chatbot, session_id: str, texts: list[str]) -> None:
    """Every turn present once, as a (question, its own echo) pair, none interleaved."""
    history = bot.history(session_id)
    pairs = [(history[i], history[i + 1]) for i in range(0, len(history), 2)]
    assert len(history) == 2 * len(texts)
    for human, ai in pairs:
        assert (human.type, ai.type) == ("human", "ai")
        assert ai.text == f"Echo: {human.text}"
    assert sorted(h.text for h, _ in pairs) == sorted(texts)


def assert_each_turn_saw_the_previous_ones(fake: FakeChatModel) -> None:
    # The model got the system message, then 2 messages per earlier turn, then the new one.
    sizes = sorted(len(call) for call in fake.calls)
    assert sizes == [1 + 2 * i + 1 for i in range(len(sizes))]


def test_threads_on_one_session_are_serialised(settings: Settings) -> None:
    fake = FakeChatModel(delay=0.002)
    bot = Chatbot(settings, llm=fake, system="Be brief.")
    texts = [f"thread message {i}" for i in range(16)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda t: bot.chat(t, session_id="shared"), texts))
    assert_whole_turns(bot, "shared", texts)
    assert_each_turn_saw_the_previous_ones(fake)


def test_threads_streaming_on_one_session_are_serialised(settings: Settings) -> None:
    fake = FakeChatModel(delay=0.001)
    bot = Chatbot(settings, llm=fake, system="Be brief.")
    texts = [f"streamed message {i}" for i in range(10)]
    with ThreadPoolExecutor(max_workers=5) as pool:
        list(pool.map(lambda t: "".join(bot.stream(t, session_id="shared")), texts))
    assert_whole_turns(bot, "shared", texts)
    assert_each_turn_saw_the_previous_ones(fake)


async def test_tasks_on_one_session_are_serialised(settings: Settings) -> None:
    fake = FakeChatModel(delay=0.002)
    bot = Chatbot(settings, llm=fake, system="Be brief.")
    texts = [f"task message {i}" for i in range(16)]
    replies = await bot.achat_many([("shared", t) for t in texts])
    assert [r.text for r in replies] == [f"Echo: {t}" for t in texts]
    assert_whole_turns(bot, "shared", texts)
    assert_each_turn_saw_the_previous_ones(fake)


async def test_threads_and_tasks_share_the_session_lock(settings: Settings) -> None:
    fake = FakeChatModel(delay=0.002)
    bot = Chatbot(settings, llm=fake, system="Be brief.")
    thread_texts = [f"from a thread {i}" for i in range(6)]
    task_texts = [f"from a task {i}" for i in range(6)]
    threads = [
        threading.Thread(target=bot.chat, args=(t,), kwargs={"session_id": "mix"})
        for t in thread_texts
    ]
    for thread in threads:
        thread.start()
    await asyncio.gather(*(bot.achat(t, session_id="mix") for t in task_texts))
    for thread in threads:
        thread.join()
    assert_whole_turns(bot, "mix", thread_texts + task_texts)
    assert_each_turn_saw_the_previous_ones(fake)


async def test_different_sessions_run_in_parallel(settings: Settings) -> None:
    fake = FakeChatModel(delay=0.2)
    bot = Chatbot(settings, llm=fake, system="Be brief.")
    started = time.perf_counter()
    await bot.achat_many([(f"s{i}", "hello") for i in range(10)])
    elapsed = time.perf_counter() - started
    # Ten 0.2 s turns one after another would take 2 s; in parallel they take about 0.2 s.
    assert elapsed < 1.0
    assert sorted(bot.sessions()) == sorted(f"s{i}" for i in range(10))


def test_a_stream_left_open_in_this_thread_is_reported_not_deadlocked(settings: Settings) -> None:
    bot = Chatbot(settings, llm=FakeChatModel(), system="Be brief.")
    stream = bot.stream("one two three", session_id="s")
    next(stream)
    with pytest.raises(SessionBusyError, match="close"):
        bot.chat("again", session_id="s")
    stream.close()
    assert bot.chat("again", session_id="s").text == "Echo: again"


def test_a_turn_waiting_past_the_lock_timeout_gets_a_clear_error() -> None:
    settings = Settings(api_key="sk-test", lock_timeout=0.2)
    bot = Chatbot(settings, llm=FakeChatModel(delay=0.5), system="Be brief.")
    first = threading.Thread(target=bot.chat, args=("slow",), kwargs={"session_id": "s"})
    first.start()
    time.sleep(0.05)
    with pytest.raises(SessionBusyError, match="CHATCHAIN_LOCK_TIMEOUT"):
        bot.chat("impatient", session_id="s")
    first.join()
    assert [m.text for m in bot.history("s")] == ["slow", "Echo: slow"]


def test_delete_waits_for_the_running_turn(settings: Settings) -> None:
    bot = Chatbot(settings, llm=FakeChatModel(delay=0.2), system="Be brief.")
    worker = threading.Thread(target=bot.chat, args=("in flight",), kwargs={"session_id": "s"})
    worker.start()
    time.sleep(0.05)
    bot.delete("s")  # must not slip between the turn's load and save
    worker.join()
    assert bot.history("s") == []
    assert bot.usage("s").turns == 1  # the turn finished first, and its spending stays
