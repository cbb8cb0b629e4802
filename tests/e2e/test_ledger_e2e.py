"""The usage ledger end to end: real `ChatOpenAI` against the test server, priced and persisted."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from genai_prices import Usage as PriceUsage
from genai_prices import calc_price

from chatchain import BudgetExceeded, Chatbot, ConfigurationError, ModelPrice, Settings
from chatchain.errors import EndpointConnectionError
from chatchain.testing import Fault, OpenAITestServer, echo_reply
from chatchain.window import SUMMARY_REQUEST_MARK

KEY = "sk-e2e-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAITestServer]:
    with OpenAITestServer() as server:
        yield server


def make_settings(server: OpenAITestServer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_key": KEY,
        "base_url": server.base_url,
        "model": "gpt-4o-mini",
        "max_retries": 0,
        "timeout": 5.0,
        "window_turns": None,
        "window_tokens": None,
        "summarize": False,
    }
    values.update(overrides)
    return Settings(**values)


def billed(server: OpenAITestServer, request: dict[str, Any]) -> tuple[int, int]:
    """The prompt and completion tokens the server reported for one request."""
    messages = request["body"]["messages"]
    prompt = sum(server.count_tokens(m["content"]) + 4 for m in messages) + 3
    return prompt, server.count_tokens(echo_reply(messages))


def list_price(prompt: int, completion: int, model: str = "gpt-4o-mini") -> float:
    usage = PriceUsage(input_tokens=prompt, output_tokens=completion)
    return float(calc_price(usage, model, provider_id="openai").total_price)


def test_every_path_leaves_one_exact_entry(server: OpenAITestServer) -> None:
    server.clear()
    bot = Chatbot(make_settings(server))

    async def more() -> None:
        await bot.achat("async hello", session_id="b", user_id="ann")
        assert "".join(
            [p async for p in bot.astream("async stream", session_id="b", user_id="ann")]
        )
        await bot.achat_many([(f"g{i}", "word " * (i + 1)) for i in range(4)], user_id="bob")

    bot.chat("plain hello", session_id="a", user_id="ann")
    assert "".join(bot.stream("streamed hello", session_id="a", user_id="ann"))
    asyncio.run(more())

    entries = bot.usage_entries()
    assert len(entries) == len(server.requests) == 8
    total_prompt = total_completion = 0
    for request in server.requests:
        prompt, completion = billed(server, request)
        total_prompt += prompt
        total_completion += completion
    assert sum(e.prompt_tokens for e in entries) == total_prompt
    assert sum(e.completion_tokens for e in entries) == total_completion
    for entry in entries:
        assert entry.model == "gpt-4o-mini" and entry.price_source == "genai-prices"
        assert entry.cost_usd == pytest.approx(
            list_price(entry.prompt_tokens, entry.completion_tokens)
        )
        assert entry.requests == 1 and not entry.estimated and not entry.summary
    streamed = [e for e in entries if e.first_token_s is not None]
    assert len(streamed) == 2
    assert bot.usage(user_id="ann").turns == 4 and bot.usage(user_id="bob").turns == 4
    assert bot.usage().total_tokens == total_prompt + total_completion


def test_summary_calls_are_entries_of_their_own(server: OpenAITestServer) -> None:
    server.clear()
    bot = Chatbot(make_settings(server, window_turns=1, window_tokens=None, summarize=True))
    for i in range(5):
        bot.chat(f"fact number {i}", session_id="s")
    entries = bot.usage_entries(session_id="s")
    summaries = [e for e in entries if e.summary]
    assert summaries, "a summary was due"
    assert len(entries) == len(server.requests)
    assert bot.usage("s").summaries == len(summaries) and bot.usage("s").turns == 5
    assert all(e.cost_usd and e.prompt_tokens > 0 for e in summaries)


def max_tokens(body: dict[str, Any]) -> Any:
    return body.get("max_completion_tokens", body.get("max_tokens"))


def test_summaries_have_their_own_model_and_max_tokens(server: OpenAITestServer) -> None:
    # CHATCHAIN_MAX_TOKENS caps turns only: a low one no longer cuts the summaries short.
    server.clear()
    settings = make_settings(
        server,
        window_turns=1,
        summarize=True,
        max_tokens=5,
        summary_model="gpt-4.1-nano",
        summary_tokens=200,
    )
    bot = Chatbot(settings)
    for i in range(6):
        bot.chat(f"fact number {i}: " + "the sky is blue. " * 10, session_id="s")
    bodies = [r["body"] for r in server.requests]
    summaries = [b for b in bodies if b["messages"][-1]["content"].startswith(SUMMARY_REQUEST_MARK)]
    turns = [b for b in bodies if b not in summaries]
    assert summaries and len(turns) == 6
    assert {(b["model"], max_tokens(b)) for b in summaries} == {("gpt-4.1-nano", 200)}
    assert {(b["model"], max_tokens(b)) for b in turns} == {("gpt-4o-mini", 5)}
    summary = bot.summary("s")
    assert summary is not None and 4 * 5 < len(summary) <= 4 * 200
    entries = [e for e in bot.usage_entries(session_id="s") if e.summary]
    assert {e.model for e in entries} == {"gpt-4.1-nano"} and len(entries) == len(summaries)


def test_a_price_set_in_settings_wins(server: OpenAITestServer) -> None:
    server.clear()
    prices = {"gpt-4o-mini": ModelPrice(input=100.0, output=200.0)}
    bot = Chatbot(make_settings(server, prices=prices))
    reply = bot.chat("hello", session_id="p")
    prompt, completion = billed(server, server.requests[0])
    assert reply.usage.cost_usd == pytest.approx((prompt * 100 + completion * 200) / 1e6)
    assert bot.usage_entries()[0].price_source == "settings"


def test_an_unknown_model_costs_unknown_not_zero(server: OpenAITestServer) -> None:
    server.clear()
    bot = Chatbot(make_settings(server, model="my-finetune-xyz"))
    reply = bot.chat("hello", session_id="u")
    assert reply.usage.total_tokens > 0
    assert reply.usage.cost_usd is None and reply.usage.unpriced == 1
    assert bot.usage().cost_usd is None
    report = bot.usage_report(by=["model"])
    assert report.rows[0]["cost_usd"] is None
    assert "unknown (1 unpriced)" in str(report)


def test_a_stream_cut_before_its_usage_chunk_is_estimated(server: OpenAITestServer) -> None:
    server.clear()
    bot = Chatbot(make_settings(server))
    server.queue_replies("one two three four five six")
    server.add_fault(Fault(cut_after=3))
    with pytest.raises(EndpointConnectionError):
        list(bot.stream("count", session_id="cut"))
    (entry,) = bot.usage_entries(session_id="cut")
    prompt, _ = billed(server, server.requests[0])
    assert entry.estimated
    # gpt-4o-mini's prompt is counted exactly: what the server would have billed.
    assert entry.prompt_tokens == prompt
    assert entry.completion_tokens > 0 and entry.cost_usd


def test_ledger_survives_a_restart_and_adds_up(server: OpenAITestServer, tmp_path: Path) -> None:
    server.clear()
    url = f"sqlite:///{tmp_path / 'chat.db'}"
    turns = []
    with Chatbot(make_settings(server, store_url=url)) as bot:
        for i in range(3):
            turns.append(bot.chat(f"question {i}", session_id="r", user_id="ann").usage)
        entries = bot.usage_entries()
    with Chatbot(make_settings(server, store_url=url)) as again:
        assert again.usage_entries() == entries
        total = again.usage("r")
        assert total.total_tokens == sum(u.total_tokens for u in turns)
        assert total.cost_usd == pytest.approx(sum(u.cost_usd or 0 for u in turns))
        assert again.usage(user_id="ann").turns == 3
        again.chat("one more", session_id="r", user_id="ann")
        assert again.usage("r").turns == 4


def test_a_usd_budget_stops_the_request_before_it_reaches_the_server(
    server: OpenAITestServer,
) -> None:
    server.clear()
    bot = Chatbot(make_settings(server, max_tokens=50, budget_session_usd=0.0001))
    with pytest.raises(BudgetExceeded, match=r"\$0\.0001"):
        for i in range(100):
            bot.chat(f"question {i} " * 10, session_id="b")
    sent = len(server.requests)
    assert sent == len(bot.usage_entries()) >= 1
    assert bot.usage("b").cost_usd is not None and bot.usage("b").cost_usd <= 0.0001
    with pytest.raises(BudgetExceeded):
        bot.chat("one more", session_id="b")
    assert len(server.requests) == sent
    body = server.requests[0]["body"]
    assert 50 in (body.get("max_tokens"), body.get("max_completion_tokens"))


def sent_max_tokens(request: dict[str, Any]) -> int | None:
    body = request["body"]
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if isinstance(value, int) else None


def test_an_answer_under_another_name_is_held_to_a_usd_cap() -> None:
    # A proxy asked for gpt-4o-mini answers as openrouter/gpt-4o-mini, a name no price table
    # knows. Before: every entry cost "unknown", the cap skipped them, 60 of 60 turns ran.
    with OpenAITestServer(reply=lambda m: "word " * 200) as s:
        s.add_fault(Fault(answer_model="openrouter/gpt-4o-mini", times=100))
        bot = Chatbot(make_settings(s, max_tokens=100, budget_total_usd=0.0005))
        turns = 0
        with pytest.raises(BudgetExceeded, match=r"\$0\.0005"):
            for i in range(60):
                bot.chat(f"question {i}", session_id=f"s{i % 3}")
                turns += 1
        entries = bot.usage_entries()
        assert 1 <= turns < 60 and len(entries) == turns == len(s.requests)
        for entry in entries:
            assert entry.model == "openrouter/gpt-4o-mini"
            assert entry.price_source == "configured:genai-prices"
            assert entry.cost_usd == pytest.approx(
                list_price(entry.prompt_tokens, entry.completion_tokens)
            )
        spent = sum(list_price(e.prompt_tokens, e.completion_tokens) for e in entries)
        assert spent <= 0.0005 and bot.usage().cost_usd == pytest.approx(spent)


def test_an_unknown_answer_of_an_unknown_model_is_refused_under_a_usd_cap() -> None:
    with OpenAITestServer() as s:
        s.add_fault(Fault(answer_model="proxy/my-finetune", times=100))
        bot = Chatbot(make_settings(s, model="my-finetune", budget_total_usd=1.0))
        with pytest.raises(ConfigurationError, match="price of model 'my-finetune'"):
            bot.chat("hello", session_id="u")
        assert s.requests == [] and bot.usage_entries() == []


def test_without_max_tokens_each_call_asks_for_what_the_budget_can_pay() -> None:
    # Long replies and no CHATCHAIN_MAX_TOKENS. Before: each turn held a 1,000-token reply
    # but was sent without max_tokens, so spend passed the cap.
    with OpenAITestServer(reply=lambda m: "lorem ipsum " * 2000) as s:
        bot = Chatbot(make_settings(s, budget_session_usd=0.002))
        notices: list[tuple[str, ...]] = []
        with pytest.raises(BudgetExceeded, match="CHATCHAIN_BUDGET_SESSION_USD"):
            for i in range(20):
                if i % 2:  # streamed and plain turns alike
                    with bot.stream(f"question {i}", session_id="long") as stream:
                        assert "".join(stream)
                    notices.append(stream.notices)
                else:
                    notices.append(bot.chat(f"question {i}", session_id="long").notices)
        asked = [sent_max_tokens(r) for r in s.requests]
        entries = bot.usage_entries()
        assert len(asked) == len(entries) == len(notices) >= 2
        # Every request carried a limit; the last ones were cut to what the cap had left.
        assert asked[0] == 1000 and all(a is not None and a <= 1000 for a in asked)
        assert asked[-1] is not None and asked[-1] < 1000
        for entry, limit in zip(entries, asked, strict=True):
            assert entry.completion_tokens == limit  # the server stopped at the limit
        spent = sum(list_price(e.prompt_tokens, e.completion_tokens) for e in entries)
        assert spent <= 0.002
        assert "cut at 1,000 tokens" in notices[0][0]
        assert "CHATCHAIN_MAX_TOKENS" in notices[0][0]
        assert f"cut at {asked[-1]:,} tokens" in notices[-1][0]
        assert "session 'long'" in notices[-1][0]
