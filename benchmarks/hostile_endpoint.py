"""How long one turn runs against a hostile endpoint, for each entry point.

Runs ``chat``, ``stream``, ``achat`` and ``astream`` against `OpenAITestServer`'s keep-alive
trickle and byte-a-second modes (each lasting ``--trickle`` seconds) with ``timeout=2``, and
prints the seconds each turn took and how it ended.

    python benchmarks/hostile_endpoint.py --trickle 30 --deadline 1.5
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from chatchain import Chatbot, Settings
from chatchain.testing import Fault, OpenAITestServer


def _turn(bot: Chatbot, mode: str, loop: asyncio.AbstractEventLoop) -> str:
    if mode == "chat":
        return bot.chat("one two three four", session_id="s").text
    if mode == "stream":
        return "".join(bot.stream("one two three four", session_id="s"))
    if mode == "achat":
        return loop.run_until_complete(bot.achat("one two three four", session_id="s")).text

    async def consume() -> str:
        return "".join([piece async for piece in bot.astream("one two three four", session_id="s")])

    return loop.run_until_complete(consume())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trickle", type=float, default=30.0)
    parser.add_argument("--deadline", type=float, default=None)
    args = parser.parse_args()
    faults = {
        "keep-alive": Fault(keep_alive=args.trickle, stall_after=2),
        "byte-a-second": Fault(drip=args.trickle),
    }
    loop = asyncio.new_event_loop()
    with OpenAITestServer() as server, tempfile.TemporaryDirectory() as tmp:
        for name, fault in faults.items():
            for mode in ("chat", "stream", "achat", "astream"):
                settings = Settings(
                    api_key="sk-test",
                    base_url=server.base_url,
                    timeout=2,
                    max_retries=0,
                    store_url=f"sqlite:///{Path(tmp) / f'{name}-{mode}.db'}",
                    turn_deadline=args.deadline,
                )
                with Chatbot(settings) as bot:
                    server.add_fault(fault)
                    started = time.perf_counter()
                    try:
                        outcome = f"reply {_turn(bot, mode, loop)!r}"
                    except Exception as exc:
                        outcome = type(exc).__name__
                    elapsed = time.perf_counter() - started
                    stored = len(bot.history("s"))
                print(f"{name:14} {mode:8} {elapsed:6.1f} s  {outcome}  ({stored} messages stored)")
    loop.close()


if __name__ == "__main__":
    main()
