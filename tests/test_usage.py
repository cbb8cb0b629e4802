"""Usage sums, the ledger's report, and where prices come from."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from chatchain import ModelPrice, Usage, UsageEntry, UsageLedger
from chatchain.pricing import Pricer

DAY1 = datetime(2026, 3, 1, 23, 30, tzinfo=UTC)
DAY2 = DAY1 + timedelta(hours=1)


def test_sum_adds_every_count_and_keeps_unknown_cost_unknown() -> None:
    a = Usage(
        prompt_tokens=10,
        completion_tokens=5,
        total_tokens=15,
        successful_requests=1,
        cost_usd=0.25,
        latency_s=1.0,
        model="m",
        turns=1,
    )
    b = Usage(
        prompt_tokens=1,
        completion_tokens=2,
        total_tokens=3,
        successful_requests=1,
        cost_usd=0.5,
        latency_s=0.5,
        model="m",
        turns=1,
    )
    total = a + b
    assert (total.prompt_tokens, total.completion_tokens, total.total_tokens) == (11, 7, 18)
    assert total.cost_usd == 0.75
    assert total.model == "m"
    assert total.turns == 2
    unknown = a + Usage(cost_usd=None, turns=1, model="x", unpriced=1)
    assert unknown.cost_usd is None and unknown.unpriced == 1
    assert unknown.model is None
    assert "cost unknown" in str(Usage(cost_usd=None))


def test_entry_json_round_trip() -> None:
    entry = UsageEntry(
        "s", "m", 1, 2, 3, cached_tokens=1, cost_usd=None, user_id="ü", first_token_s=0.5
    )
    assert UsageEntry.from_json(entry.to_json()) == entry
    assert entry.usage().unpriced == 1 and entry.usage().cost_usd is None


def test_ledger_totals_are_exact_under_threads() -> None:
    ledger = UsageLedger()

    def record() -> None:
        for _ in range(500):
            ledger.record(UsageEntry("s", "m", total_tokens=3, cost_usd=0.5))

    threads = [threading.Thread(target=record) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.total("s").total_tokens == 6000
    assert ledger.total("s").turns == 2000
    assert ledger.total("s").cost_usd == pytest.approx(1000.0)
    ledger.record(UsageEntry("t", "m", total_tokens=1, cost_usd=0.0))
    assert ledger.total().turns == 2001


def _ledger() -> UsageLedger:
    ledger = UsageLedger()
    rows = [
        ("a", "ann", "gpt-4o-mini", 100, 0.01, DAY1, False),
        ("a", "ann", "gpt-4o-mini", 50, 0.005, DAY2, True),
        ("b", "bob", "gpt-4o", 10, 0.1, DAY2, False),
        ("b", "bob", "local", 7, None, DAY2, False),
    ]
    for sid, user, model, tokens, cost, at, summary in rows:
        ledger.record(
            UsageEntry(
                sid,
                model,
                prompt_tokens=tokens,
                total_tokens=tokens,
                cost_usd=cost,
                user_id=user,
                at=at,
                summary=summary,
            )
        )
    return ledger


def test_report_groups_by_any_keys() -> None:
    ledger = _ledger()
    by_session = ledger.report(by=["session"])
    assert [
        (r["session"], r["turns"], r["summaries"], r["total_tokens"]) for r in by_session.rows
    ] == [
        ("a", 1, 1, 150),
        ("b", 2, 0, 17),
    ]
    assert by_session.rows[0]["cost_usd"] == pytest.approx(0.015)
    assert by_session.rows[1]["cost_usd"] is None and by_session.rows[1]["unpriced"] == 1
    by_day = ledger.report(by=["day"])
    assert [(r["day"], r["total_tokens"]) for r in by_day.rows] == [
        ("2026-03-01", 100),
        ("2026-03-02", 67),
    ]
    by_model = ledger.report(by=["user", "model"])
    assert [(r["user"], r["model"]) for r in by_model.rows] == [
        ("ann", "gpt-4o-mini"),
        ("bob", "gpt-4o"),
        ("bob", "local"),
    ]
    assert ledger.report(by=["model"], user_id="ann").total.total_tokens == 150
    assert ledger.report(by=[], since=DAY2).total.total_tokens == 67
    with pytest.raises(ValueError, match="session, user, model or day"):
        ledger.report(by=["colour"])  # type: ignore[list-item]


def test_report_text_table() -> None:
    text = str(_ledger().report(by=["session", "model"]))
    lines = text.splitlines()
    assert lines[0].split() == [
        "session",
        "model",
        "turns",
        "summaries",
        "prompt",
        "completion",
        "total",
        "cost",
    ]
    assert any(line.startswith("a ") and "$0.015" in line for line in lines)
    assert any("local" in line and "unknown (1 unpriced)" in line for line in lines)
    assert lines[-1].startswith("TOTAL") and "unknown (1 unpriced)" in lines[-1]
    assert "167" in lines[-1]


def test_ledger_totals_by_user_and_session() -> None:
    ledger = _ledger()
    assert ledger.total(user_id="ann").total_tokens == 150
    assert ledger.total("b", user_id="bob").total_tokens == 17
    assert ledger.total("b", user_id="ann").total_tokens == 0
    assert ledger.total().total_tokens == 167


# -- prices ---------------------------------------------------------------------------------


def test_known_model_is_priced_by_genai_prices() -> None:
    price = Pricer().price("gpt-4o-mini", 1_000_000, 1_000_000)
    # gpt-4o-mini lists at $0.15 per million input and $0.60 per million output tokens.
    assert price.source == "genai-prices"
    assert price.cost_usd == pytest.approx(0.75)


def test_cached_tokens_are_priced_at_the_cache_rate() -> None:
    full = Pricer().price("gpt-4o-mini", 1_000_000, 0).cost_usd
    cached = Pricer().price("gpt-4o-mini", 1_000_000, 0, 1_000_000).cost_usd
    assert full is not None and cached is not None and cached < full


def test_dated_model_names_find_their_price() -> None:
    price = Pricer().price("gpt-4o-mini-2024-07-18", 1000, 1000)
    assert price.source == "genai-prices" and price.cost_usd


def test_a_price_set_in_settings_wins() -> None:
    pricer = Pricer({"gpt-4o-mini": ModelPrice(input=1.0, output=2.0)})
    assert pricer.price("gpt-4o-mini", 1_000_000, 1_000_000).cost_usd == pytest.approx(3.0)
    assert pricer.price("gpt-4o-mini", 1, 1).source == "settings"


def test_unknown_model_is_unknown_not_zero() -> None:
    price = Pricer().price("my-local-llama", 1000, 1000)
    assert price.cost_usd is None and price.source is None
    assert Pricer().price(None, 10, 10).cost_usd is None


def test_community_price_is_the_last_resort() -> None:
    price = Pricer().price("my-local-llama", 1000, 1000, community_cost=0.5)
    assert price == type(price)(0.5, "langchain-community")


def test_local_server_url_still_prices_openai_model_names() -> None:
    pricer = Pricer(base_url="http://127.0.0.1:9/v1")
    assert pricer.price("gpt-4o-mini", 1000, 0).source == "genai-prices"
    assert pricer.price("llama3.2", 1000, 0).cost_usd is None


def test_your_price_applies_to_the_dated_name_the_endpoint_answers_with() -> None:
    pricer = Pricer(
        {
            "gpt-4o-mini": ModelPrice(input=1.0, output=1.0),
            "gpt-4o": ModelPrice(input=9.0, output=9.0),
        }
    )
    dated = pricer.price("gpt-4o-mini-2024-07-18", 1_000_000, 0)
    assert dated.source == "settings" and dated.cost_usd == pytest.approx(1.0)
    renamed = pricer.price("served-name", 1_000_000, 0, configured="gpt-4o-mini")
    assert renamed.source == "settings" and renamed.cost_usd == pytest.approx(1.0)
    assert pricer.price("gpt-4o-2024-08-06", 1_000_000, 0).cost_usd == pytest.approx(9.0)


def test_estimates_are_counted_in_sums_and_marked_in_text() -> None:
    exact = UsageEntry("s", "gpt-4o-mini", 10, 5, 15, requests=1, cost_usd=0.001).usage()
    guess = UsageEntry("s", "gpt-4o-mini", 8, 2, 10, requests=1, cost_usd=0.0005, estimated=True)
    assert exact.estimated == 0 and "estimated" not in str(exact)
    assert guess.usage().estimated == 1
    total = exact + guess.usage() + guess.usage()
    assert total.estimated == 2
    assert str(total).startswith("26 prompt + 9 completion = 35 tokens (estimated), ~$0.0020,")


def test_report_marks_the_rows_that_hold_estimates() -> None:
    ledger = UsageLedger()
    ledger.record(UsageEntry("exact", "m", 10, 5, 15, requests=1, cost_usd=0.25))
    ledger.record(UsageEntry("guess", "m", 8, 2, 10, requests=1, cost_usd=0.5, estimated=True))
    report = ledger.report(by=["session"])
    assert [(r["session"], r["estimated"]) for r in report.rows] == [("exact", 0), ("guess", 1)]
    lines = str(report).splitlines()
    assert lines[2].split()[-4:] == ["10", "5", "15", "$0.25"]
    assert lines[3].split()[-4:] == ["~8", "~2", "~10", "$0.50"]
    assert lines[-2].split()[-4:] == ["~18", "~7", "~25", "$0.75"]  # the TOTAL line
    assert lines[-1] == (
        "~ estimated: 1 call was counted here, as the endpoint did not report their usage"
    )
    assert "estimated" not in str(ledger.report(by=["session"], session_id="exact"))


def test_an_answer_under_a_name_no_source_knows_is_priced_as_the_configured_model() -> None:
    # Proxies and aliases: asked for gpt-4o-mini, the endpoint answers as another name.
    price = Pricer().price("openrouter/gpt-4o-mini", 1_000_000, 1_000_000, configured="gpt-4o-mini")
    assert price.source == "configured:genai-prices" and price.cost_usd == pytest.approx(0.75)
    # A name the tables do know keeps its own price; neither known stays unknown.
    assert Pricer().price("gpt-4o", 1000, 0, configured="gpt-4o-mini").source == "genai-prices"
    unknown = Pricer().price("proxy/my-llama", 1000, 1000, configured="my-llama")
    assert unknown.cost_usd is None and unknown.source is None
