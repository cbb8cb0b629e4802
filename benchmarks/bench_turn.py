"""Per-turn overhead of chatchain against the plain LangChain chain and the raw OpenAI client.

Usage::

    .venv/bin/python benchmarks/bench_turn.py [--turns N] [--warmup N] [--json PATH]

What runs
    One process, one `chatchain.testing.OpenAITestServer` on 127.0.0.1 (echo replies, SSE
    streaming with a usage chunk), and four contenders talking to it:

    ``raw client``
        ``openai.OpenAI(max_retries=0)``; the script keeps the history as a list of dicts.
        ``chat.completions.create`` non-streamed, and with ``stream=True,
        stream_options={"include_usage": True}``.
    ``plain chain``
        A bare LangChain chain: prompt | ``ChatOpenAI`` in ``RunnableWithMessageHistory`` over a
        dict of community ``ChatMessageHistory``, each call inside ``get_openai_callback()``.
        ``ChatOpenAI`` gets the parameters chatchain's settings give its own model
        (temperature, max_tokens, timeout, max_retries, ``stream_usage=True``).
    ``chatchain bot``
        ``Chatbot.chat`` / ``Chatbot.stream``.
    ``chatchain chain``
        ``create_chat_chain(settings=...)`` ``.invoke`` / ``.stream`` with the session id in
        the config.

    Before timing, one checked sample per contender and mode asserts that every contender
    gets the right reply and sends the same request body (the raw client is sent the same
    temperature; only its ``"stream": false`` key, which the client omits, may differ).

Method
    A *sample* is a fresh session id, one untimed priming turn, then the timed turn (so the
    timed request always carries system + 2 history messages + the new message). Both turns
    use the mode being measured:

    ``invoke``  wall time of the whole timed turn, history save included.
    ``invoke CPU``  CPU time of the process (every thread, the in-process server's too)
                during that same turn: less moved by other load on the machine than the
                wall time, which waits for a share of the cores. The server's share is
                the same for every contender, so the ratios it gives lean toward 1.
    ``ttft``    time from the call to the first non-empty text chunk of a streamed turn.
    ``stream``  (extra) wall time of the whole streamed turn, draining and saving included.

    Each round takes one invoke sample and then one stream sample of every contender, in an
    order rotated by one every round, so drift (CPU frequency, server-side state, heap
    growth) is spread evenly. Warm-up rounds run first and are discarded. The server's
    request log is cleared every few rounds. Clock: ``time.perf_counter``. The garbage
    collector is left enabled for every contender alike (its pauses are a real cost of
    allocating more); the rotation spreads them evenly and p90 shows them.

    The server runs in this process, so its thread competes with the client for the GIL: the
    absolute numbers are a loopback floor, not a network latency. The ratios are what count.

Target
    chatchain at most 1.10x the plain chain on both (median invoke and median TTFT).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import openai
from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_openai import ChatOpenAI
from openai.types.chat import ChatCompletionMessageParam
from pydantic import SecretStr

import chatchain
from chatchain.testing import OpenAITestServer

SYSTEM = (
    "You are a helpful assistant. Answer all questions to the best of your ability in {language}."
)
LANGUAGE = "English"
MODEL = "gpt-4o-mini"
API_KEY = "sk-bench"
PRIMING_TEXT = "Hi! I'm Bob."
TIMED_TEXT = "What's my name?"
EXPECTED_REPLY = f"Echo: {TIMED_TEXT}"
MODES = ("invoke", "cpu", "ttft", "stream")
LABELS = ("invoke", "invoke CPU", "TTFT", "stream")
TARGET = 1.10
CLEAR_EVERY = 10  # rounds between server.clear()
BOOTSTRAP_DRAWS = 1000
PAIRS = {
    "chatchain bot / plain chain": ("chatchain bot", "plain chain"),
    "chatchain chain / plain chain": ("chatchain chain", "plain chain"),
    "plain chain / raw client": ("plain chain", "raw client"),
    "chatchain bot / raw client": ("chatchain bot", "raw client"),
}

# The deprecation and sunset notices of the plain chain's LangChain classes; filtered for the
# whole run, not per call, so that no contender pays for entering and leaving `catch_warnings`
# on each turn.
PLAIN_CHAIN_WARNINGS = (
    r".langchain-community. is being sunset",
    r"RunnableWithMessageHistory is deprecated",
    r"The class `InMemoryChatMessageHistory` was deprecated",
)


@contextmanager
def quiet_plain_chain() -> Iterator[None]:
    """Silence `PLAIN_CHAIN_WARNINGS` (and nothing else) inside the block."""
    with warnings.catch_warnings():
        for message in PLAIN_CHAIN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        yield


def clean_environment() -> None:
    """Drop the caller's ``CHATCHAIN_``, ``OPENAI_``, ``LANGSMITH_`` and ``LANGCHAIN_`` variables.

    A benchmark states every setting it depends on: an exported ``CHATCHAIN_STORE``, budget or
    window must not change what is measured, and LangSmith tracing would time the network, not
    the chains. (The settings themselves are built with ``_env_file=None``: no ``.env`` either.)
    """
    for name in list(os.environ):
        if name.startswith(("CHATCHAIN_", "OPENAI_", "LANGSMITH_", "LANGCHAIN_")):
            del os.environ[name]


class Contender(Protocol):
    """One way of running a conversational turn."""

    name: str

    def invoke(self, session_id: str, text: str) -> str:
        """Run one non-streamed turn; return the reply text."""
        ...

    def stream(self, session_id: str, text: str) -> Iterator[str]:
        """Run one streamed turn, yielding text pieces (possibly empty) as they arrive."""
        ...

    def close(self) -> None:
        """Release clients."""
        ...


class RawClient:
    """The official client, with the history kept by hand as lists of dicts."""

    name = "raw client"

    def __init__(self, base_url: str, temperature: float | None) -> None:
        self._base_url = base_url
        self._client = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)
        self._aclient: openai.AsyncOpenAI | None = None
        self._temperature: float | openai.Omit = openai.omit if temperature is None else temperature
        self._system = SYSTEM.format(language=LANGUAGE)
        self._histories: dict[str, list[ChatCompletionMessageParam]] = {}

    def _messages(self, session_id: str, text: str) -> list[ChatCompletionMessageParam]:
        history = self._histories.setdefault(session_id, [])
        return [
            {"role": "system", "content": self._system},
            *history,
            {"role": "user", "content": text},
        ]

    def _save(self, session_id: str, text: str, reply: str) -> None:
        self._histories[session_id].extend(
            [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        )

    def invoke(self, session_id: str, text: str) -> str:
        completion = self._client.chat.completions.create(
            model=MODEL, messages=self._messages(session_id, text), temperature=self._temperature
        )
        reply = completion.choices[0].message.content or ""
        self._save(session_id, text, reply)
        return reply

    def stream(self, session_id: str, text: str) -> Iterator[str]:
        chunks = self._client.chat.completions.create(
            model=MODEL,
            messages=self._messages(session_id, text),
            stream=True,
            stream_options={"include_usage": True},
            temperature=self._temperature,
        )
        pieces: list[str] = []
        for chunk in chunks:
            if chunk.choices:
                piece = chunk.choices[0].delta.content or ""
                pieces.append(piece)
                yield piece
        self._save(session_id, text, "".join(pieces))

    async def ainvoke(self, session_id: str, text: str) -> str:
        """`invoke` on ``openai.AsyncOpenAI`` (made on first use, with the same settings)."""
        if self._aclient is None:
            self._aclient = openai.AsyncOpenAI(
                base_url=self._base_url, api_key=API_KEY, max_retries=0
            )
        completion = await self._aclient.chat.completions.create(
            model=MODEL, messages=self._messages(session_id, text), temperature=self._temperature
        )
        reply = completion.choices[0].message.content or ""
        self._save(session_id, text, reply)
        return reply

    def close(self) -> None:
        self._client.close()

    async def aclose(self) -> None:
        if self._aclient is not None:
            await self._aclient.close()


class PlainChain:
    """The bare LangChain chain, metered per call with ``get_openai_callback`` as users do."""

    name = "plain chain"

    def __init__(self, base_url: str, settings: chatchain.Settings) -> None:
        from langchain_community.callbacks import get_openai_callback
        from langchain_community.chat_message_histories import ChatMessageHistory
        from langchain_core.runnables.history import RunnableWithMessageHistory

        store: dict[str, BaseChatMessageHistory] = {}

        def get_session_history(session_id: str) -> BaseChatMessageHistory:
            if session_id not in store:
                store[session_id] = ChatMessageHistory()
            return store[session_id]

        prompt = ChatPromptTemplate.from_messages(
            [
                ("system", SYSTEM),
                MessagesPlaceholder(variable_name="history"),
                ("human", "{input}"),
            ]
        )
        # The parameters of chatchain.model.create_chat_model, read from the same settings.
        model = ChatOpenAI(
            model=MODEL,
            base_url=base_url,
            api_key=SecretStr(API_KEY),
            temperature=settings.temperature,
            max_tokens=settings.max_tokens,  # type: ignore[call-arg]
            timeout=settings.timeout,
            max_retries=settings.max_retries,
            stream_usage=True,
        )
        self._chain: Runnable[Any, Any] = RunnableWithMessageHistory(
            prompt | model,
            get_session_history,
            input_messages_key="input",
            history_messages_key="history",
        )
        self._meter: Callable[[], AbstractContextManager[Any]] = get_openai_callback

    def invoke(self, session_id: str, text: str) -> str:
        config: RunnableConfig = {"configurable": {"session_id": session_id}}
        with self._meter():
            reply = self._chain.invoke({"input": text, "language": LANGUAGE}, config=config)
        return str(reply.text)

    async def ainvoke(self, session_id: str, text: str) -> str:
        config: RunnableConfig = {"configurable": {"session_id": session_id}}
        with self._meter():
            reply = await self._chain.ainvoke({"input": text, "language": LANGUAGE}, config=config)
        return str(reply.text)

    def stream(self, session_id: str, text: str) -> Iterator[str]:
        config: RunnableConfig = {"configurable": {"session_id": session_id}}
        with self._meter():
            for chunk in self._chain.stream({"input": text, "language": LANGUAGE}, config=config):
                yield chunk.text

    def close(self) -> None:
        return None


class ChatchainBot:
    """`chatchain.Chatbot`."""

    name = "chatchain bot"

    def __init__(self, settings: chatchain.Settings) -> None:
        self._bot = chatchain.Chatbot(settings)

    def invoke(self, session_id: str, text: str) -> str:
        return self._bot.chat(text, session_id=session_id, language=LANGUAGE).text

    async def ainvoke(self, session_id: str, text: str) -> str:
        return (await self._bot.achat(text, session_id=session_id, language=LANGUAGE)).text

    def stream(self, session_id: str, text: str) -> Iterator[str]:
        with self._bot.stream(text, session_id=session_id, language=LANGUAGE) as pieces:
            yield from pieces

    def close(self) -> None:
        return None


class ChatchainChain:
    """`chatchain.create_chat_chain`, called like any runnable."""

    name = "chatchain chain"

    def __init__(self, settings: chatchain.Settings) -> None:
        self._chain = chatchain.create_chat_chain(settings=settings)

    def invoke(self, session_id: str, text: str) -> str:
        config: RunnableConfig = {"configurable": {"session_id": session_id}}
        reply = self._chain.invoke({"input": text, "language": LANGUAGE}, config=config)
        return str(reply.text)

    def stream(self, session_id: str, text: str) -> Iterator[str]:
        config: RunnableConfig = {"configurable": {"session_id": session_id}}
        for chunk in self._chain.stream({"input": text, "language": LANGUAGE}, config=config):
            yield chunk.text

    def close(self) -> None:
        return None


@dataclass
class Timings:
    """Seconds per sample, by mode."""

    samples: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})


def _drain_timed(pieces: Iterator[str], start: float) -> tuple[float, float, str]:
    """Consume a stream; return (time to first text, time to the end, the text)."""
    first: float | None = None
    parts: list[str] = []
    for piece in pieces:
        if piece and first is None:
            first = time.perf_counter() - start
        parts.append(piece)
    end = time.perf_counter() - start
    if first is None:
        raise AssertionError("the stream yielded no text")
    return first, end, "".join(parts)


def run_sample(contender: Contender, streamed: bool, session_id: str) -> tuple[float, ...]:
    """One fresh session: an untimed priming turn, then the timed turn.

    Returns ``(invoke_s, invoke_cpu_s)`` or ``(ttft_s, stream_s)``.
    """
    perf_counter, process_time = time.perf_counter, time.process_time
    if streamed:
        "".join(contender.stream(session_id, PRIMING_TEXT))
        start = perf_counter()
        ttft, total, text = _drain_timed(contender.stream(session_id, TIMED_TEXT), start)
        result: tuple[float, ...] = (ttft, total)
    else:
        contender.invoke(session_id, PRIMING_TEXT)
        start, cpu = perf_counter(), process_time()
        text = contender.invoke(session_id, TIMED_TEXT)
        result = (perf_counter() - start, process_time() - cpu)
    if text != EXPECTED_REPLY:
        raise AssertionError(f"{contender.name}: unexpected reply {text!r}")
    return result


def check_payloads(server: OpenAITestServer, contenders: list[Contender]) -> None:
    """Run one sample of each contender and mode; the timed requests must match."""
    for streamed in (False, True):
        bodies: dict[str, Any] = {}
        for contender in contenders:
            server.clear()
            run_sample(contender, streamed, f"check-{contender.name}-{streamed}")
            requests = server.requests
            if len(requests) != 2:
                raise AssertionError(f"{contender.name}: {len(requests)} requests, expected 2")
            body = dict(requests[-1]["body"])
            if body.get("stream") is False:
                del body["stream"]
            bodies[contender.name] = body
        reference = bodies[contenders[0].name]
        for name, body in bodies.items():
            if body != reference:
                raise AssertionError(f"request bodies differ:\n{reference}\n{name}: {body}")
    server.clear()


def run_rounds(
    server: OpenAITestServer,
    contenders: list[Contender],
    rounds: int,
    label: str,
    results: dict[str, Timings] | None,
) -> None:
    """``rounds`` rounds of one invoke and one stream sample per contender, order rotated."""
    count = len(contenders)
    for number in range(rounds):
        shift = number % count
        order = contenders[shift:] + contenders[:shift]
        for streamed in (False, True):
            for contender in order:
                session_id = f"{label}-{number}-{int(streamed)}-{contender.name}"
                measured = run_sample(contender, streamed, session_id)
                if results is None:
                    continue
                samples = results[contender.name].samples
                if streamed:
                    samples["ttft"].append(measured[0])
                    samples["stream"].append(measured[1])
                else:
                    samples["invoke"].append(measured[0])
                    samples["cpu"].append(measured[1])
        if number % CLEAR_EVERY == CLEAR_EVERY - 1:
            server.clear()
    server.clear()


def percentile(values: list[float], q: int) -> float:
    """The ``q``-th percentile (linear interpolation between closest ranks)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": cpu or "unknown",
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
    }


def versions() -> dict[str, str]:
    names = ("openai", "langchain-core", "langchain-openai", "langchain-community", "chatchain")
    found: dict[str, str] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def summarise(results: dict[str, Timings]) -> dict[str, dict[str, dict[str, float]]]:
    """Median and p90 in ms per contender and mode."""
    return {
        name: {
            mode: {
                "median_ms": statistics.median(values) * 1e3,
                "p90_ms": percentile(values, 90) * 1e3,
                "n": len(values),
            }
            for mode, values in timings.samples.items()
        }
        for name, timings in results.items()
    }


def ratio_ci(top: list[float], bottom: list[float], rng: random.Random) -> tuple[float, float]:
    """95% bootstrap interval of ``median(top) / median(bottom)``."""
    median = statistics.median
    draws = sorted(
        median(rng.choices(top, k=len(top))) / median(rng.choices(bottom, k=len(bottom)))
        for _ in range(BOOTSTRAP_DRAWS)
    )
    return draws[int(0.025 * BOOTSTRAP_DRAWS)], draws[int(0.975 * BOOTSTRAP_DRAWS) - 1]


def ratios(results: dict[str, Timings]) -> dict[str, dict[str, dict[str, float]]]:
    """Median ratios, with 95% bootstrap intervals, for each pair in `PAIRS` and mode."""
    rng = random.Random(0)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for label, (top, bottom) in PAIRS.items():
        table[label] = {}
        for mode in MODES:
            a, b = results[top].samples[mode], results[bottom].samples[mode]
            low, high = ratio_ci(a, b, rng)
            ratio = statistics.median(a) / statistics.median(b)
            table[label][mode] = {"ratio": ratio, "ci95_low": low, "ci95_high": high}
    return table


def report(
    info: dict[str, Any],
    summary: dict[str, dict[str, dict[str, float]]],
    table: dict[str, dict[str, dict[str, float]]],
) -> None:
    m, v, c = info["machine"], info["versions"], info["config"]
    print(f"machine   {m['cpu']}; {m['cores']} cores ({m['usable_cores']} usable)")
    print(f"          {m['python']}; {m['platform']}")
    print("versions  " + ", ".join(f"{name} {version}" for name, version in v.items()))
    print(
        f"method    {c['turns']} samples per contender and mode after {c['warmup']} warm-up "
        f"rounds; sample = new session, 1 untimed priming turn, 1 timed turn; round-robin, "
        f"order rotated each round; GC enabled for all; server in-process on 127.0.0.1"
    )
    print(f"model     {c['model_params']}")
    print(f"wall      {c['elapsed_s']:.1f} s")
    print()
    head = f"{'contender':<16}" + "".join(
        f"{label + ' med':>13}{'p90':>9}" for label in ("invoke", "CPU", "TTFT", "stream")
    )
    print(head + "   (ms)")
    print("-" * len(head))
    for name, modes in summary.items():
        print(
            f"{name:<16}"
            + "".join(
                f"{modes[mode]['median_ms']:>13.3f}{modes[mode]['p90_ms']:>9.3f}" for mode in MODES
            )
        )
    print()
    print(f"{'median ratio [95% CI]':<30}" + "".join(f"{m:>20}" for m in LABELS))
    for label, modes in table.items():
        cells = (
            f"{r['ratio']:.3f} [{r['ci95_low']:.2f}, {r['ci95_high']:.2f}]"
            for r in (modes[mode] for mode in MODES)
        )
        print(f"{label:<30}" + "".join(f"{cell:>20}" for cell in cells))
    print()
    print(f"target    chatchain at most {TARGET:.2f}x the plain chain on both (invoke and TTFT)")
    for label in ("chatchain bot / plain chain", "chatchain chain / plain chain"):
        worst = max(table[label]["invoke"]["ratio"], table[label]["ttft"]["ratio"])
        high = max(table[label]["invoke"]["ci95_high"], table[label]["ttft"]["ci95_high"])
        verdict = "met" if worst <= TARGET else "NOT met"
        print(f"          {label}: {verdict} (worst {worst:.3f}x; CI upper bound {high:.3f}x)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--turns", type=int, default=300, help="timed samples per contender and mode (300)"
    )
    parser.add_argument("--warmup", type=int, default=20, help="warm-up rounds (20)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    if args.turns < 1 or args.warmup < 0:
        parser.error("--turns must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clean_environment()
    with quiet_plain_chain(), OpenAITestServer(host="127.0.0.1") as server:
        settings = chatchain.Settings(
            _env_file=None,  # type: ignore[call-arg]
            api_key=SecretStr(API_KEY),
            base_url=server.base_url,
            model=MODEL,
            system_prompt=SYSTEM,
        )
        contenders: list[Contender] = [
            RawClient(server.base_url, settings.temperature),
            PlainChain(server.base_url, settings),
            ChatchainBot(settings),
            ChatchainChain(settings),
        ]
        try:
            check_payloads(server, contenders)
            started = time.perf_counter()
            run_rounds(server, contenders, args.warmup, "warmup", None)
            results = {c.name: Timings() for c in contenders}
            run_rounds(server, contenders, args.turns, "timed", results)
            elapsed = time.perf_counter() - started
        finally:
            for contender in contenders:
                contender.close()
    summary = summarise(results)
    table = ratios(results)
    info = {
        "machine": machine(),
        "versions": versions(),
        "config": {
            "turns": args.turns,
            "warmup": args.warmup,
            "elapsed_s": elapsed,
            "model_params": (
                f"temperature={settings.temperature}, max_tokens={settings.max_tokens}, "
                f"timeout={settings.timeout:g}, max_retries={settings.max_retries}, "
                "stream_usage=True (raw client: same temperature, max_retries=0)"
            ),
        },
    }
    report(info, summary, table)
    if args.json is not None:
        payload = {
            **info,
            "target": f"chatchain at most {TARGET:.2f}x the plain chain on both",
            "summary": summary,
            "ratios": table,
            "samples_ms": {
                name: {mode: [s * 1e3 for s in values] for mode, values in t.samples.items()}
                for name, t in results.items()
            },
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
