"""The journal of unsaved turns: replayed exactly once, whoever replays it and however often.

tests/reliability/test_store_faults.py stops real servers under a turn; here the journal's own
promises, on real SQLite, Redis and PostgreSQL stores:

- a replay that dies half way (after a commit, before the journal forgets the turn) and runs
  again stores each turn once, in order, and counts each entry once;
- the turns of other sessions are saved after any turn that goes well, in the background;
- a journal that cannot be written either says so, and the bill goes to the log;
- the service tells its clients (JSON, server-sent events, the OpenAI route with and without a
  session) that the reply was billed and waits in the journal, and saves it once back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from pydantic import BaseModel

from chatchain import Chatbot, Settings, StoreError, StructuredReplyError, TurnJournaledError
from chatchain._journal import Journal, JournaledTurn
from chatchain.budgets import BudgetHold, BudgetLimit
from chatchain.server import create_app
from chatchain.stores import HistoryStore
from chatchain.stores._sqlite import SQLiteStore
from chatchain.testing import FakeChatModel, tool_call_reply
from chatchain.usage import UsageEntry
from chatchain.users import Users
from tests.reliability.conftest import assert_ledger_adds_up, assert_no_hold_left

SHARED = ["sqlite", "redis", "postgres"]


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_key": "sk-test",
        "model": "gpt-4o-mini",
        "window_turns": 4,
        "window_tokens": None,
        "summarize": False,
        "server_requests_per_minute": 0,
    }
    values.update(overrides)
    return Settings(**values)


def journaled(store: HistoryStore, session_id: str, tag: str) -> JournaledTurn:
    """A turn as `Turn.save` journals it: messages, entry, and the hold it still has."""
    hold = BudgetHold(session_id, 500, 0.0, datetime.now(UTC) + timedelta(minutes=5))
    assert store.hold_budget(hold, []) is None
    entry = UsageEntry(session_id, "gpt-4o-mini", total_tokens=10, requests=1, id=tag)
    messages = [HumanMessage(f"{tag} asks"), AIMessage(f"{tag} answers")]
    return JournaledTurn(session_id, messages, entry, hold.id)


def texts(store: HistoryStore, session_id: str) -> list[str]:
    return [m.text for m in store.load(session_id)]


@pytest.mark.parametrize("backend", SHARED)
def test_a_replay_that_dies_half_way_and_runs_again_saves_each_turn_once(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store: HistoryStore = request.getfixturevalue(f"{backend}_store")
    journal = Journal(tmp_path / "j.unsaved-turns", store)
    for session_id, tag in [("a", "a1"), ("b", "b1"), ("a", "a2")]:
        journal.add(journaled(store, session_id, tag))

    # The process dies after the store took a turn and before the journal forgot it.
    forget = journal.done

    def killed(entry_id: str) -> None:
        if entry_id == "a2":
            raise KeyboardInterrupt("killed")
        forget(entry_id)

    monkeypatch.setattr(journal, "done", killed)
    with pytest.raises(KeyboardInterrupt):
        journal.replay_all()
    monkeypatch.undo()
    assert [t.entry.id for t in journal.pending()] == ["b1", "a2"]  # a2 is saved, b1 is not

    assert journal.replay_all() == 2
    assert journal.replay_all() == 0  # and again: nothing left, nothing changes

    assert texts(store, "a") == ["a1 asks", "a1 answers", "a2 asks", "a2 answers"]
    assert texts(store, "b") == ["b1 asks", "b1 answers"]
    assert sorted(e.id for e in store.usage_entries()) == ["a1", "a2", "b1"]
    assert store.usage_total("all", "").total_tokens == 30
    assert journal.pending() == []
    for session_id in ("a", "b"):  # every hold ended with its turn's replay
        assert_no_hold(store, session_id)


def assert_no_hold(store: HistoryStore, session_id: str) -> None:
    probe = BudgetHold(session_id, 100, 0.0, datetime.now(UTC) + timedelta(minutes=1))
    spent = store.usage_total("session", session_id).total_tokens
    cap = BudgetLimit("session", session_id, max_tokens=spent + 100)
    assert store.hold_budget(probe, [cap]) is None, "a hold was left behind"
    store.release_budget(probe.id)


class Blip:
    """Makes the store's writes of turns and usage fail while ``on`` (a lock, a failover)."""

    def __init__(self, store: HistoryStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.on = False
        for name in ("commit_turn", "record_usage"):
            self._wrap(store, name, monkeypatch)

    def _wrap(self, store: HistoryStore, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
        sync, later = getattr(store, name), getattr(store, f"a{name}")

        def failing(*args: Any, **kwargs: Any) -> None:
            if self.on:
                raise StoreError("The store blinked: check it.")
            sync(*args, **kwargs)

        async def afailing(*args: Any, **kwargs: Any) -> None:
            if self.on:
                raise StoreError("The store blinked: check it.")
            await later(*args, **kwargs)

        monkeypatch.setattr(store, name, failing)
        monkeypatch.setattr(store, f"a{name}", afailing)


def wait_for_empty(journal: Journal, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while journal.pending():
        assert time.monotonic() < deadline, "the journal was never replayed"
        time.sleep(0.02)


def test_other_sessions_turns_are_saved_after_any_turn_goes_well(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteStore(tmp_path / "chat.db")
    fake = FakeChatModel()
    bot = Chatbot(settings(budget_session_tokens=10**9), llm=fake, store=store)
    try:
        blip = Blip(store, monkeypatch)
        blip.on = True
        with pytest.raises(TurnJournaledError) as caught:
            bot.chat("lost for now", session_id="a")
        blip.on = False
        assert caught.value.reply == "Echo: lost for now"

        bot.chat("elsewhere", session_id="b")  # the store is back: "a" is saved meanwhile
        journal = bot.chain._spec.journal
        assert journal is not None
        wait_for_empty(journal)
        assert texts(store, "a") == ["lost for now", "Echo: lost for now"]
        assert len(bot.usage_entries()) == len(fake.calls) == 2
        assert_ledger_adds_up(bot)
        assert_no_hold_left(bot, "a")
    finally:
        bot.close()


def test_a_journal_that_cannot_be_written_says_so_and_logs_the_bill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    store = SQLiteStore(tmp_path / "chat.db")
    bot = Chatbot(settings(journal=str(blocker / "journal")), llm=FakeChatModel(), store=store)
    try:
        Blip(store, monkeypatch).on = True
        with caplog.at_level(logging.ERROR, "chatchain"), pytest.raises(StoreError) as caught:
            bot.chat("hello", session_id="s")
    finally:
        bot.close()
    message = str(caught.value)
    assert not isinstance(caught.value, TurnJournaledError)
    assert "The store blinked" in message and "could not be kept in the journal" in message
    assert "CHATCHAIN_JOURNAL" in message
    [logged] = [r for r in caplog.records if "neither saved" in r.getMessage()]
    entry = json.loads(logged.getMessage().rsplit("Its usage entry: ", 1)[1])
    assert entry["session_id"] == "s" and entry["requests"] == 1


class City(BaseModel):
    name: str
    population: int


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_usage_of_a_call_whose_reply_is_not_kept_waits_in_the_journal_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # Two billed calls: a structured reply that does not fit its schema (no messages kept),
    # and the finished call of a tool turn that then failed (its round kept, the reply
    # marked interrupted). The store blinks as they are recorded: the caller sees the turn's
    # own error, and what it would have stored waits in the journal.
    def endpoint_gone(messages: list[BaseMessage]) -> str:
        raise ConnectionError("the endpoint went away")

    store = SQLiteStore(tmp_path / "chat.db")
    fake = FakeChatModel(model_name="gpt-4o-mini")
    tools_fake = FakeChatModel(
        model_name="gpt-4o-mini",
        replies=[tool_call_reply(("add", {"a": 1, "b": 2}))],
        respond=endpoint_gone,
    )
    bot = Chatbot(settings(), llm=fake, store=store)
    tool_bot = Chatbot(settings(), llm=tools_fake, store=store, tools=[add])
    try:
        blip = Blip(store, monkeypatch)
        blip.on = True
        fake.queue('{"name": "Bergen"}')
        with pytest.raises(StructuredReplyError):
            if mode == "sync":
                bot.chat("Second city of Norway?", session_id="s", schema=City)
            else:
                asyncio.run(bot.achat("Second city of Norway?", session_id="s", schema=City))
        with pytest.raises(ConnectionError):
            if mode == "sync":
                tool_bot.chat("add 1 and 2", session_id="t")
            else:
                asyncio.run(tool_bot.achat("add 1 and 2", session_id="t"))
        blip.on = False
        journal = bot.chain._spec.journal
        assert journal is not None
        waiting = [(t.session_id, [m.type for m in t.messages]) for t in journal.pending()]
        assert waiting == [("s", []), ("t", ["human", "ai", "tool", "ai"])]
        assert bot.usage_entries() == []

        bot.chat("hi", session_id="s")  # the store is back: the session's next turn...
        wait_for_empty(journal)  # ...and the other session's, after it
        assert texts(store, "s") == ["hi", "Echo: hi"]  # the structured call stored nothing
        assert texts(store, "t") == ["add 1 and 2", "", "3", ""]  # the round, kept once
        # Every billed call once: the structured one, "hi", and the tool turn's first call
        # (its second raised before any reply: nothing billed).
        assert len(fake.calls) == 2 and len(tools_fake.calls) == 2
        assert [e.requests for e in bot.usage_entries(session_id="t")] == [1]
        assert len(bot.usage_entries()) == 3
        assert_ledger_adds_up(bot)
    finally:
        tool_bot.close()
        bot.close()


# -- the service -------------------------------------------------------------------------------


@pytest.fixture
def service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TestClient, Chatbot, FakeChatModel, Blip]]:
    store = SQLiteStore(tmp_path / "chat.db")
    fake = FakeChatModel(model_name="gpt-4o-mini")
    bot = Chatbot(settings(), llm=fake, store=store)
    token = Users(store).add("ann")
    blip = Blip(store, monkeypatch)
    with TestClient(create_app(bot), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        yield client, bot, fake, blip
    bot.close()


def _events(text: str) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            found.append((lines["event"], json.loads(lines["data"])))
    return found


ROUTES = ["native", "native-sse", "openai-session", "openai-stateless"]


def _ask(client: TestClient, route: str, text: str) -> Any:
    if route == "native":
        return client.post("/v1/sessions/s/messages", json={"text": text})
    if route == "native-sse":
        return client.post(
            "/v1/sessions/s/messages",
            json={"text": text},
            headers={"Accept": "text/event-stream"},
        )
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    headers = {"X-Session-Id": "s"} if route == "openai-session" else {}
    return client.post("/v1/chat/completions", json=body, headers=headers)


@pytest.mark.parametrize("route", ROUTES)
def test_the_service_says_a_billed_reply_waits_in_the_journal_and_saves_it_once(
    service: tuple[TestClient, Chatbot, FakeChatModel, Blip], route: str
) -> None:
    client, bot, fake, blip = service
    blip.on = True
    answer = _ask(client, route, "during the blip")
    blip.on = False

    if route == "native-sse":
        assert answer.status_code == 200
        received = _events(answer.text)
        assert [name for name, _ in received][-1] == "error"
        error = received[-1][1]
        assert (error["type"], error["status"]) == ("TurnJournaledError", 503)
        assert "".join(data["text"] for name, data in received if name == "text")
        message = error["message"]
    else:
        assert answer.status_code == 503
        error = answer.json()["error"]
        kind = error["code"] if route.startswith("openai") else error["type"]
        assert kind == "TurnJournaledError"
        if route.startswith("openai"):  # the openai SDK retries a 503 unless told not to
            assert answer.headers["x-should-retry"] == "false"
        message = error["message"]
    assert "delivered and billed" in message and "do not send the message again" in message
    assert bot.usage_entries() == []  # not yet

    assert _ask(client, route, "after the blip").status_code == 200
    journal = bot.chain._spec.journal
    assert journal is not None
    wait_for_empty(journal)
    assert len(bot.usage_entries()) == len(fake.calls) == 2  # every billed call, once
    assert_ledger_adds_up(bot)
    if route != "openai-stateless":
        history = client.get("/v1/sessions/s/messages").json()["messages"]
        assert [m["text"] for m in history][:2] == ["during the blip", "Echo: during the blip"]
