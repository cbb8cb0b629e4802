"""The demo: a short chat (Bob gives his name and asks it back), with tokens and cost.

Runs against the endpoint in the settings; with neither ``OPENAI_API_KEY`` nor
``OPENAI_BASE_URL`` set, it runs offline against chatchain's own test server, which echoes.
``chatchain demo`` runs it, and so does ``python -m chatchain._demo`` (``make demo``), which
needs no ``cli`` extra.
"""

from __future__ import annotations

import sys

from chatchain._money import format_usd
from chatchain.chatbot import Chatbot
from chatchain.errors import ChatChainError
from chatchain.settings import Settings
from chatchain.testing import OpenAITestServer, memory_echo_reply
from chatchain.usage import Usage

SYSTEM = (
    "You are a helpful assistant. Answer all questions to the best of your ability in {language}."
)
OFFLINE_NOTE = """\
OFFLINE: no OPENAI_API_KEY or OPENAI_BASE_URL is set, so this runs against chatchain's own
test server on 127.0.0.1, whose replies are echoes (they say how many earlier messages the
model was sent, to show the memory at work). Tokens and costs are real arithmetic on them.
To talk to a real model:
  export OPENAI_API_KEY=sk-...                       # OpenAI (or put it in .env)
  export OPENAI_BASE_URL=http://localhost:11434/v1   # or a local server (Ollama, vLLM, ...)
  export OPENAI_MODEL=llama3.2                       # with its model name
"""


def _usage_line(usage: Usage | None) -> str:
    if usage is None:
        return ""
    first = f", first token {usage.first_token_s * 1000:.0f} ms" if usage.first_token_s else ""
    return f"   [{usage}{first}]"


SESSION = "dp123"


def _run(bot: Chatbot) -> None:
    session = SESSION
    for question in ("Hi! I'm Bob", "What's my name?"):
        print(f"you> {question}")
        reply = bot.chat(question, session_id=session)
        print(f"bot> {reply.text}\n{_usage_line(reply.usage)}")
    question = "Tell me a short joke about programmers."
    print(f"you> {question}\nbot> ", end="", flush=True)
    stream = bot.stream(question, session_id=session)
    for piece in stream:
        print(piece, end="", flush=True)
    print(f"\n{_usage_line(stream.usage)}")
    question = "¿Cómo me llamo?"
    print(f"you> {question}   (same session, prompt variable language=Spanish)")
    reply = bot.chat(question, session_id=session, language="Spanish")
    print(f"bot> {reply.text}\n{_usage_line(reply.usage)}")
    total = bot.usage(session)
    cost = (
        "unknown (no price for this model)"
        if total.cost_usd is None
        else format_usd(total.cost_usd)
    )
    print(
        f"\nSession {session!r}: {len(bot.history(session))} messages stored, {total.turns} turns, "
        f"{total.prompt_tokens} prompt + {total.completion_tokens} completion tokens, cost {cost}."
    )
    print("\nThe usage ledger, by session and model:\n")
    print(bot.usage_report(by=["session", "model"]))


def main() -> int:
    """Run the demo; returns the process exit code."""
    try:
        settings = Settings.load()
        if settings.api_key is None and not settings.base_url:
            print(OFFLINE_NOTE)
            with OpenAITestServer(reply=memory_echo_reply, model=settings.model) as server:
                offline = settings.model_copy(update={"base_url": server.base_url})
                with Chatbot(offline, system=SYSTEM, prompt_vars={"language": "English"}) as bot:
                    _run(bot)
        else:
            where = settings.base_url or "api.openai.com"
            print(f"Talking to {settings.model} at {where}.\n")
            with Chatbot(settings, system=SYSTEM, prompt_vars={"language": "English"}) as bot:
                _run(bot)
    except ChatChainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
