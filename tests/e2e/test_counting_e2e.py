"""Caps and windows hold for every script: the real `ChatOpenAI` against a server that bills
with a real tokenizer (a CJK character about a token, as real endpoints bill it)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from chatchain import BudgetExceeded, Chatbot, Settings
from chatchain.testing import OpenAITestServer
from tests.entry_points import each_library_way, turn

KEY = "sk-e2e-secret-0123456789abcdef"
CJK = "请用几句话解释为什么天空是蓝色的而日落是红色的。" * 8
MIXED = "Why is the sky blue? 为什么天空是蓝色的？ 🌅🌇 `print(sky.color)` " * 4  # noqa: RUF001 (CJK punctuation)


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


@each_library_way("path")
@pytest.mark.parametrize("text", [CJK, MIXED], ids=["cjk", "mixed"])
def test_a_token_cap_is_never_passed_whatever_the_script(
    server: OpenAITestServer, path: str, text: str
) -> None:
    cap = 1300  # between what 6 CJK (9 mixed) turns bill and that plus an estimated hold
    bot = Chatbot(make_settings(server, max_tokens=20, budget_total_tokens=cap))
    sent = 0
    with pytest.raises(BudgetExceeded):
        for i in range(50):  # a new session each time: the same prompt, held the same way
            turn(bot, path, f"{text} ({i})", session_id=f"capped-{i}")
            sent += 1
    entries = bot.usage_entries()
    assert len(entries) == sent > 1
    assert not any(e.estimated for e in entries)  # the ledger holds what the server billed
    assert sum(e.total_tokens for e in entries) <= cap
    bot.close()


def test_a_usd_cap_on_concurrent_cjk_turns_is_never_passed(server: OpenAITestServer) -> None:
    cap = 2.0  # at $0.001 a token: 2,000 tokens for 20 turns of ~230 asked at once
    settings = make_settings(
        server,
        max_tokens=30,
        budget_total_usd=cap,
        prices={"gpt-4o-mini": {"input": 1000, "output": 1000}},
    )
    bot = Chatbot(settings)

    async def one(i: int) -> bool:
        try:
            await bot.achat(f"{CJK} ({i})", session_id=f"c{i}")
        except BudgetExceeded:
            return False
        return True

    async def all_at_once() -> list[bool]:
        return await asyncio.gather(*(one(i) for i in range(20)))

    sent = asyncio.run(all_at_once())
    spent = sum(e.cost_usd or 0.0 for e in bot.usage_entries())
    assert 0 < sum(sent) < 20
    assert spent <= cap
    bot.close()


def test_the_token_window_bounds_what_is_billed(server: OpenAITestServer) -> None:
    window = 300
    bot = Chatbot(make_settings(server, window_tokens=window), system="S")
    server.clear()
    for i in range(8):
        bot.chat(f"{CJK[:60]} ({i})", session_id="w")
    assert bot.chain.token_counter == "o200k_base"
    prompts = [r["body"]["messages"] for r in server.requests]
    billed = [server.count_tokens(m["content"]) + 4 for m in prompts[-1]]
    system = billed[0]
    assert sum(billed[1:]) <= window  # the history and the input, as the endpoint counts them
    assert len(prompts[-1]) < len(prompts[0]) + 2 * 7  # older turns were left out
    assert system > 0
    bot.close()
