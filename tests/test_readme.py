"""The README's Python examples run as written, against chatchain's OpenAI-compatible server.

Each ```python block runs in turn in one namespace (later blocks use what earlier ones made),
from an empty folder, with the real `ChatOpenAI` talking to `OpenAITestServer` through
``OPENAI_BASE_URL``, as a newcomer would run them offline. A block may be skipped only by an
HTML comment right before it, ``<!-- not-run: why -->``. After a block, the checks registered
for it below assert what it did.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import chatchain.chain
from chatchain import Chatbot
from chatchain.stores import MemoryStore
from chatchain.testing import OpenAITestServer

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(?:<!--\s*not-run:(?P<why>.*?)-->\s*\n)?```python\n(?P<code>.*?)```", re.S)


@dataclass(frozen=True)
class Block:
    line: int
    code: str
    skip_reason: str | None


def readme_blocks(text: str) -> list[Block]:
    """The ```python blocks of ``text``, with the line each starts on and why it is skipped."""
    return [
        Block(
            line=text.count("\n", 0, match.start("code")) + 1,
            code=match["code"],
            skip_reason=None if match["why"] is None else match["why"].strip(),
        )
        for match in BLOCK.finditer(text)
    ]


def _tour(ns: dict[str, Any], out: str) -> None:
    bot = ns["bot"]
    assert "Echo: Hi! I'm Bob" in out and "Echo: Tell me a joke" in out
    assert ns["reply"].usage.total_tokens > 0
    assert ns["stream"].usage is not None and ns["stream"].usage.first_token_s is not None
    assert bot.history("dp123") == []  # the block ends with bot.delete("dp123")
    assert bot.usage("dp123").turns == 3  # what a reset session spent stays in the ledger


def _async_tour(ns: dict[str, Any], out: str) -> None:
    bot = ns["bot"]
    assert [m.text for m in bot.history("a")] == [
        "hi",
        "Echo: hi",
        "hi again",
        "Echo: hi again",
        "one",
        "Echo: one",
    ]
    assert [m.text for m in bot.history("b")] == ["two", "Echo: two"]
    assert "Echo: hi again" in out and "['Echo: one', 'Echo: two']" in out


def _chain(ns: dict[str, Any], out: str) -> None:
    messages = ns["get_message_history"]("dp123").messages
    assert [m.text for m in messages[-2:]] == ["hi", "Echo: hi"]
    assert ns["cb"].total_tokens > 0  # the user's own get_openai_callback metered the call
    assert ns["chain"].ledger.total("dp123").turns == 1


def _costs(ns: dict[str, Any], out: str) -> None:
    bot = ns["bot"]
    assert bot.usage(user_id="bob").turns == 1
    assert bot.usage(user_id="bob").cost_usd is not None
    assert "dp123" in out and "gpt-4o-mini" in out
    assert Path("chat.db").exists()  # the SQLite store, in the working folder


def _cache(ns: dict[str, Any], out: str) -> None:
    usage = ns["reply"].usage
    assert (usage.cached_turns, usage.successful_requests, usage.cost_usd) == (1, 0, 0.0)
    assert usage.saved_usd > 0
    assert [m.text for m in ns["bot"].history("b")][-1] == ns["reply"].text
    assert Path("cache.db").exists()


def _tools(ns: dict[str, Any], out: str) -> None:
    [call] = ns["reply"].tool_runs
    assert (call.name, call.args, call.status) == ("get_weather", {"city": "Oslo"}, "success")
    assert "ToolStarted(" in out and "ToolFinished(" in out
    assert [m.type for m in ns["bot"].history("trip")][:4] == ["human", "ai", "tool", "ai"]
    assert type(ns["trip"]).__name__ == "Trip"


def _client_tools(ns: dict[str, Any], out: str) -> None:
    [call] = ns["asked"].message.tool_calls
    assert call["name"] == "weather" and ns["asked"].tool_runs == ()  # never run here
    assert [m.type for m in ns["client_bot"].history("mine")] == ["human", "ai", "tool", "ai"]


def _testing(ns: dict[str, Any], out: str) -> None:
    assert ns["bot"].history("s")[-1].text == "Echo: hi"


# What each block must have done, keyed by a line that only that block holds.
CHECKS: dict[str, Callable[[dict[str, Any], str], None]] = {
    'bot.chat("Hi! I\'m Bob", session_id="dp123")': _tour,
    "async def main():": _async_tour,
    "chain = create_chat_chain(": _chain,
    'bot.chat("hi", session_id="dp123", user_id="bob")': _costs,
    'bot = Chatbot(Settings(cache="sqlite:///cache.db"))': _cache,
    "bot = Chatbot(Settings(), tools=[get_weather])": _tools,
    "client_bot = Chatbot(Settings())": _client_tools,
    "bot = Chatbot(llm=FakeChatModel(": _testing,
}


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenAITestServer]:
    # tests/conftest.py already removed OPENAI_* and CHATCHAIN_* and moved to an empty folder.
    # The examples' session "dp123" in a default store of their own, as in a new process: other
    # tests run in this process before (pytest-xdist's workers, in any order).
    monkeypatch.setattr(chatchain.chain, "_default_store", MemoryStore())
    with OpenAITestServer() as server:
        server.add_tool_rule("get_weather", {"city": "Oslo"})  # the tools example's call
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        yield server


def test_the_readme_has_the_examples_it_promises() -> None:
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    run = [block for block in blocks if block.skip_reason is None]
    for key in CHECKS:
        assert any(key in block.code for block in run), f"no README example runs {key!r}"
    assert all(block.skip_reason for block in blocks if block not in run)  # a reason each


def test_the_readme_examples_run(
    endpoint: OpenAITestServer, capsys: pytest.CaptureFixture[str]
) -> None:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    checked = set()
    bots: list[Chatbot] = []  # the examples' bots, closed at the end (their stores, caches)
    try:
        for block in readme_blocks(README.read_text(encoding="utf-8")):
            if block.skip_reason is not None:
                continue
            # Compiled as a script is (no top-level await), named after its place in the README.
            code = compile(block.code, f"README.md, block at line {block.line}", "exec")
            exec(code, namespace)
            bots += [v for v in namespace.values() if isinstance(v, Chatbot) and v not in bots]
            out = capsys.readouterr().out
            for key, check in CHECKS.items():
                if key in block.code:
                    check(namespace, out)
                    checked.add(key)
    finally:
        for bot in bots:
            bot.close()
    assert checked == set(CHECKS)
    assert endpoint.requests  # the examples talked to the server, not to a real endpoint


def test_a_top_level_await_is_refused_as_in_a_script() -> None:
    # Why the async example wraps its awaits in a function: a script cannot await at top level.
    [block] = readme_blocks("```python\nreply = await bot.achat('hi', session_id='a')\n```\n")
    with pytest.raises(SyntaxError):
        compile(block.code, "README.md", "exec")
