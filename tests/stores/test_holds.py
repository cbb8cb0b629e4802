"""Budget holds of crashed turns: reclaimed once they expire, on every store and clock.

A turn holds what it may spend until it is recorded; a process that dies mid-turn leaves its
hold behind. The hold lives as long as the turn's deadline plus a margin
(`TurnSpec.hold_ttl`); after that, the next hold on the store deletes it, so it blocks no
one. Expiry is timed by one clock per store: this process's for memory, the machine's for
SQLite (one machine shares the file), the server's for Redis and PostgreSQL, so that clients
whose clocks disagree do not disagree on when a hold ends.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import redis

from chatchain import BudgetExceeded, Chatbot, Settings
from chatchain.budgets import BudgetHold, BudgetLimit
from chatchain.stores import HistoryStore
from chatchain.stores import _base as base_module
from chatchain.stores._memory import MemoryLedger
from chatchain.stores._postgres import PostgresStore
from chatchain.stores._redis import RedisStore
from chatchain.stores._sqlite import SQLiteStore
from chatchain.testing import FakeChatModel

CAP = BudgetLimit("all", "", max_tokens=5000)


def kept_holds(store: HistoryStore) -> set[str]:
    """The ids of the holds the store keeps, expired or not (each backend's own table)."""
    if isinstance(store, MemoryLedger):  # MemoryStore, and a store `as_store` completed
        return set(store._holds)
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path) as conn:
            rows = conn.execute("SELECT id FROM budget_holds").fetchall()
        conn.close()
        return {hold_id for (hold_id,) in rows}
    if isinstance(store, RedisStore):
        with redis.Redis.from_url(store.url, decode_responses=True) as client:
            return set(client.hkeys(store._holds))
    assert isinstance(store, PostgresStore)
    with psycopg.connect(store._url) as conn:
        rows = conn.execute(f"SELECT id FROM {store.table_prefix}_budget_holds").fetchall()
    return {hold_id for (hold_id,) in rows}


def crashed_hold(session_id: str, tokens: int, ttl: float) -> BudgetHold:
    """The hold of a turn whose process dies before recording or releasing it."""
    return BudgetHold(session_id, tokens, 0.0, datetime.now(UTC) + timedelta(seconds=ttl))


def wait_past(moment: datetime) -> None:
    while datetime.now(UTC) <= moment + timedelta(milliseconds=50):
        time.sleep(0.02)


def test_a_new_hold_reclaims_the_expired_ones(store: HistoryStore) -> None:
    crashed = crashed_hold("crashed", 4000, ttl=0.3)
    assert store.hold_budget(crashed, [CAP]) is None
    live = crashed_hold("live", 500, ttl=60)
    assert store.hold_budget(live, [CAP]) is None
    assert store.hold_budget(crashed_hold("other", 1000, ttl=60), [CAP]) is not None  # 5500
    wait_past(crashed.expires_at)

    fresh = crashed_hold("other", 1000, ttl=60)
    assert store.hold_budget(fresh, [CAP]) is None  # the crashed hold no longer counts...
    assert kept_holds(store) == {live.id, fresh.id}  # ...nor is it kept: deleted


@pytest.mark.slow  # waits for a hold to expire
def test_a_crashed_turns_hold_stops_blocking_another_session_once_it_expires(
    store: HistoryStore,
) -> None:
    # A process took a hold for a turn on session "crashed" and died. Another process's turn
    # on another session, under a store-wide cap, is refused while the hold lives and goes
    # through as soon as it has expired (not 15 minutes later).
    bot = Chatbot(
        Settings(api_key="sk-test", summarize=False, max_tokens=100, budget_total_tokens=2000),
        llm=FakeChatModel(),
        store=store,
    )
    bot.chat("hello", session_id="alive")  # warm: the next turn reaches its check at once
    spent = bot.usage().total_tokens
    crashed = crashed_hold("crashed", 2000 - spent - 10, ttl=2)
    assert store.hold_budget(crashed, []) is None
    with pytest.raises(BudgetExceeded) as refused:
        bot.chat("hello", session_id="alive")
    assert refused.value.spent_tokens == 1990  # what was spent, and the crashed hold
    assert bot.usage().total_tokens == spent  # the refused turn spent nothing

    wait_past(crashed.expires_at)
    assert bot.chat("hello", session_id="alive").text
    assert crashed.id not in kept_holds(store)
    assert bot.usage().turns == 2


@pytest.mark.parametrize("skew_s", [3600.0, -3600.0], ids=["fast", "slow"])
@pytest.mark.parametrize("backend", ["redis", "postgres"])
def test_holds_expire_by_the_servers_clock_whatever_the_clients_clock_says(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
    skew_s: float,
) -> None:
    # A client whose clock is an hour fast (or slow) takes a hold meant to live 1 s. Timed by
    # its own clock, the hold would block everyone else for an hour (or end at once, letting
    # turns overspend); timed by the server's, it lives its second everywhere.
    store: HistoryStore = request.getfixturevalue(f"{backend}_store")
    skew = timedelta(seconds=skew_s)
    skewed_now = datetime.now(UTC) + skew
    crashed = BudgetHold("crashed", 4000, 0.0, skewed_now + timedelta(seconds=1))
    with monkeypatch.context() as patch:
        patch.setattr(base_module, "utcnow", lambda: datetime.now(UTC) + skew)
        # Where each store reads the clock for a hold's time to live.
        patch.setattr(
            f"chatchain.stores._{backend}._ledger.utcnow", lambda: datetime.now(UTC) + skew
        )
        assert store.hold_budget(crashed, [CAP]) is None

    # Clients with the right time: the hold counts now...
    assert store.hold_budget(crashed_hold("other", 2000, ttl=60), [CAP]) is not None
    # ...and no longer one second on.
    wait_past(datetime.now(UTC) + timedelta(seconds=1))
    assert store.hold_budget(crashed_hold("other", 2000, ttl=60), [CAP]) is None
    assert crashed.id not in kept_holds(store)
