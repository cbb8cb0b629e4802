"""What a context-overflow retry sends (issue 18, item 7), through the real `ChatOpenAI`.

Four short turns, then a fifth that the endpoint refuses as over its context window (the
largest prompt the four turns sent is the window), for several history windows. Prints, per
window, the messages of each request of the fifth turn and how the turn ended. Runs in a few
seconds, over loopback only::

    .venv/bin/python benchmarks/overflow_retry.py

It runs against older chatchain checkouts too (their test server refuses in OpenAI's words;
this one in LiteLLM's ``ContextWindowExceededError``).
"""

from __future__ import annotations

import inspect
from typing import Any

from chatchain import Chatbot, ChatChainError, Settings
from chatchain.testing import OpenAITestServer

SYSTEM = "Be brief."
WINDOWS = [(6, 3000), (4, 3000), (10, None), (None, None)]  # (turns, tokens); 6/3000: default


def window_tokens(server: OpenAITestServer) -> int:
    texts = [SYSTEM] + [t for i in range(3) for t in (f"q{i}", f"Echo: q{i}")] + ["q3"]
    return 3 + sum(server.count_tokens(text) + 4 for text in texts)


def run(turns: int | None, tokens: int | None) -> str:
    options: dict[str, Any] = {"context_window": window_tokens(OpenAITestServer())}
    if "overflow_wording" in inspect.signature(OpenAITestServer).parameters:
        options["overflow_wording"] = "litellm"
    with OpenAITestServer(**options) as server:
        settings = Settings(
            api_key="sk-bench",  # type: ignore[arg-type]  # pydantic makes it a SecretStr
            base_url=server.base_url,
            max_retries=0,
            window_turns=turns,
            window_tokens=tokens,
            summarize=turns is not None,
        )
        bot = Chatbot(settings, system=SYSTEM)
        for i in range(4):
            bot.chat(f"q{i}", session_id="s")
        try:
            bot.chat("q4", session_id="s")
            outcome = "answered"
        except ChatChainError as exc:
            outcome = f"failed ({type(exc).__name__})"
        sent = [len(request["body"]["messages"]) for request in server.requests[4:]]
        bot.close()
    return f"window turns={turns} tokens={tokens}: fifth turn's requests {sent}, {outcome}"


if __name__ == "__main__":
    for turns, tokens in WINDOWS:
        print(run(turns, tokens))
