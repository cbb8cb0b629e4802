"""The usage-ledger half of the store contract, run against every backend.

Entries, totals per session/user/overall, filters, and budget holds that are atomic across
threads (the multi-process case is in test_multiprocess.py).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from chatchain.budgets import BudgetHold, BudgetLimit
from chatchain.stores import HistoryStore
from chatchain.usage import UsageEntry, total_of

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def entry(
    session: str = "s", *, user: str | None = None, tokens: int = 10, **kw: object
) -> UsageEntry:
    values: dict[str, object] = {
        "model": "gpt-4o-mini",
        "prompt_tokens": tokens - tokens // 2,
        "completion_tokens": tokens // 2,
        "total_tokens": tokens,
        "requests": 1,
        "cost_usd": tokens / 1e6,
        "price_source": "genai-prices",
        "latency_s": 0.25,
        "at": T0,
    }
    values.update(kw)
    return UsageEntry(session, user_id=user, **values)  # type: ignore[arg-type]


def hold(
    session: str = "s",
    *,
    user: str | None = None,
    tokens: int = 10,
    usd: float = 0.0,
    ttl: float = 60.0,
) -> BudgetHold:
    return BudgetHold(
        session, tokens, usd, datetime.now(UTC) + timedelta(seconds=ttl), user_id=user
    )


def test_entries_round_trip_every_field(store: HistoryStore) -> None:
    first = entry(
        "ünï 🙂 s",
        user="u:1*",
        cached_tokens=3,
        reasoning_tokens=2,
        first_token_s=0.125,
        summary=True,
        estimated=True,
    )
    unpriced = entry("s2", model=None, cost_usd=None, price_source=None, at=T0 + timedelta(1))
    store.record_usage(first)
    store.record_usage(unpriced)
    assert store.usage_entries() == [first, unpriced]


def test_totals_per_session_user_and_all(store: HistoryStore) -> None:
    store.record_usage(entry("a", user="u1", tokens=10))
    store.record_usage(entry("a", user="u1", tokens=20, summary=True))
    store.record_usage(entry("b", user="u2", tokens=30))
    store.record_usage(entry("c", tokens=40))
    a = store.usage_total("session", "a")
    assert (a.total_tokens, a.turns, a.summaries, a.successful_requests) == (30, 1, 1, 2)
    assert a.prompt_tokens == 15 and a.completion_tokens == 15
    assert a.cost_usd == pytest.approx(30e-6)
    assert a.latency_s == pytest.approx(0.5)
    assert store.usage_total("user", "u1").total_tokens == 30
    assert store.usage_total("user", "u2").total_tokens == 30
    everything = store.usage_total("all", "")
    assert everything.total_tokens == 100 and everything.turns == 3
    assert everything == replace(total_of(store.usage_entries()), model=None)
    assert store.usage_total("session", "nobody").total_tokens == 0
    assert store.usage_total("session", "nobody").cost_usd == 0.0


def test_an_unpriced_entry_makes_the_cost_unknown_not_zero(store: HistoryStore) -> None:
    store.record_usage(entry("a", tokens=10))
    store.record_usage(entry("a", tokens=10, cost_usd=None, price_source=None))
    total = store.usage_total("session", "a")
    assert total.cost_usd is None and total.unpriced == 1
    assert store.usage_total("all", "").cost_usd is None


def test_totals_count_the_estimated_entries(store: HistoryStore) -> None:
    store.record_usage(entry("a", user="u", tokens=10, estimated=True))
    store.record_usage(entry("a", user="u", tokens=20))
    store.record_usage(entry("b", tokens=30, estimated=True, summary=True))
    assert store.usage_total("session", "a").estimated == 1
    assert store.usage_total("user", "u").estimated == 1
    assert store.usage_total("session", "b").estimated == 1
    assert store.usage_total("all", "").estimated == 2
    assert store.usage_total("all", "") == replace(total_of(store.usage_entries()), model=None)


def test_cache_hits_round_trip_and_add_up_with_what_they_saved(store: HistoryStore) -> None:
    def hit(session: str, saved: float | None, **kw: object) -> UsageEntry:
        return entry(
            session, tokens=0, requests=0, cost_usd=0.0, cached=True, saved_usd=saved, **kw
        )

    first = hit("a", 2.5e-5, user="u")
    unknown = hit("a", None, at=T0 + timedelta(1))  # a hit of a model of unknown price
    store.record_usage(first)
    store.record_usage(unknown)
    store.record_usage(entry("a", user="u", tokens=30))
    store.record_usage(hit("b", 1e-5, summary=False))
    kept = store.usage_entries(session_id="a")
    assert first in kept and unknown in kept
    a = store.usage_total("session", "a")
    assert (a.turns, a.cached_turns, a.total_tokens, a.successful_requests) == (3, 2, 30, 1)
    assert a.saved_usd == pytest.approx(2.5e-5)
    assert a.cost_usd == pytest.approx(30e-6)  # a hit costs 0, and is priced (not unknown)
    assert store.usage_total("user", "u").cached_turns == 1
    everything = store.usage_total("all", "")
    assert (everything.cached_turns, everything.saved_usd) == (3, pytest.approx(3.5e-5))
    assert everything == replace(total_of(store.usage_entries()), model=None)


def test_cached_and_reasoning_tokens_add_up(store: HistoryStore) -> None:
    store.record_usage(entry("a", cached_tokens=4, reasoning_tokens=1))
    store.record_usage(entry("a", cached_tokens=6, reasoning_tokens=2))
    total = store.usage_total("session", "a")
    assert (total.cached_tokens, total.reasoning_tokens) == (10, 3)


def test_recording_the_same_entry_twice_counts_it_once(store: HistoryStore) -> None:
    one = entry("a")
    store.record_usage(one)
    store.record_usage(one)
    assert store.usage_total("session", "a").turns == 1
    assert len(store.usage_entries()) == 1


def test_entry_filters(store: HistoryStore) -> None:
    e1 = entry("a", user="u1", at=T0)
    e2 = entry("b", user="u1", at=T0 + timedelta(hours=1))
    e3 = entry("a", user="u2", at=T0 + timedelta(days=1))
    for e in (e3, e1, e2):  # recorded out of order: listed oldest first
        store.record_usage(e)
    assert store.usage_entries() == [e1, e2, e3]
    assert store.usage_entries(session_id="a") == [e1, e3]
    assert store.usage_entries(user_id="u1") == [e1, e2]
    assert store.usage_entries(session_id="a", user_id="u2") == [e3]
    assert store.usage_entries(since=T0 + timedelta(hours=1)) == [e2, e3]
    assert store.usage_entries(until=T0 + timedelta(hours=1)) == [e1]
    assert store.usage_entries(session_id="zzz") == []


def test_hostile_ids_in_the_ledger_are_kept_apart(store: HistoryStore) -> None:
    ids = ["a:b", "a", "*", "'; DROP TABLE usage; --", "../x", "%41"]
    for i, sid in enumerate(ids):
        store.record_usage(entry(sid, user=sid, tokens=i + 1))
    for i, sid in enumerate(ids):
        assert store.usage_total("session", sid).total_tokens == i + 1
        assert store.usage_total("user", sid).total_tokens == i + 1
        assert [e.session_id for e in store.usage_entries(session_id=sid)] == [sid]


def test_deleting_a_session_keeps_what_it_spent(store: HistoryStore) -> None:
    from langchain_core.messages import HumanMessage

    store.append("a", [HumanMessage("hi")])
    store.record_usage(entry("a", tokens=10))
    store.delete("a")
    store.prune(datetime.now(UTC) + timedelta(days=1))
    assert store.usage_total("session", "a").total_tokens == 10
    assert len(store.usage_entries(session_id="a")) == 1


def test_hold_within_limits_is_kept_and_counts(store: HistoryStore) -> None:
    limit = BudgetLimit("session", "a", max_tokens=100)
    store.record_usage(entry("a", tokens=50))
    assert store.hold_budget(hold("a", tokens=30), [limit]) is None
    refusal = store.hold_budget(hold("a", tokens=30), [limit])  # 50 + 30 + 30 > 100
    assert refusal is not None
    assert refusal.limit == limit
    assert (refusal.spent_tokens, refusal.held_tokens) == (50, 30)
    assert store.hold_budget(hold("a", tokens=20), [limit]) is None  # 50 + 30 + 20 = 100


def test_usd_limits(store: HistoryStore) -> None:
    limit = BudgetLimit("user", "u", max_usd=0.01)
    store.record_usage(entry("a", user="u", cost_usd=0.006))
    refusal = store.hold_budget(hold("b", user="u", usd=0.005), [limit])
    assert refusal is not None
    assert refusal.spent_usd == pytest.approx(0.006) and refusal.held_usd == 0
    assert store.hold_budget(hold("b", user="u", usd=0.004), [limit]) is None
    # Other users and sessions are not counted against this user's cap.
    assert (
        store.hold_budget(hold("b", user="v", usd=0.009), [BudgetLimit("user", "v", 0.01)]) is None
    )


def test_every_limit_must_pass_and_a_refusal_keeps_nothing(store: HistoryStore) -> None:
    session = BudgetLimit("session", "a", max_tokens=1000)
    overall = BudgetLimit("all", "", max_tokens=50)
    store.record_usage(entry("other", tokens=40))
    refusal = store.hold_budget(hold("a", tokens=20), [session, overall])
    assert refusal is not None and refusal.limit == overall and refusal.spent_tokens == 40
    # Nothing was kept: a hold that fits both still fits.
    assert store.hold_budget(hold("a", tokens=10), [session, overall]) is None


def test_recording_replaces_the_hold(store: HistoryStore) -> None:
    limit = BudgetLimit("session", "a", max_tokens=100)
    h = hold("a", tokens=60)
    assert store.hold_budget(h, [limit]) is None
    store.record_usage(entry("a", tokens=30), release=h.id)  # spent 30, hold gone
    assert store.hold_budget(hold("a", tokens=70), [limit]) is None


def test_release_and_expiry_free_the_budget(store: HistoryStore) -> None:
    limit = BudgetLimit("all", "", max_tokens=100)
    h = hold("a", tokens=80)
    assert store.hold_budget(h, [limit]) is None
    assert store.hold_budget(hold("b", tokens=80), [limit]) is not None
    store.release_budget(h.id)
    store.release_budget(h.id)  # twice, and unknown ids, are fine
    store.release_budget("no-such-hold")
    assert store.hold_budget(hold("b", tokens=80, ttl=0.2), [limit]) is None
    assert store.hold_budget(hold("c", tokens=80), [limit]) is not None
    import time

    time.sleep(0.4)  # the hold of a dead process expires
    assert store.hold_budget(hold("c", tokens=80), [limit]) is None


def test_concurrent_holds_cannot_overspend(store: HistoryStore) -> None:
    limit = BudgetLimit("all", "", max_tokens=100)
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        for j in range(5):
            kept = store.hold_budget(hold(f"s{i}-{j}", tokens=10), [limit]) is None
            results.append(kept)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 10 and len(results) == 40


def test_concurrent_records_lose_nothing(store: HistoryStore) -> None:
    def worker(i: int) -> None:
        for j in range(10):
            store.record_usage(entry(f"s{i % 2}", user="u", tokens=j + 1))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.usage_total("all", "").total_tokens == 6 * 55
    assert store.usage_total("user", "u").turns == 60
    assert store.usage_total("session", "s0").turns == 30
    assert len(store.usage_entries()) == 60


def test_async_twins(store: HistoryStore) -> None:
    async def main() -> None:
        limit = BudgetLimit("session", "a", max_tokens=25)
        h = hold("a", tokens=20)
        assert await store.ahold_budget(h, [limit]) is None
        assert await store.ahold_budget(hold("a", tokens=10), [limit]) is not None
        await store.arecord_usage(entry("a", tokens=5), release=h.id)
        await store.arelease_budget("unknown")
        assert await store.ahold_budget(hold("a", tokens=20), [limit]) is None

    asyncio.run(main())
    assert store.usage_total("session", "a").total_tokens == 5


def test_an_unpriced_entry_does_not_hide_the_priced_spending(store: HistoryStore) -> None:
    store.record_usage(entry("a", cost_usd=0.008))
    store.record_usage(entry("a", cost_usd=None, price_source=None))
    total = store.usage_total("session", "a")
    assert total.cost_usd is None and total.priced_cost_usd == pytest.approx(0.008)
    limit = BudgetLimit("session", "a", max_usd=0.01)
    assert store.hold_budget(hold("a", usd=0.005), [limit]) is not None
    assert store.hold_budget(hold("a", usd=0.001), [limit]) is None


# -- period caps (BudgetLimit.since) ----------------------------------------------------------


def _midnight() -> datetime:
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def test_a_daily_cap_counts_today_only(store: HistoryStore) -> None:
    today = _midnight()
    store.record_usage(entry("s", user="u", tokens=1000, at=today - timedelta(seconds=1)))
    store.record_usage(entry("s", user="u", tokens=60, at=today + timedelta(seconds=1)))
    store.record_usage(entry("other", user="v", tokens=1000, at=today + timedelta(seconds=2)))
    daily = BudgetLimit("user", "u", max_tokens=100, since=today)
    kept = hold("s", user="u", tokens=40)
    assert store.hold_budget(kept, [daily]) is None  # 60 + 40 = 100: yesterday's 1000 not counted
    refusal = store.hold_budget(hold("s", user="u", tokens=1), [daily])
    assert refusal is not None and refusal.limit == daily
    assert (refusal.spent_tokens, refusal.held_tokens) == (60, 40)  # holds count too
    store.release_budget(kept.id)
    store.record_usage(entry("s", user="u", tokens=40, at=today + timedelta(seconds=3)))
    refusal = store.hold_budget(hold("s", user="u", tokens=1), [daily])  # today's reached the cap
    assert refusal is not None and (refusal.spent_tokens, refusal.held_tokens) == (100, 0)
    # The lifetime total still counts everything, and reads no entries.
    assert store.usage_total("user", "u").total_tokens == 1100


def test_a_daily_cap_in_usd_counts_the_priced_entries_of_today(store: HistoryStore) -> None:
    today = _midnight()
    store.record_usage(entry("s", user="u", cost_usd=0.9, at=today - timedelta(hours=1)))
    store.record_usage(entry("s", user="u", cost_usd=0.25, at=today + timedelta(minutes=1)))
    store.record_usage(entry("s", user="u", cost_usd=None, at=today + timedelta(minutes=2)))
    daily = BudgetLimit("user", "u", max_usd=1.0, since=today)
    refusal = store.hold_budget(hold("s", user="u", usd=0.8), [daily])
    assert refusal is not None and refusal.spent_usd == pytest.approx(0.25)
    assert store.hold_budget(hold("s", user="u", usd=0.75), [daily]) is None


def test_a_monthly_cap_counts_this_month_only(store: HistoryStore) -> None:
    month = _midnight().replace(day=1)
    store.record_usage(entry("s", user="u", tokens=500, at=month - timedelta(seconds=1)))
    store.record_usage(entry("s", user="u", tokens=30, at=month))  # at the start: counts
    store.record_usage(entry("s", user="u", tokens=30, at=month + timedelta(hours=5)))
    monthly = BudgetLimit("user", "u", max_tokens=100, since=month)
    assert store.hold_budget(hold("s", user="u", tokens=40), [monthly]) is None
    refusal = store.hold_budget(hold("s", user="u", tokens=1), [monthly])
    assert refusal is not None and (refusal.spent_tokens, refusal.held_tokens) == (60, 40)


@pytest.mark.parametrize("days_back", [0, 2])
def test_a_period_may_start_within_a_day(store: HistoryStore, days_back: int) -> None:
    start = _midnight() - timedelta(days=days_back) + timedelta(hours=1)
    store.record_usage(entry("s", tokens=1000, at=start - timedelta(minutes=30)))  # same day
    store.record_usage(entry("s", tokens=10, at=start))
    store.record_usage(entry("s", tokens=20, at=start + timedelta(hours=1)))
    if days_back:
        store.record_usage(entry("s", tokens=40, at=_midnight() - timedelta(hours=12)))
    spent = 30 + (40 if days_back else 0)
    for scope, key in [("session", "s"), ("all", "")]:
        limit = BudgetLimit(scope, key, max_tokens=spent, since=start)  # type: ignore[arg-type]
        refusal = store.hold_budget(hold("s", tokens=1), [limit])
        assert refusal is not None and refusal.spent_tokens == spent


def test_a_period_yet_to_come_counts_only_holds(store: HistoryStore) -> None:
    store.record_usage(entry("s", tokens=50, at=datetime.now(UTC)))
    later = BudgetLimit("session", "s", max_tokens=10, since=_midnight() + timedelta(days=5))
    assert store.hold_budget(hold("s", tokens=10), [later]) is None
    refusal = store.hold_budget(hold("s", tokens=1), [later])
    assert refusal is not None and (refusal.spent_tokens, refusal.held_tokens) == (0, 10)


def test_a_period_cap_and_a_lifetime_cap_together(store: HistoryStore) -> None:
    today = _midnight()
    store.record_usage(entry("s", user="u", tokens=90, at=today - timedelta(days=3)))
    lifetime = BudgetLimit("user", "u", max_tokens=100)
    daily = BudgetLimit("user", "u", max_tokens=50, since=today)
    refusal = store.hold_budget(hold("s", user="u", tokens=20), [daily, lifetime])
    assert refusal is not None and refusal.limit == lifetime
    assert store.hold_budget(hold("s", user="u", tokens=10), [daily, lifetime]) is None


async def test_async_hold_honours_the_period(store: HistoryStore) -> None:
    today = _midnight()
    store.record_usage(entry("s", user="u", tokens=1000, at=today - timedelta(days=1)))
    daily = BudgetLimit("user", "u", max_tokens=100, since=today)
    assert await store.ahold_budget(hold("s", user="u", tokens=100), [daily]) is None
    assert await store.ahold_budget(hold("s", user="u", tokens=1), [daily]) is not None


def test_concurrent_holds_under_a_daily_cap_cannot_overspend(store: HistoryStore) -> None:
    today = _midnight()
    store.record_usage(entry("s", user="u", tokens=500, at=today - timedelta(hours=1)))
    store.record_usage(entry("s", user="u", tokens=40, at=today + timedelta(seconds=1)))
    daily = BudgetLimit("user", "u", max_tokens=100, since=today)
    results: list[bool] = []
    barrier = threading.Barrier(6)

    def worker(i: int) -> None:
        barrier.wait()
        for j in range(5):
            kept = store.hold_budget(hold(f"s{i}-{j}", user="u", tokens=10), [daily]) is None
            results.append(kept)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 6 and len(results) == 30  # 40 spent today + 6 x 10


def test_a_naive_since_is_utc(store: HistoryStore) -> None:
    today = _midnight()
    store.record_usage(entry("s", tokens=50, at=today - timedelta(minutes=1)))
    naive = BudgetLimit("session", "s", max_tokens=10, since=today.replace(tzinfo=None))
    assert naive.since == today
    assert store.hold_budget(hold("s", tokens=10), [naive]) is None
