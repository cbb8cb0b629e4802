"""A context overflow on every store: the retry sends half of what overflowed (the window's
reads and the running summary come from the store), through the real `ChatOpenAI` against a
test server that refuses in LiteLLM's words. Sync, streamed and async turns alike.
"""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage

from chatchain import Chatbot, Settings
from chatchain.stores import HistoryStore, Summary
from chatchain.testing import OpenAITestServer
from chatchain.window import summary_message
from tests.entry_points import turn

SYSTEM = "Be brief."


def _tokens(server: OpenAITestServer, texts: list[str]) -> int:
    return 3 + sum(server.count_tokens(text) + 4 for text in texts)


@pytest.mark.parametrize("way", ["chat", "astream"])
def test_the_retry_sends_half_of_the_history_that_overflowed(store: HistoryStore, way: str) -> None:
    turns = [m for i in range(4) for m in (HumanMessage(f"q{i}"), AIMessage(f"Echo: q{i}"))]
    store.append("s", turns)
    # A running summary that covers nothing yet: it leads the history, and stays on the retry.
    store.set_summary("s", Summary("Ann likes tea.", covers=0))
    summary = summary_message("Ann likes tea.").text
    # The window fits the summary and the newest 2 turns with the input, not all 4 turns.
    window = _tokens(OpenAITestServer(), [SYSTEM, summary, *[m.text for m in turns[4:]], "q4"])
    with OpenAITestServer(context_window=window, overflow_wording="litellm") as server:
        settings = Settings(api_key="sk-test", base_url=server.base_url, max_retries=0)
        bot = Chatbot(settings, store=store, system=SYSTEM)

        done = turn(bot, way, "q4")
        text, notices = done.text, done.notices

        sent = [[m["content"] for m in r["body"]["messages"]] for r in server.requests]
    assert text == "Echo: q4"
    assert sent == [
        [SYSTEM, summary, *[m.text for m in turns], "q4"],
        [SYSTEM, summary, *[m.text for m in turns[4:]], "q4"],
    ]
    assert len(notices) == 1 and "newest 5 of the 9 earlier messages" in notices[0]
    assert [m.text for m in store.load("s")] == [*[m.text for m in turns], "q4", "Echo: q4"]
