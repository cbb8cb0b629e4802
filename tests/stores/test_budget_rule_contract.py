"""One table of budget checks, run against every store and against the rule itself.

`chatchain.budgets.first_refusal` is the rule of `HistoryStore.hold_budget`: the memory,
SQLite and PostgreSQL stores call it inside their own atomic section, and Redis runs a copy
of it in a Lua script. Each case below is a set of caps and a hold on top of one recorded
world (entries old and recent, priced and not, holds of turns in flight); the answer (the
refusal, with the spending it saw, or none) must be the table's on every store, sync and
async, and from the rule fed the same world, so that no copy can drift from the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from chatchain.budgets import BudgetHold, BudgetLimit, BudgetRefusal, first_refusal
from chatchain.stores import HistoryStore
from chatchain.usage import Usage, UsageEntry, total_of

NOW = datetime.now(UTC)
OLD = NOW - timedelta(days=2)
RECENT = NOW - timedelta(minutes=10)
SINCE = NOW - timedelta(days=1)  # a period starting within a day: whole days and a part

# Amounts that binary floats add exactly, whatever the order a store sums them in.
ENTRIES = [
    UsageEntry("a", "m", total_tokens=100, cost_usd=0.25, user_id="u", at=OLD),
    UsageEntry("a", "m", total_tokens=50, cost_usd=0.125, user_id="u", at=RECENT),
    UsageEntry("b", "m", total_tokens=30, cost_usd=None, user_id="u", at=RECENT),  # unpriced
    UsageEntry("c", "m", total_tokens=200, cost_usd=0.5, user_id="v", at=RECENT),
]
IN_FLIGHT = [("a", "u", 20, 0.0625), ("c", "v", 40, 0.03125)]  # session, user, tokens, USD


def session(key: str, **caps: object) -> BudgetLimit:
    return BudgetLimit("session", key, **caps)  # type: ignore[arg-type]


def user(key: str, **caps: object) -> BudgetLimit:
    return BudgetLimit("user", key, **caps)  # type: ignore[arg-type]


def everything(**caps: object) -> BudgetLimit:
    return BudgetLimit("all", "", **caps)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Case:
    """Caps and a hold (session, user, tokens, USD); ``refused`` is ``None`` when the hold is
    kept, else the index of the refusing cap and the spending it saw: spent tokens, spent
    USD, held tokens, held USD."""

    name: str
    limits: tuple[BudgetLimit, ...]
    hold: tuple[str, str | None, int, float]
    refused: tuple[int, int, float, int, float] | None


CASES = [
    # Session "a" spent 150 tokens ($0.375, its old entry included) and holds 20 ($0.0625).
    Case("a token cap met exactly keeps the hold", (session("a", max_tokens=200),),
         ("a", "u", 30, 0.0), None),
    Case("one token over refuses", (session("a", max_tokens=199),),
         ("a", "u", 30, 0.0), (0, 150, 0.375, 20, 0.0625)),
    Case("a USD cap met exactly keeps the hold", (session("a", max_usd=0.5),),
         ("a", "u", 1, 0.0625), None),
    Case("over a USD cap refuses", (session("a", max_usd=0.5),),
         ("a", "u", 1, 0.125), (0, 150, 0.375, 20, 0.0625)),
    Case("a cap of both refuses on the part that is passed",
         (session("a", max_tokens=10_000, max_usd=0.4),),
         ("a", "u", 1, 0.0), (0, 150, 0.375, 20, 0.0625)),
    # Session "b" has one unpriced entry: its tokens count, its unknown cost cannot.
    Case("an unpriced entry counts its tokens only", (session("b", max_tokens=31, max_usd=0.01),),
         ("b", "u", 1, 0.01), None),
    Case("an unpriced entry's tokens refuse", (session("b", max_tokens=30),),
         ("b", "u", 1, 0.0), (0, 30, 0.0, 0, 0.0)),
    # User "u" spent 180 tokens ($0.375) over sessions "a" and "b", and holds 20.
    Case("the first cap passed is the refusal, in order",
         (session("a", max_tokens=10_000), user("u", max_tokens=199), everything(max_tokens=100)),
         ("a", "u", 1, 0.0), (1, 180, 0.375, 20, 0.0625)),
    Case("every cap must pass", (session("a", max_tokens=10_000), everything(max_usd=0.9)),
         ("a", "u", 1, 0.0), (1, 380, 0.875, 60, 0.09375)),
    # User "v" spent 200 tokens and holds 40; user "u"'s hold is not theirs.
    Case("another user's holds do not count", (user("v", max_tokens=241),),
         ("c", "v", 1, 0.0), None),
    Case("a user's own holds count", (user("v", max_tokens=240),),
         ("c", "v", 1, 0.0), (0, 200, 0.5, 40, 0.03125)),
    # Everything: 380 tokens ($0.875, the unpriced entry's cost unknown), 60 held ($0.09375).
    Case("a store-wide cap counts every hold", (everything(max_tokens=440),),
         ("z", None, 1, 0.0), (0, 380, 0.875, 60, 0.09375)),
    Case("a store-wide cap met exactly", (everything(max_tokens=441, max_usd=1.0),),
         ("z", None, 1, 0.03125), None),
    # Since a day ago, user "u" spent 80 tokens ($0.125): the old entry is not counted; the
    # holds count whatever the period.
    Case("a period counts what was recorded since", (user("u", max_tokens=100, since=SINCE),),
         ("a", "u", 1, 0.0), (0, 80, 0.125, 20, 0.0625)),
    Case("a period cap met exactly", (user("u", max_tokens=101, max_usd=0.25, since=SINCE),),
         ("a", "u", 1, 0.0625), None),
    Case("a period cap in USD", (session("a", max_usd=0.1875, since=SINCE),),
         ("a", "u", 1, 0.0625), (0, 50, 0.125, 20, 0.0625)),
]  # fmt: skip


def new_hold(case: Case) -> BudgetHold:
    session_id, user_id, tokens, usd = case.hold
    return BudgetHold(session_id, tokens, usd, NOW + timedelta(hours=1), user_id=user_id)


def expected(case: Case) -> BudgetRefusal | None:
    if case.refused is None:
        return None
    which, spent_tokens, spent_usd, held_tokens, held_usd = case.refused
    return BudgetRefusal(case.limits[which], spent_tokens, spent_usd, held_tokens, held_usd)


def in_flight() -> list[BudgetHold]:
    return [
        BudgetHold(s, tokens, usd, NOW + timedelta(hours=1), user_id=u, id=f"flight-{s}")
        for s, u, tokens, usd in IN_FLIGHT
    ]


def record_world(store: HistoryStore) -> None:
    for entry in ENTRIES:
        store.record_usage(entry)
    for hold in in_flight():
        assert store.hold_budget(hold, []) is None


def world_spending(limit: BudgetLimit) -> tuple[Usage, list[BudgetHold]]:
    """What a store would read for ``limit``, read from the table's world in Python."""
    since = limit.since or datetime.min.replace(tzinfo=UTC)
    scoped = [e for e in ENTRIES if e.at >= since and counted(e, limit)]
    held = [h for h in in_flight() if h.counts_for(limit.scope, limit.key)]
    return total_of(scoped), held


def counted(entry: UsageEntry, limit: BudgetLimit) -> bool:
    if limit.scope == "session":
        return entry.session_id == limit.key
    return entry.user_id == limit.key if limit.scope == "user" else True


def mismatches(answers: Sequence[tuple[Case, BudgetRefusal | None]]) -> list[str]:
    return [
        f"{case.name}: {answer} != {expected(case)}"
        for case, answer in answers
        if answer != expected(case)
    ]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_the_rule_answers_the_table(case: Case) -> None:
    assert first_refusal(new_hold(case), case.limits, world_spending) == expected(case)


def test_every_store_answers_the_table(store: HistoryStore) -> None:
    record_world(store)
    answers = []
    for case in CASES:
        hold = new_hold(case)
        answers.append((case, store.hold_budget(hold, case.limits)))
        store.release_budget(hold.id)  # a kept hold would change the next case's world
    assert mismatches(answers) == []


def test_every_store_answers_the_table_async(store: HistoryStore) -> None:
    record_world(store)

    async def main() -> list[tuple[Case, BudgetRefusal | None]]:
        answers = []
        for case in CASES:
            hold = new_hold(case)
            answers.append((case, await store.ahold_budget(hold, case.limits)))
            await store.arelease_budget(hold.id)
        return answers

    assert mismatches(asyncio.run(main())) == []


def test_a_kept_hold_counts_and_a_refused_one_does_not(store: HistoryStore) -> None:
    # The table's answers keep or refuse; what was kept is then part of the spending.
    record_world(store)
    cap = (session("a", max_tokens=200),)
    kept = BudgetHold("a", 30, 0.0, NOW + timedelta(hours=1), user_id="u")
    assert store.hold_budget(kept, cap) is None
    refused = BudgetHold("a", 1, 0.0, NOW + timedelta(hours=1), user_id="u")
    assert store.hold_budget(refused, cap) == BudgetRefusal(cap[0], 150, 0.375, 50, 0.0625)
    assert store.hold_budget(refused, cap) == BudgetRefusal(cap[0], 150, 0.375, 50, 0.0625)
