"""Per-chunk cost and peak memory of a long streamed reply, chatchain against the plain chain.

Usage::

    .venv/bin/python benchmarks/bench_stream.py                  # ~1 min on 2 quiet cores
    .venv/bin/python benchmarks/bench_stream.py --chunks 2000 --rounds 15 --memory-chunks 20000
    OTHER/.venv/bin/python benchmarks/bench_stream.py  # this harness, measuring OTHER checkout

What runs
    `chatchain.testing.OpenAITestServer` in a process of its own (`_servers.openai_test_server`,
    so its thread does not share this process's GIL), echoing a user message of ``--chunks``
    words back one word per SSE chunk, with a usage chunk at the end. Contenders, from
    `bench_turn.py`: the raw ``openai`` client (sync and async), a bare LangChain chain
    (``.stream`` and ``.astream`` inside ``get_openai_callback()``), and ``Chatbot.stream`` /
    ``Chatbot.astream`` (default settings, in-memory store).

Method
    Per chunk: the wall time of a whole streamed turn on a fresh session divided by the number
    of chunks received. Rounds interleave every contender, the order rotated each round, after
    one warm-up round; the figure is the median over rounds and the ratios are of medians
    (``chatchain / plain chain``, sync against sync and async against async).

    Memory: one streamed turn of ``--memory-chunks`` chunks per contender under
    ``tracemalloc``; the peak of traced Python allocations during the turn (above what was
    allocated before it) divided by the reply's UTF-8 bytes (the user's message and the echo
    the harness checks the reply against are made before, untraced; the request that carries
    the message is the turn's, as long as the reply here). Each contender first streams a
    short untraced turn, so that what a process loads once (lazy imports, price tables) is
    not counted as the turn's.

Targets (issue 19)
    A streamed chunk at most 1.0x the plain chain, sync and async; peak memory at most 10x the
    reply's bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
import tracemalloc
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_turn as bt
from _servers import openai_test_server
from langchain_core.runnables import RunnableConfig

import chatchain

# Issue 19's targets: a streamed chunk at most this many times the plain chain's (sync against
# sync, async against async), and the turn's peak at most this many times the reply's bytes.
CHUNK_TARGET = 1.0
MEMORY_TARGET = 10.0

Stream = Callable[[str, str], Iterator[str]]
AStream = Callable[[str, str], AsyncIterator[str]]


def words(count: int) -> str:
    """A user message of ``count`` distinct short words (the echo sends one per chunk)."""
    return " ".join(f"w{i}" for i in range(count))


class Contenders:
    """The streaming entry points, sync and async, over one endpoint."""

    def __init__(self, base_url: str) -> None:
        settings = chatchain.Settings(
            api_key=bt.API_KEY,
            base_url=base_url,
            model=bt.MODEL,
            system_prompt=bt.SYSTEM,
            window_tokens=None,
            summarize=False,
            _env_file=None,
        )
        self.raw = bt.RawClient(base_url, settings.temperature)
        self.plain = bt.PlainChain(base_url, settings)
        self.bot = chatchain.Chatbot(settings)
        self.sync: dict[str, Stream] = {
            "raw client": self.raw.stream,
            "plain chain": self.plain.stream,
            "chatchain bot": self._bot_stream,
        }
        # One event loop for every async sample: the async clients keep connections bound to
        # the loop that opened them.
        self.loop = asyncio.new_event_loop()
        self.async_: dict[str, AStream] = {
            "raw client async": self._raw_astream,
            "plain chain async": self._plain_astream,
            "chatchain bot async": self._bot_astream,
        }

    def _bot_stream(self, session_id: str, text: str) -> Iterator[str]:
        with self.bot.stream(text, session_id=session_id, language=bt.LANGUAGE) as pieces:
            yield from pieces

    async def _bot_astream(self, session_id: str, text: str) -> AsyncIterator[str]:
        stream = self.bot.astream(text, session_id=session_id, language=bt.LANGUAGE)
        async with stream as pieces:
            async for piece in pieces:
                yield piece

    async def _plain_astream(self, session_id: str, text: str) -> AsyncIterator[str]:
        config: RunnableConfig = {"configurable": {"session_id": session_id}}
        with self.plain._meter():
            async for chunk in self.plain._chain.astream(
                {"input": text, "language": bt.LANGUAGE}, config=config
            ):
                yield chunk.text

    async def _raw_astream(self, session_id: str, text: str) -> AsyncIterator[str]:
        import openai

        if self.raw._aclient is None:
            self.raw._aclient = openai.AsyncOpenAI(
                base_url=self.raw._base_url, api_key=bt.API_KEY, max_retries=0
            )
        chunks = await self.raw._aclient.chat.completions.create(
            model=bt.MODEL,
            messages=self.raw._messages(session_id, text),
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in chunks:
            if chunk.choices:
                yield chunk.choices[0].delta.content or ""


class Echo:
    """Checks the pieces of a reply against the echo as they come, keeping none of them (a
    list of 20,000 pieces would weigh ~10x the reply's bytes in the memory figure)."""

    def __init__(self, name: str, sent: str, expected: str | None = None) -> None:
        # ``expected``: the echo made before a memory turn is traced (it is this checker's,
        # ~1x the reply's bytes, not the turn's).
        self.name, self.at, self.count = name, 0, 0
        self.expected = f"Echo: {sent}" if expected is None else expected

    def __call__(self, piece: str) -> None:
        if not self.expected.startswith(piece, self.at):
            raise AssertionError(f"{self.name}: the reply is not the echo at {self.at}")
        self.at += len(piece)
        self.count += 1

    def end(self) -> int:
        if self.at != len(self.expected):
            raise AssertionError(f"{self.name}: the reply stopped at {self.at} characters")
        return max(1, self.count)


def time_sync(
    name: str, stream: Stream, session_id: str, text: str, expected: str | None = None
) -> float:
    echo = Echo(name, text, expected)
    start = time.perf_counter()
    for piece in stream(session_id, text):
        echo(piece)
    elapsed = time.perf_counter() - start
    return elapsed / echo.end()


async def time_async(
    name: str, stream: AStream, session_id: str, text: str, expected: str | None = None
) -> float:
    echo = Echo(name, text, expected)
    start = time.perf_counter()
    async for piece in stream(session_id, text):
        echo(piece)
    elapsed = time.perf_counter() - start
    return elapsed / echo.end()


def per_chunk(contenders: Contenders, chunks: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per chunk, per contender, over ``rounds`` interleaved rounds (plus a warm-up)."""
    text = words(chunks)
    samples: dict[str, list[float]] = {n: [] for n in [*contenders.sync, *contenders.async_]}
    names_sync, names_async = list(contenders.sync), list(contenders.async_)

    async def async_round(number: int, order: list[str]) -> None:
        for name in order:
            value = await time_async(name, contenders.async_[name], f"a{number}-{name}", text)
            if number > 0:
                samples[name].append(value)

    for number in range(rounds + 1):
        shift = number % len(names_sync)
        for name in names_sync[shift:] + names_sync[:shift]:
            value = time_sync(name, contenders.sync[name], f"s{number}-{name}", text)
            if number > 0:
                samples[name].append(value)
        contenders.loop.run_until_complete(
            async_round(number, names_async[shift:] + names_async[:shift])
        )
    return samples


# The raw client holds nothing per chunk; leaving it out keeps the run under a minute.
MEMORY = ("plain chain", "chatchain bot", "plain chain async", "chatchain bot async")
# The untraced warm-up turn of each contender before its measured one (see `peak_memory`).
WARM = words(50)


def peak_memory(contenders: Contenders, chunks: int) -> dict[str, float]:
    """Peak traced bytes during one streamed turn of ``chunks`` chunks, per reply byte."""
    text = words(chunks)
    expected = f"Echo: {text}"
    reply_bytes = len(expected.encode())
    result: dict[str, float] = {}

    def measure(name: str, run: Callable[[], object], warm: Callable[[], object]) -> None:
        # A short turn first, untraced: what a process loads once (lazy imports, the price
        # tables chatchain's ledger reads at its first turn's end, ~3.5 MB) is not the turn's.
        warm()
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        run()
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        result[name] = peak / reply_bytes

    for name, stream in contenders.sync.items():
        if name in MEMORY:
            measure(
                name,
                lambda s=stream, n=name: time_sync(n, s, f"m-{n}", text, expected),
                lambda s=stream, n=name: time_sync(n, s, f"w-{n}", WARM),
            )
    for name, astream in contenders.async_.items():
        if name not in MEMORY:
            continue
        measure(
            name,
            lambda s=astream, n=name: contenders.loop.run_until_complete(
                time_async(n, s, f"m-{n}", text, expected)
            ),
            lambda s=astream, n=name: contenders.loop.run_until_complete(
                time_async(n, s, f"w-{n}", WARM)
            ),
        )
    return result


PAIRS: tuple[tuple[str, str], ...] = (
    ("chatchain bot", "plain chain"),
    ("chatchain bot async", "plain chain async"),
    ("plain chain", "raw client"),
    ("chatchain bot", "raw client"),
    ("chatchain bot async", "raw client async"),
)


def report_time(samples: dict[str, list[float]], chunks: int, rounds: int) -> dict[str, Any]:
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(f"\nper chunk, {chunks}-chunk reply, median of {rounds} rounds:")
    for name, value in medians.items():
        print(f"  {name:22} {value * 1e6:8.1f} us")
    print("\nratios of medians (target: chatchain / plain chain <= 1.0 per chunk):")
    ratios = {}
    for top, bottom in PAIRS:
        ratios[f"{top} / {bottom}"] = medians[top] / medians[bottom]
        print(f"  {top} / {bottom}: {medians[top] / medians[bottom]:.2f}x")
    return {"us_per_chunk": {n: v * 1e6 for n, v in medians.items()}, "ratios": ratios}


def report_memory(memory: dict[str, float], chunks: int) -> None:
    print(
        f"\npeak traced memory of one {chunks}-chunk streamed turn, per reply byte (target <= 10x):"
    )
    for name, value in memory.items():
        print(f"  {name:22} {value:8.1f} x reply bytes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=2000, help="chunks per timed reply")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds (0: none)")
    parser.add_argument(
        "--memory-chunks", type=int, default=20000, help="chunks of the memory turn (0: none)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    found: dict[str, Any] = {
        "config": {
            "chunks": args.chunks,
            "rounds": args.rounds,
            "memory_chunks": args.memory_chunks,
        },
        "targets": {"chunk": CHUNK_TARGET, "memory": MEMORY_TARGET},
    }
    bt.clean_environment()
    warnings.simplefilter("ignore", DeprecationWarning)  # the plain chain's LangChain classes
    print(
        f"chatchain {chatchain.__version__} from {Path(chatchain.__file__).parent.parent}, "
        f"langchain-core {metadata.version('langchain-core')}, Python {sys.version.split()[0]}"
    )
    with openai_test_server(timeout=60) as server:
        contenders = Contenders(server.base_url)
        if args.rounds > 0:
            samples = per_chunk(contenders, args.chunks, args.rounds)
            found["time"] = report_time(samples, args.chunks, args.rounds)
        if args.memory_chunks > 0:
            memory = peak_memory(contenders, args.memory_chunks)
            report_memory(memory, args.memory_chunks)
            found["memory"] = memory
    if args.json is not None:
        args.json.write_text(json.dumps(found, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
