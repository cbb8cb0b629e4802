"""Reliability and security suite (issue 6): shared fixtures and helpers.

The real Redis and PostgreSQL servers come from the store tests' fixture modules, registered
here by name as tests/stores/conftest.py does. The helpers below are imported by the test
modules of this folder (``from tests.reliability.conftest import ...``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from langchain_core.messages import BaseMessage

from chatchain import Chatbot
from chatchain.budgets import BudgetHold, BudgetLimit
from chatchain.usage import total_of
from tests.stores.fixtures_postgres import postgres_store, postgres_url
from tests.stores.fixtures_redis import redis_store, redis_url
from tests.stores.fixtures_sqlite import sqlite_store, sqlite_url

__all__ = [
    "Gate",
    "assert_ledger_adds_up",
    "assert_no_hold_left",
    "postgres_store",
    "postgres_url",
    "redis_store",
    "redis_url",
    "sqlite_store",
    "sqlite_url",
    "store_url",
]

LOCAL_STORES = ["memory", "sqlite"]


@pytest.fixture(params=LOCAL_STORES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """``memory://`` or a fresh SQLite file of this test's own."""
    if request.param == "memory":
        return "memory://"
    return f"sqlite:///{tmp_path / 'chat.db'}"


@pytest.fixture
def bots() -> Iterator[list[Chatbot]]:
    """Chatbots a test appends here are closed after it (their files and connections)."""
    made: list[Chatbot] = []
    yield made
    for bot in made:
        bot.close()


def assert_no_hold_left(bot: Chatbot, session_id: str) -> None:
    """No budget hold of ``session_id`` is left in the bot's store.

    A probe asks for exactly what a cap of (spent + probe) leaves: any hold left behind by
    a failed or finished turn would make the store refuse it, as it would refuse a real turn.
    """
    spent = bot.usage(session_id).total_tokens
    probe = BudgetHold(session_id, 1000, 0.0, datetime.now(UTC) + timedelta(minutes=1))
    cap = BudgetLimit("session", session_id, max_tokens=spent + probe.tokens)
    refusal = bot.ledger.hold(probe, [cap])
    assert refusal is None, f"a hold was left behind: {refusal}"
    bot.ledger.release(probe.id)


def assert_ledger_adds_up(bot: Chatbot) -> None:
    """The stored totals (of everything and of each session) equal the sum of the entries."""
    entries = bot.usage_entries()
    expected = total_of(entries)
    total = bot.usage()
    assert (total.turns, total.summaries) == (expected.turns, expected.summaries)
    assert total.total_tokens == expected.total_tokens
    assert total.successful_requests == expected.successful_requests
    for session_id in {e.session_id for e in entries}:
        mine = total_of(e for e in entries if e.session_id == session_id)
        stored = bot.usage(session_id)
        assert (stored.turns, stored.total_tokens) == (mine.turns, mine.total_tokens)


class Gate:
    """A ``FakeChatModel.respond`` that, once armed, holds the model "thinking" until opened.

    ``thinking`` is set when an armed call has been made (the turn is mid-flight: its lock
    is held, its prompt sent); the call then waits for `open`.

    Example:
        >>> gate = Gate()
        >>> gate([])  # not armed: answers at once
        'answer'
    """

    def __init__(self, reply: str = "answer") -> None:
        self.reply = reply
        self.thinking = threading.Event()
        self._go = threading.Event()
        self._go.set()

    def arm(self) -> None:
        self.thinking.clear()
        self._go.clear()

    def open(self) -> None:
        self._go.set()

    def __call__(self, messages: list[BaseMessage]) -> str:
        if not self._go.is_set():
            self.thinking.set()
            assert self._go.wait(30), "the gate was never opened"
        return self.reply
