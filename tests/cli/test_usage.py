"""``chatchain usage``: the ledger's totals as a table, an unknown cost never shown as $0."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from chatchain import UsageEntry, UsageLedger
from chatchain._money import format_usd
from chatchain.cli._commands import since_time
from chatchain.testing import OpenAITestServer
from tests.cli.conftest import Chatchain


@pytest.fixture
def spent(chatchain: Chatchain) -> Chatchain:
    """Three turns: two priced (gpt-4o-mini) in session a, one of unknown price in b by bob."""
    chatchain("ask", "--session", "a", "one")
    chatchain("ask", "--session", "a", "two")
    chatchain("ask", "--session", "b", "three", "--model", "my-local-model", "--user", "bob")
    return chatchain


def numbers(turns: int, prompt: int, completion: int, total: int, cost: float | None) -> list[str]:
    """The number cells of a row, as the table prints them."""
    price = "unknown" if cost is None else format_usd(cost)
    return [str(turns), "0", f"{prompt:,}", f"{completion:,}", f"{total:,}", price]


def test_usage_by_session_model_and_day(spent: Chatchain) -> None:
    result = spent("usage")
    assert result.exit_code == 0
    with spent.store() as store:
        report = UsageLedger(store).report(["session", "model", "day"])
    a, b = (
        numbers(
            r["turns"], r["prompt_tokens"], r["completion_tokens"], r["total_tokens"], r["cost_usd"]
        )
        for r in report.rows
    )
    t = report.total
    total = numbers(t.turns, t.prompt_tokens, t.completion_tokens, t.total_tokens, t.cost_usd)
    day = datetime.now(UTC).date().isoformat()
    assert [line.split() for line in result.output.splitlines()] == [
        ["session", "model", "day", "turns", "summaries", "prompt", "completion", "total", "cost"],
        ["a", "gpt-4o-mini", day, *a],
        ["b", "my-local-model", day, *b],
        ["TOTAL", *total],
    ]
    assert a[0] == "2" and a[-1].startswith("$0.0000")  # priced from the price tables
    assert b[-1] == total[-1] == "unknown"  # one unknown price makes the total unknown, not $0


def test_usage_by_model_only(spent: Chatchain) -> None:
    rows = [line.split()[0] for line in spent("usage", "--by", "model").output.splitlines()]
    assert rows == ["model", "gpt-4o-mini", "my-local-model", "TOTAL"]


def test_usage_of_one_session_or_one_user(spent: Chatchain) -> None:
    by_session = spent("usage", "--session", "a", "--by", "session").output.splitlines()
    assert [line.split()[:2] for line in by_session] == [
        ["session", "turns"],
        ["a", "2"],
        ["TOTAL", "2"],
    ]
    by_user = spent("usage", "--user", "bob", "--by", "user,model").output.splitlines()
    assert [line.split()[:3] for line in by_user] == [
        ["user", "model", "turns"],
        ["bob", "my-local-model", "1"],
        ["TOTAL", "1", "0"],
    ]
    assert by_user[-1].split()[-1] == "unknown"


def test_usage_since_a_day(spent: Chatchain) -> None:
    today = datetime.now(UTC).date()
    tomorrow = (today + timedelta(days=1)).isoformat()
    assert spent("usage", "--since", tomorrow).output == "No usage recorded.\n"
    lines = spent("usage", "--since", today.isoformat(), "--by", "day").output.splitlines()
    assert [line.split()[:2] for line in lines[1:]] == [[today.isoformat(), "3"], ["TOTAL", "3"]]


def test_usage_of_an_empty_ledger(chatchain: Chatchain) -> None:
    assert chatchain("usage").output == "No usage recorded.\n"


def test_usage_since_a_relative_period(chatchain: Chatchain) -> None:
    now = datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    ages = {
        "today": now,
        "yesterday": midnight - timedelta(hours=1),
        "3 days ago": midnight - timedelta(days=3),
        "10 days ago": midnight - timedelta(days=10),
    }
    with chatchain.store() as store:
        for session, at in ages.items():
            store.record_usage(UsageEntry(session.replace(" ", "-"), "gpt-4o-mini", at=at))

    def sessions(since: str) -> list[str]:
        result = chatchain("usage", "--since", since, "--by", "session")
        assert result.exit_code == 0, result.stderr
        return [line.split()[0] for line in result.output.splitlines()[1:-1]]

    assert sessions("today") == ["today"]
    assert sessions("yesterday") == ["today", "yesterday"]
    assert sessions("7d") == ["3-days-ago", "today", "yesterday"]
    assert sessions("14d") == ["10-days-ago", "3-days-ago", "today", "yesterday"]
    assert sessions("1h") == ["today"]
    assert sessions((midnight - timedelta(days=3)).date().isoformat()) == sessions("7d")


def test_since_time_reads_periods_and_days() -> None:
    now = datetime(2026, 11, 20, 15, 30, tzinfo=UTC)
    assert since_time("24h", now) == datetime(2026, 11, 19, 15, 30, tzinfo=UTC)
    assert since_time("90m", now) == datetime(2026, 11, 20, 14, 0, tzinfo=UTC)
    assert since_time(" Today ", now) == datetime(2026, 11, 20, tzinfo=UTC)
    assert since_time("yesterday", now) == datetime(2026, 11, 19, tzinfo=UTC)
    assert since_time("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="7d, 24h, 90m, today, yesterday or a day"):
        since_time("last week", now)


@pytest.mark.parametrize(
    "args", [["--by", "week"], ["--by", ","], ["--since", "last week"], ["--since", "2w"]]
)
def test_usage_refuses_bad_options(chatchain: Chatchain, args: list[str]) -> None:
    result = chatchain("usage", *args)
    assert result.exit_code == 2
    assert "Invalid value" in result.stderr


def test_usage_needs_no_key(spent: Chatchain) -> None:
    result = spent(
        "usage", "--by", "session", env={"OPENAI_API_KEY": None, "OPENAI_BASE_URL": None}
    )
    assert result.exit_code == 0
    assert result.output.splitlines()[-1].split()[:2] == ["TOTAL", "3"]
    listed = spent("sessions", "list", env={"OPENAI_API_KEY": None, "OPENAI_BASE_URL": None})
    assert listed.exit_code == 0


def test_usage_marks_estimated_tokens(chatchain: Chatchain) -> None:
    with chatchain.store() as store:
        UsageLedger(store).record(
            UsageEntry("s", "gpt-4o-mini", 8, 2, 10, requests=1, cost_usd=0.5, estimated=True)
        )
    lines = chatchain("usage", "--by", "session").output.splitlines()
    assert lines[1].split() == ["s", "1", "0", "~8", "~2", "~10", "$0.50"]
    assert lines[-1].strip() == (
        "~ estimated: 1 call was counted here, as the endpoint did not report their usage"
    )


def test_cache_hits_show_as_cached_in_the_usage_line_and_the_table(
    chatchain: Chatchain, server: OpenAITestServer
) -> None:
    cache = {"CHATCHAIN_CACHE": f"sqlite:///{chatchain.data_dir}/cache.db"}
    paid = chatchain("ask", "--session", "a", "same question", env=cache)
    hit = chatchain("ask", "--session", "b", "same question", env=cache)
    assert hit.stdout == paid.stdout == "Echo: same question\n"
    assert len(server.requests) == 1
    with chatchain.store() as store:
        [entry] = store.usage_entries(session_id="a")
    assert entry.cost_usd is not None
    saved = format_usd(entry.cost_usd)
    assert "cached" not in paid.stderr
    assert hit.stderr.startswith(f"session b, cached, saved {saved}, 0 tokens (0 prompt + 0 ")

    result = chatchain("usage", "--by", "session")
    assert [line.split() for line in result.output.splitlines()] == [
        [
            "session",
            "turns",
            "summaries",
            "prompt",
            "completion",
            "total",
            "cost",
            "cached",
            "saved",
        ],
        [
            "a",
            *numbers(
                1, entry.prompt_tokens, entry.completion_tokens, entry.total_tokens, entry.cost_usd
            ),
            "0",
            "$0.00",
        ],
        ["b", *numbers(1, 0, 0, 0, 0.0), "1", saved],
        [
            "TOTAL",
            *numbers(
                2, entry.prompt_tokens, entry.completion_tokens, entry.total_tokens, entry.cost_usd
            ),
            "1",
            saved,
        ],
    ]
