"""`chatchain.users`: tokens that authenticate, revoke and rotate; names; caps as limits.

The same behaviour on every store (Redis and PostgreSQL too) is in
tests/stores/test_users_contract.py; here the facade runs over memory and SQLite.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from langchain_core.messages.utils import count_tokens_approximately

from chatchain import (
    BudgetExceeded,
    Chatbot,
    ConfigurationError,
    InvalidInputError,
    MemoryStore,
    ModelPrice,
    Settings,
    UnknownUserError,
    UserExistsError,
)
from chatchain.budgets import BudgetLimit
from chatchain.stores import HistoryStore, SQLiteStore, as_store
from chatchain.testing import FakeChatModel, tool_call_reply
from chatchain.usage import UsageEntry
from chatchain.users import User, Users, hash_token
from tests.stores.example_store import TinyStore


@pytest.fixture(params=["memory", "sqlite"])
def users(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Users]:
    store: HistoryStore = (
        MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "chat.db")
    )
    yield Users(store)
    store.close()


def test_add_returns_a_token_that_authenticates(users: Users) -> None:
    token = users.add("alice", budget_usd=5.0, daily_usd=1.0, monthly_usd=2.5)
    assert token.startswith("cc_") and len(token) == 46
    user = users.authenticate(token)
    assert user is not None
    assert (user.name, user.budget_usd, user.daily_usd, user.monthly_usd, user.revoked) == (
        "alice",
        5.0,
        1.0,
        2.5,
        False,
    )
    assert user.created_at.tzinfo is not None
    assert users.get("alice") == user


async def test_aauthenticate_matches_authenticate(users: Users) -> None:
    token = users.add("alice")
    assert await users.aauthenticate(token) == users.authenticate(token)
    assert await users.aauthenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "cc_",
        "cc_" + "A" * 43,  # well-formed, but no one's
        "cc_" + "A" * 42,
        "cc_" + "A" * 44,
        "xx_" + "A" * 43,
        "cc_" + "!" * 43,
        " cc_" + "A" * 43,
        None,
        42,
    ],
)
def test_wrong_or_malformed_tokens_authenticate_no_one(users: Users, bad: object) -> None:
    users.add("alice")
    assert users.authenticate(bad) is None  # type: ignore[arg-type]


def test_a_token_of_one_user_is_not_another_s(users: Users) -> None:
    a, b = users.add("alice"), users.add("bob")
    assert a != b
    assert [users.authenticate(t).name for t in (a, b)] == ["alice", "bob"]  # type: ignore[union-attr]


def test_revoked_token_authenticates_no_one(users: Users) -> None:
    token = users.add("alice")
    users.revoke("alice")
    assert users.authenticate(token) is None
    assert users.get("alice").revoked  # type: ignore[union-attr]


def test_rotate_invalidates_the_old_token_and_unrevokes(users: Users) -> None:
    old = users.add("alice", daily_usd=1.0)
    users.revoke("alice")
    new = users.rotate("alice")
    assert new != old
    assert users.authenticate(old) is None
    user = users.authenticate(new)
    assert user is not None and not user.revoked and user.daily_usd == 1.0


@pytest.mark.parametrize("action", ["revoke", "rotate"])
def test_unknown_user_is_refused_with_advice(users: Users, action: str) -> None:
    with pytest.raises(UnknownUserError, match=r"no user 'ghost'.*chatchain users list"):
        getattr(users, action)("ghost")
    with pytest.raises(UnknownUserError):
        users.set_caps("ghost", daily_usd=1.0)


@pytest.mark.parametrize(
    "name", ["a", "alice", "Alice.Smith", "alice@example.com", "a-b_c", "0", "x" * 64]
)
def test_good_names(users: Users, name: str) -> None:
    users.add(name)
    assert [u.name for u in users.list()] == [name]


@pytest.mark.parametrize(
    "name",
    ["", "x" * 65, "alice:1", "_alice", ".alice", "-a", "@a", "al ice", "alice\n", "ålice", "a/b"],
)
def test_bad_names_are_refused(users: Users, name: str) -> None:
    with pytest.raises(InvalidInputError, match="cannot name a user: use 1 to 64 letters"):
        users.add(name)
    assert users.list() == []


def test_duplicate_name_is_refused_and_keeps_the_first(users: Users) -> None:
    token = users.add("alice", daily_usd=1.0)
    with pytest.raises(UserExistsError, match=r"user 'alice' already.*users rotate alice"):
        users.add("alice", daily_usd=9.0)
    assert users.authenticate(token).daily_usd == 1.0  # type: ignore[union-attr]
    assert len(users.list()) == 1


@pytest.mark.parametrize("cap", [-1.0, float("nan"), float("inf"), "1", True])
def test_bad_caps_are_refused(users: Users, cap: object) -> None:
    with pytest.raises(InvalidInputError, match="daily_usd cap must be"):
        users.add("alice", daily_usd=cap)  # type: ignore[arg-type]
    assert users.list() == []


def test_set_caps_changes_only_the_caps_given(users: Users) -> None:
    users.add("alice", budget_usd=5.0, daily_usd=1.0)
    user = users.set_caps("alice", daily_usd=None, monthly_usd=3)
    assert (user.budget_usd, user.daily_usd, user.monthly_usd) == (5.0, None, 3.0)
    assert users.get("alice") == user


def test_list_is_oldest_first(users: Users) -> None:
    for name in ("carol", "alice", "bob"):
        users.add(name)
    assert [u.name for u in users.list()] == ["carol", "alice", "bob"]


def test_sqlite_keeps_only_the_token_s_hash(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "chat.db")
    users = Users(store)
    token = users.add("alice")
    rotated = users.rotate("alice")
    store.close()
    raw = (tmp_path / "chat.db").read_bytes()
    conn = sqlite3.connect(tmp_path / "chat.db")
    rows = conn.execute("SELECT * FROM users").fetchall()
    conn.close()
    assert token[3:].encode() not in raw and rotated[3:].encode() not in raw
    assert all(token not in str(row) and rotated not in str(row) for row in rows)
    assert [row[1] for row in rows] == [hash_token(rotated)]


def test_memory_store_keeps_only_the_token_s_hash() -> None:
    store = MemoryStore()
    token = Users(store).add("alice")
    assert token not in repr(vars(store)) and hash_token(token) in repr(vars(store))


def test_a_store_without_users_is_refused() -> None:
    with (
        closing(as_store(TinyStore())) as store,
        pytest.raises(ConfigurationError, match="keeps no users: use memory://"),
    ):
        Users(store)


def test_limits_are_lifetime_day_and_month_in_utc() -> None:
    user = User("alice", datetime(2025, 1, 1, tzinfo=UTC), 5.0, 1.0, 2.0)
    now = datetime(2026, 3, 15, 23, 30, tzinfo=UTC)
    assert Users(MemoryStore()).limits(user, now) == [
        BudgetLimit("user", "alice", 5.0, label="user alice's budget"),
        BudgetLimit(
            "user",
            "alice",
            1.0,
            since=datetime(2026, 3, 15, tzinfo=UTC),
            label="user alice's daily cap",
        ),
        BudgetLimit(
            "user",
            "alice",
            2.0,
            since=datetime(2026, 3, 1, tzinfo=UTC),
            label="user alice's monthly cap",
        ),
    ]


def test_limits_take_the_utc_day_of_a_local_time() -> None:
    from datetime import timezone

    user = User("bob", datetime(2025, 1, 1, tzinfo=UTC), daily_usd=1.0)
    # 01:00 on April 1st at UTC+2 is still March 31st in UTC.
    local = datetime(2026, 4, 1, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    (daily,) = Users(MemoryStore()).limits(user, local)
    assert daily.since == datetime(2026, 3, 31, tzinfo=UTC)


def test_no_caps_no_limits() -> None:
    user = User("bob", datetime(2025, 1, 1, tzinfo=UTC))
    assert Users(MemoryStore()).limits(user) == []


# -- per-call limits: a user's caps on their turns --------------------------------------------

PRICES = {"gpt-4o-mini": ModelPrice(input=1.0, output=1.0)}  # 1 USD per million tokens


@pytest.fixture
def capped(settings: Settings, fake: FakeChatModel) -> tuple[Chatbot, Users]:
    values = {**settings.model_dump(), "max_tokens": 20, "prices": PRICES}
    bot = Chatbot(Settings(**values), llm=fake)
    return bot, Users(bot.store)


def _spend(bot: Chatbot, user: str, usd: float, at: datetime) -> None:
    bot.store.record_usage(
        UsageEntry("earlier", "gpt-4o-mini", total_tokens=10, cost_usd=usd, user_id=user, at=at)
    )


def _today() -> datetime:
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def test_a_daily_cap_refuses_before_sending(
    capped: tuple[Chatbot, Users], fake: FakeChatModel
) -> None:
    bot, users = capped
    users.add("alice", daily_usd=0.0002)
    alice = users.get("alice")
    assert alice is not None
    turns = 0
    with pytest.raises(BudgetExceeded) as info:
        for _ in range(50):
            bot.chat("hi there", session_id="s", user_id="alice", limits=users.limits(alice))
            turns += 1
    assert 1 <= turns < 50
    calls, history, spent = len(fake.calls), bot.history("s"), bot.usage(user_id="alice")
    assert spent.cost_usd is not None and spent.cost_usd <= 0.0002
    error = info.value
    assert (error.scope, error.key, error.limit_usd) == ("user", "alice", 0.0002)
    message = str(error)
    assert message.startswith("Budget exceeded: user alice's daily cap of $0.00020 is reached;")
    assert "Nothing was sent or stored. Wait for the next period, or raise the cap" in message
    # Nothing sent, stored or counted; other users and calls without limits go on.
    with pytest.raises(BudgetExceeded):
        bot.chat("again", session_id="s", user_id="alice", limits=users.limits(alice))
    assert (len(fake.calls), bot.history("s"), bot.usage(user_id="alice")) == (
        calls,
        history,
        spent,
    )
    assert bot.chat("hi", session_id="s2", user_id="alice").text == "Echo: hi"


def test_yesterday_does_not_count_but_the_lifetime_budget_does(
    capped: tuple[Chatbot, Users], fake: FakeChatModel
) -> None:
    bot, users = capped
    users.add("alice", daily_usd=0.01, monthly_usd=5.0, budget_usd=1.0)
    alice = users.get("alice")
    assert alice is not None
    _spend(bot, "alice", 0.5, _today() - timedelta(seconds=1))
    assert bot.chat("hi", user_id="alice", limits=users.limits(alice)).text == "Echo: hi"
    _spend(bot, "alice", 0.5, _today() - timedelta(days=40))  # lifetime now 1.0+
    with pytest.raises(BudgetExceeded, match=r"user alice's budget of \$1\.00 is reached"):
        bot.chat("hi", user_id="alice", limits=users.limits(alice))
    assert len(fake.calls) == 1


def test_a_monthly_cap_refuses_once_this_month_reaches_it(
    capped: tuple[Chatbot, Users], fake: FakeChatModel
) -> None:
    bot, users = capped
    users.add("bob", monthly_usd=1.0)
    bob = users.get("bob")
    assert bob is not None
    month = _today().replace(day=1)
    _spend(bot, "bob", 5.0, month - timedelta(seconds=1))  # last month: not counted
    assert bot.chat("hi", user_id="bob", limits=users.limits(bob)).text == "Echo: hi"
    _spend(bot, "bob", 1.0, month)
    with pytest.raises(BudgetExceeded, match=r"user bob's monthly cap of \$1\.00 is reached"):
        bot.chat("hi", user_id="bob", limits=users.limits(bob))
    assert len(fake.calls) == 1


@pytest.mark.parametrize("how", ["chat", "achat", "stream", "astream", "chain"])
def test_every_entry_point_checks_the_call_s_limits(
    capped: tuple[Chatbot, Users], fake: FakeChatModel, how: str
) -> None:
    bot, users = capped
    users.add("alice", daily_usd=0.5)
    alice = users.get("alice")
    assert alice is not None
    _spend(bot, "alice", 0.5, _today())
    limits = users.limits(alice)
    entries = bot.store.usage_entries()

    async def consume() -> None:
        if how == "achat":
            await bot.achat("hi", session_id="s", user_id="alice", limits=limits)
        else:
            async for _ in bot.astream("hi", session_id="s", user_id="alice", limits=limits):
                pass

    with pytest.raises(BudgetExceeded, match=r"user alice's daily cap of \$0\.50"):
        if how == "chat":
            bot.chat("hi", session_id="s", user_id="alice", limits=limits)
        elif how == "stream":
            list(bot.stream("hi", session_id="s", user_id="alice", limits=limits))
        elif how == "chain":
            configurable = {"session_id": "s", "user_id": "alice", "limits": limits}
            bot.chain.invoke({"input": "hi"}, config={"configurable": configurable})
        else:
            asyncio.run(consume())
    assert fake.calls == []
    assert bot.history("s") == []
    assert bot.store.usage_entries() == entries


def test_a_user_s_cap_needs_their_user_id(
    capped: tuple[Chatbot, Users], fake: FakeChatModel
) -> None:
    bot, users = capped
    users.add("alice", daily_usd=1.0)
    limits = users.limits(users.get("alice"))  # type: ignore[arg-type]
    for user_id in (None, "bob"):
        with pytest.raises(InvalidInputError, match="pass user_id='alice' with it"):
            bot.chat("hi", user_id=user_id, limits=limits)
    with pytest.raises(InvalidInputError, match="limits must be a list of BudgetLimit"):
        bot.chat("hi", limits=[{"max_usd": 1.0}])  # type: ignore[list-item]
    assert fake.calls == [] and bot.history() == []


def test_a_call_s_limits_size_the_reply_without_a_budget(settings: Settings) -> None:
    fake = FakeChatModel(model_name="gpt-4o-mini", replies=["word " * 200])
    bot = Chatbot(settings, llm=fake)  # no budget of its own: the call's limit alone
    limit = BudgetLimit("session", "s", max_tokens=60, label="the demo's cap")
    reply = bot.chat("hi", session_id="s", limits=[limit])
    assert 0 < len(reply.text) < 4 * 60  # sent with max_tokens cut to what the cap had left
    assert any("that is all the demo's cap (60 tokens) had left" in n for n in reply.notices)
    assert bot.store.usage_total("session", "s").total_tokens <= 60


def _add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def test_a_call_s_cap_holds_each_call_of_a_tool_turn(settings: Settings) -> None:
    values = {**settings.model_dump(), "max_tokens": 60}
    probe = FakeChatModel(
        model_name="gpt-4o-mini", replies=[tool_call_reply(("_add", {"a": 1, "b": 2})), "3"]
    )
    Chatbot(Settings(**values), llm=probe, tools=[_add]).chat("1+2?", session_id="s")
    first = count_tokens_approximately(probe.calls[0], tools=probe.tools_of_calls[0])
    cap = BudgetLimit("session", "s", max_tokens=first + 60, label="the demo's cap")
    fake = FakeChatModel(
        model_name="gpt-4o-mini", replies=[tool_call_reply(("_add", {"a": 1, "b": 2})), "3"]
    )
    bot = Chatbot(Settings(**values), llm=fake, tools=[_add])  # no budget of its own
    with pytest.raises(BudgetExceeded, match="the demo's cap of"):
        bot.chat("1+2?", session_id="s", limits=[cap])
    assert len(fake.calls) == 1  # the second call was never sent
    # The round that ran is kept (a tool turn that fails keeps it), the reply interrupted.
    history = bot.history("s")
    assert [m.type for m in history] == ["human", "ai", "tool", "ai"]
    assert history[-1].response_metadata["interrupted"] is True
    assert bot.ledger.total().total_tokens <= first + 60
