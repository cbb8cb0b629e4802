"""Store faults in the middle of a turn, seen through the `Chatbot`: history, ledger, resumption.

tests/stores covers each backend's own reaction to a dead server, a locked, damaged or full
SQLite file. Here the fault hits a *turn*, and the checks are what the user is left with:

- the error is a `StoreError` naming the store and saying what to do;
- the session holds the whole turn or none of it;
- the ledger holds no half-recorded entry, and no entry without its messages: `Turn.save`
  writes the messages, the usage and the end of the budget hold in one transaction (one Lua
  script on Redis), so a failure at any point of it leaves the whole turn or none of it;
- a turn the endpoint answered (and billed) but the store could not save is not lost: it
  waits in the journal (`TurnJournaledError` says so and where) and is saved exactly once
  when the store is back, before the session's next turn; the ledger then counts every
  call that reached the endpoint, once;
- service resumes with a new turn once the store is back.

The model is a `FakeChatModel` held "thinking" by a `Gate`, so the fault lands at a known
point: after the prompt was sent and before the turn is saved.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from langchain_core.messages import BaseMessage
from pytest_redis.executor import RedisExecutor

from chatchain import Chatbot, Reply, Settings, StoreError, TurnJournaledError
from chatchain._journal import Journal
from chatchain.stores import HistoryStore
from chatchain.stores._postgres import PostgresStore
from chatchain.stores._redis import RedisStore
from chatchain.stores._sqlite import SQLiteStore
from chatchain.stores._sqlite import _connection as sqlite_connection
from chatchain.testing import FakeChatModel, PostgresCluster, redis_server, redis_url_of
from tests.entry_points import SYNC_ASYNC, each_library_way
from tests.reliability.conftest import Gate, assert_ledger_adds_up, assert_no_hold_left
from tests.stores.fixtures_postgres import wipe as wipe_postgres

SID = "s"


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_key": "sk-test",
        "model": "gpt-4o-mini",
        "window_turns": 4,
        "window_tokens": None,
        "summarize": False,
    }
    values.update(overrides)
    return Settings(**values)


async def astreamed(bot: Chatbot, text: str) -> str:
    return "".join([piece async for piece in bot.astream(text, session_id=SID)])


def turn_in_thread(bot: Chatbot, mode: str, text: str) -> Callable[[], Reply | BaseException]:
    """Start a turn in a thread; the returned function waits for its reply or its error.

    ``mode``: ``sync`` or ``chat``, ``async`` or ``achat``, ``stream``, ``astream`` (a
    stream's outcome is its text).
    """
    outcome: list[Any] = []

    def run() -> None:
        try:
            if mode in ("sync", "chat"):
                outcome.append(bot.chat(text, session_id=SID))
            elif mode in ("async", "achat"):
                outcome.append(asyncio.run(bot.achat(text, session_id=SID)))
            elif mode == "stream":
                outcome.append("".join(bot.stream(text, session_id=SID)))
            else:
                outcome.append(asyncio.run(astreamed(bot, text)))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()

    def result() -> Reply | BaseException:
        thread.join(60)
        assert not thread.is_alive(), "the turn never ended"
        return outcome[0]

    return result


def wait_until_up(store: HistoryStore, timeout: float = 30.0) -> None:
    """Poll until the store can serve a turn again (its clients reconnect on their own).

    A turn holds the session's lock while it reads and writes: PostgreSQL's pool must give it
    two connections at once. One answered query is not enough: the pool adds its second
    connection with the back-off its failed attempts during the outage left, which can
    outlast a turn's 2 s wait for a connection.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with store.lock(SID):
                store.count(SID)
            return
        except StoreError:
            assert time.monotonic() < deadline, "the store never came back"
            time.sleep(0.05)


def pairs(messages: Sequence[BaseMessage]) -> list[tuple[str, str]]:
    return [(m.type, m.text) for m in messages]


def assert_resumes(
    bot: Chatbot,
    before: list[BaseMessage],
    entries_before: int,
    journaled: Sequence[tuple[str, str]] = (),
) -> None:
    """A new turn on the session works and adds exactly one turn and one entry, after the
    ``journaled`` turn (its messages and its entry), saved first."""
    reply = bot.chat("are you back?", session_id=SID)
    history = bot.store.load(SID)
    new = [("human", "are you back?"), ("ai", reply.text)]
    assert pairs(history) == [*pairs(before), *journaled, *new]
    assert len(bot.usage_entries(session_id=SID)) == entries_before + 1 + bool(journaled)
    assert_ledger_adds_up(bot)


def journal_of(bot: Chatbot) -> Journal:
    journal = bot.chain._spec.journal
    assert journal is not None
    return journal


def assert_journaled(error: object, text: str, bot: Chatbot) -> list[tuple[str, str]]:
    """``error`` tells that the turn on ``text`` waits in the journal, which holds it; the
    turn's messages, as the replay will save them."""
    assert isinstance(error, TurnJournaledError), error
    journal = journal_of(bot)
    assert error.journal == str(journal.path) and str(journal.path) in str(error)
    assert "delivered and billed" in str(error) and "do not send the message again" in str(error)
    [waiting] = journal.pending()
    assert waiting.entry.id == error.entry_id and waiting.session_id == SID
    assert pairs(waiting.messages) == [("human", text), ("ai", error.reply)]
    return pairs(waiting.messages)


# -- a server going down mid-turn --------------------------------------------------------------


class Outage:
    """A server a test may stop and start again, and the store that talks to it."""

    def __init__(
        self,
        name: str,  # for the reader of a failure
        make_store: Callable[[], HistoryStore],
        stop: Callable[[], None],
        start: Callable[[], None],
        where: str,
    ) -> None:
        self.name = name
        self.make_store = make_store
        self.stop = stop
        self.start = start
        self.where = where  # what the StoreError must name


@pytest.fixture(scope="module")
def redis_outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisExecutor]:
    # Append-only: every acknowledged write survives the stop, as in production.
    with redis_server(tmp_path_factory.mktemp("redis-outage"), appendonly=True) as server:
        yield server


@pytest.fixture(scope="module")
def postgres_outage() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()  # of this module's own: stopping it disturbs no other test
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(params=["redis", "postgres"])
def outage(request: pytest.FixtureRequest) -> Iterator[Outage]:
    if request.param == "redis":
        server: RedisExecutor = request.getfixturevalue("redis_outage")
        url = redis_url_of(server)
        with redis.Redis.from_url(url) as client:
            client.flushdb()
        yield Outage(
            "redis",
            lambda: RedisStore(url, lock_timeout=10.0, lease=1.0),
            server.stop,
            server.start,
            f"{server.host}:{server.port}",
        )
        if not server.running():  # a failed test must not leave the next one without a server
            server.start()
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres_outage")
    PostgresStore(cluster.url).close()  # the tables exist...
    wipe_postgres(cluster.url)  # ...and are empty
    url = cluster.url + "?connect_timeout=2"
    yield Outage(
        "postgres",
        lambda: PostgresStore(url, lock_timeout=10.0),
        lambda: cluster.stop("immediate"),  # like a crash
        cluster.start,
        f"127.0.0.1:{cluster.port}",
    )
    if not (cluster.data / "postmaster.pid").exists():
        cluster.start()


@pytest.mark.parametrize("mode", SYNC_ASYNC)
def test_a_server_down_while_the_model_thinks_journals_the_turn_and_saves_it_once_back(
    outage: Outage, mode: str
) -> None:
    gate = Gate()
    store = outage.make_store()
    fake = FakeChatModel(respond=gate)
    bot = Chatbot(settings(), llm=fake, store=store)
    try:
        bot.chat("before the outage", session_id=SID)
        before, entries = bot.store.load(SID), bot.usage_entries()

        gate.arm()
        result = turn_in_thread(bot, mode, "during the outage")
        assert gate.thinking.wait(10)
        outage.stop()
        gate.open()
        error = result()

        # The endpoint answered: the turn waits in the journal, and the error says so.
        journaled = assert_journaled(error, "during the outage", bot)
        assert outage.where in str(error) and "check" in str(error).lower()
        outage.start()
        wait_until_up(store)
        assert bot.store.load(SID) == before  # not yet: the next turn saves it first
        assert bot.usage_entries() == entries
        assert_resumes(bot, before, len(entries), journaled)
        assert journal_of(bot).pending() == []
        assert len(bot.usage_entries()) == len(fake.calls)  # every billed call, once
    finally:
        bot.close()


def stop_at_the_save(outage: Outage, store: HistoryStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server goes down as the turn is being saved (usage and messages, one write)."""
    commit, acommit = store.commit_turn, store.acommit_turn

    def failing_commit(*args: Any, **kwargs: Any) -> None:
        outage.stop()
        commit(*args, **kwargs)

    async def failing_acommit(*args: Any, **kwargs: Any) -> None:
        outage.stop()
        await acommit(*args, **kwargs)

    monkeypatch.setattr(store, "commit_turn", failing_commit)
    monkeypatch.setattr(store, "acommit_turn", failing_acommit)


@each_library_way()
def test_a_server_down_at_the_save_keeps_the_billed_turn_in_the_journal_then_saves_it_once(
    outage: Outage, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = outage.make_store()
    fake = FakeChatModel()
    bot = Chatbot(settings(budget_session_tokens=10**9), llm=fake, store=store)
    try:
        bot.chat("before the outage", session_id=SID)
        before, entries = bot.store.load(SID), bot.usage_entries()

        stop_at_the_save(outage, store, monkeypatch)
        error = turn_in_thread(bot, mode, "during the outage")()
        monkeypatch.undo()

        journaled = assert_journaled(error, "during the outage", bot)
        assert outage.where in str(error)
        outage.start()
        wait_until_up(store)
        # One write, so neither half yet: no messages, and no entry without its messages.
        assert bot.store.load(SID) == before
        assert bot.usage_entries() == entries
        assert_ledger_adds_up(bot)
        assert_resumes(bot, before, len(entries), journaled)
        assert journal_of(bot).pending() == []
        assert len(bot.usage_entries()) == len(fake.calls)
        assert_no_hold_left(bot, SID)  # the journaled turn's hold ended with its replay
    finally:
        bot.close()


class Breakage:
    """A store whose next write of messages fails inside the turn's write, and its repair."""

    def __init__(
        self, store: HistoryStore, break_: Callable[[], None], mend: Callable[[], None]
    ) -> None:
        self.store = store
        self.break_ = break_
        self.mend = mend


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def breakage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Breakage]:
    if request.param == "sqlite":
        store: HistoryStore = SQLiteStore(tmp_path / "chat.db")
        path = tmp_path / "chat.db"

        def sql(statement: str) -> None:
            conn = sqlite3.connect(path, isolation_level=None)
            try:
                conn.execute(statement)
            finally:
                conn.close()

        # Fires inside the insert of the messages, after the usage was written.
        yield Breakage(
            store,
            lambda: sql(
                "CREATE TRIGGER fail BEFORE INSERT ON messages "
                "BEGIN INSERT INTO no_such_table VALUES (1); END"
            ),
            lambda: sql("DROP TRIGGER fail"),
        )
    elif request.param == "redis":
        server: RedisExecutor = request.getfixturevalue("redis_outage")
        url = redis_url_of(server)
        client = redis.Redis.from_url(url)
        client.flushdb()
        redis_store = RedisStore(url, lock_timeout=10.0)
        # Another program wrote a string where the session's message list goes.
        msgs = redis_store._key("msgs", SID)
        yield Breakage(
            redis_store, lambda: client.set(msgs, "not a list"), lambda: client.delete(msgs)
        )
        client.close()
    else:
        cluster: PostgresCluster = request.getfixturevalue("postgres_outage")
        PostgresStore(cluster.url).close()
        wipe_postgres(cluster.url)

        def pg(statement: str) -> None:
            with psycopg.connect(cluster.url, autocommit=True) as conn:
                conn.execute(statement)  # type: ignore[arg-type]

        pg(
            "CREATE OR REPLACE FUNCTION chatchain_test_fail() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN RAISE EXCEPTION 'could not extend file (injected)'; END $$"
        )
        yield Breakage(
            PostgresStore(cluster.url, lock_timeout=10.0),
            lambda: pg(
                "CREATE TRIGGER fail BEFORE INSERT ON chatchain_messages"
                " FOR EACH STATEMENT EXECUTE FUNCTION chatchain_test_fail()"
            ),
            lambda: pg("DROP TRIGGER fail ON chatchain_messages"),
        )


@pytest.mark.parametrize("mode", SYNC_ASYNC)
def test_a_failure_writing_the_messages_undoes_the_usage_too(breakage: Breakage, mode: str) -> None:
    # The usage and the messages are one write: when the messages cannot be written, the
    # entry is not left behind without them (it was, with usage first and messages second).
    # Both wait in the journal instead, and are saved together once the store takes them.
    armed = [True]

    def respond(messages: list[BaseMessage]) -> str:
        if armed.pop() if armed else False:
            breakage.break_()  # while the model thinks: the history was read, the save is next
        return "answer"

    bot = Chatbot(
        settings(budget_session_tokens=10**9),
        llm=FakeChatModel(respond=respond),
        store=breakage.store,
    )
    try:
        error = turn_in_thread(bot, mode, "lost")()
        breakage.mend()

        journaled = assert_journaled(error, "lost", bot)
        assert bot.store.load(SID) == []
        assert bot.usage_entries() == []
        assert_resumes(bot, [], 0, journaled)  # saved once the store takes it again
        assert_no_hold_left(bot, SID)
    finally:
        bot.close()


# -- SQLite: locked, damaged, full ------------------------------------------------------------


@pytest.mark.parametrize("mode", SYNC_ASYNC)
def test_a_sqlite_file_locked_mid_turn_journals_the_turn_and_the_session_frees_itself(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_connection, "_BUSY_TIMEOUT_S", 0.2)  # before any connection opens
    path = tmp_path / "chat.db"
    gate = Gate()
    bot = Chatbot(settings(), llm=FakeChatModel(respond=gate), store=SQLiteStore(path, lease=1.0))
    try:
        bot.chat("before", session_id=SID)
        before, entries = bot.store.load(SID), bot.usage_entries()

        gate.arm()
        result = turn_in_thread(bot, mode, "while another process writes")
        assert gate.thinking.wait(10)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")  # a stuck writer in another process
        gate.open()
        error = result()
        other.execute("ROLLBACK")
        other.close()

        journaled = assert_journaled(error, "while another process writes", bot)
        assert str(path) in str(error) and "check for a stuck process" in str(error)
        assert journal_of(bot).path == path.with_name("chat.db.unsaved-turns")  # beside it
        assert bot.store.load(SID) == before
        assert bot.usage_entries() == entries
        # The failed turn could not give its lease back either: it expires within a lease.
        started = time.monotonic()
        assert_resumes(bot, before, len(entries), journaled)
        assert time.monotonic() - started < 5
    finally:
        bot.close()


def damage_interior(path: Path) -> None:
    """Overwrite the cell pointers of every page after the schema's: a deterministic wreck."""
    data = bytearray(path.read_bytes())
    for offset in range(2 * 4096, len(data), 4096):
        data[offset + 8 : offset + 200] = bytes(range(192))
    path.write_bytes(bytes(data))


def truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # an interrupted copy


@pytest.mark.parametrize("damage", [truncate_half, damage_interior], ids=["truncated", "interior"])
def test_a_damaged_sqlite_file_is_named_with_what_to_do_and_doing_it_works(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    path = tmp_path / "chat.db"
    url = f"sqlite:///{path}"
    with Chatbot(settings(store_url=url, window_turns=None), llm=FakeChatModel()) as bot:
        for i in range(40):
            bot.chat(f"message {i} " + "x" * 400, session_id=f"s{i % 4}")
    damage(path)

    fake = FakeChatModel()
    with pytest.raises(StoreError) as caught, Chatbot(settings(store_url=url), llm=fake) as bot:
        bot.chat("hello?", session_id=SID)
    message = str(caught.value)
    assert str(path) in message
    assert "damaged" in message and "move the file aside" in message
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)
    assert fake.calls == []  # nothing was sent (nor billed) to a store that cannot keep it

    path.rename(path.with_suffix(".damaged"))  # what the message says to do
    with Chatbot(settings(store_url=url), llm=fake) as bot:
        assert bot.chat("hello?", session_id=SID).text == "Echo: hello?"
        assert len(bot.usage_entries()) == 1


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of this test's own (root only)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a tiny filesystem to fill")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def fill(directory: Path, leave: int) -> Path:
    """Fill the filesystem of ``directory`` but ``leave`` bytes; return the filler file."""
    filler = directory / "filler"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    size = filler.stat().st_size
    with filler.open("r+b") as handle:
        handle.truncate(max(0, size - leave))
    return filler


def test_a_full_disk_keeps_whole_turns_and_their_entries_then_recovers(tiny_disk: Path) -> None:
    fake = FakeChatModel()
    store = SQLiteStore(tiny_disk / "chat.db", lease=1.0)
    bot = Chatbot(settings(window_turns=2), llm=fake, store=store)
    try:
        bot.chat("before the disk fills", session_id=SID)
        # Room for a few turns (each writes its write-ahead record, the turn, and the drop).
        filler = fill(tiny_disk, leave=256 * 1024)
        turns = 0
        with pytest.raises(StoreError, match="disk is full") as caught:
            for turns in range(1, 200):  # until the disk is full
                bot.chat(f"turn {turns} " + "y" * 3000, session_id=SID)
        assert str(store.path) in str(caught.value)
        assert turns > 1, "the disk was full from the start: nothing was tested"

        history = bot.store.load(SID)
        assert len(history) % 2 == 0  # whole turns only
        for human, ai in zip(history[0::2], history[1::2], strict=True):
            assert (human.type, ai.type, ai.text) == ("human", "ai", f"Echo: {human.text}")
        stored = len(history) // 2
        entries = bot.usage_entries(session_id=SID)
        # Every stored turn has its entry; the failed turn may have one more, never a half one:
        # its usage is recorded before its messages.
        assert stored <= len(entries) <= stored + 1
        assert len(fake.calls) <= len(entries) + 1  # at most the failed turn went unrecorded
        assert_ledger_adds_up(bot)

        # The journal beside the file is on the full disk too: the turn is kept there only
        # if it found room, and the error says which.
        journaled: list[tuple[str, str]] = []
        if isinstance(caught.value, TurnJournaledError):
            [waiting] = journal_of(bot).pending()
            journaled = pairs(waiting.messages)
        else:  # refused before anything was sent, or the journal found no room either
            message = str(caught.value)
            assert "could not lock" in message or "could not be kept in the journal" in message
        filler.unlink()  # free some space
        assert_resumes(bot, history, len(entries), journaled)
    finally:
        bot.close()


def test_a_lease_given_back_while_it_is_being_renewed_is_not_reported_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The renewer wakes up while another process holds the write lock, and waits for it; the
    # turn ends meanwhile and gives its lease back. The lease was never lost: no warning that
    # "a session lock expired while its turn was still running" may be logged for it.
    store = SQLiteStore(tmp_path / "chat.db", lease=0.3)  # renewed every 0.1 s
    try:
        for _ in range(3):
            other = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
            with store.lock(SID):
                other.execute("BEGIN IMMEDIATE")  # another process writing, for 0.4 s
                letting_go = threading.Timer(0.4, other.execute, ("ROLLBACK",))
                letting_go.start()
                time.sleep(0.25)  # the renewer is waiting for the write lock by now
            # The turn gave its lease back (once `other` let go).
            letting_go.join()
            other.close()
        with store.lock(SID):  # and the session is free
            pass
    finally:
        store.close()
    assert "expired while its turn" not in caplog.text
    assert "Could not" not in caplog.text  # nothing failed on the way


@pytest.mark.parametrize("mode", SYNC_ASYNC)
def test_a_turn_whose_usage_could_not_be_recorded_gives_its_budget_hold_back(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store fails once, when the turn saves itself and its usage (a blip: a lock, a failover),
    # and is fine again when the turn ends. The turn waits in the journal with its hold, which
    # counts its cost until it is saved; the replay ends it. Stranded, the hold would count
    # against the budget for 15 minutes.
    store = SQLiteStore(tmp_path / "chat.db")
    bot = Chatbot(settings(budget_session_tokens=10**9), llm=FakeChatModel(), store=store)
    try:
        bot.chat("before", session_id=SID)

        def blip(*args: Any, **kwargs: Any) -> None:
            raise StoreError("The store blinked.")

        async def ablip(*args: Any, **kwargs: Any) -> None:
            blip()

        monkeypatch.setattr(store, "commit_turn", blip)
        monkeypatch.setattr(store, "acommit_turn", ablip)
        error = turn_in_thread(bot, mode, "during the blip")()
        monkeypatch.undo()

        journaled = assert_journaled(error, "during the blip", bot)
        assert len(bot.store.load(SID)) == 2 and len(bot.usage_entries()) == 1
        assert_resumes(bot, bot.store.load(SID), 1, journaled)
        assert_no_hold_left(bot, SID)
    finally:
        bot.close()
