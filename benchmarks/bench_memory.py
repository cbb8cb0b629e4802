"""Memory and stores: turn cost against stored history, prompt tokens, throughput across processes.

Usage::

    .venv/bin/python benchmarks/bench_memory.py [--quick] [--json PATH] [--parts 1,2,3,4]

What runs
    The script starts everything it talks to and stops it at the end, all on 127.0.0.1: a
    redis-server and a PostgreSQL cluster of its own on free ports (``_servers.py``, which
    reuses the test suite's launchers), SQLite files in a temporary directory, and one
    `chatchain.testing.OpenAITestServer` in this process.

1. History length
    Per-turn wall time of ``Chatbot.chat`` with `FakeChatModel` (no delay, so the model costs
    next to nothing and the store and chain costs show) on sessions pre-filled with 10, 1,000,
    10,000 and 100,000 messages, on every store: memory, sqlite (temporary file), redis,
    postgres.
    The window is the default (``CHATCHAIN_WINDOW_TURNS``/``_TOKENS``), but the running summary
    is OFF for this part, so that no summary call lands in a timed turn. Pre-fill: the store's
    ``append``, 1,000 messages per call. Per store, the sizes run round-robin (order rotated
    every round) after warm-up rounds. Every turn adds 2 messages; every 10 rounds the
    10-message session is put back to its pre-fill plus one turn (untimed), so it holds 12 to
    30 messages when timed, and every timed turn of every size sends the same full window
    (checked). Reported: median and p90 per (store, size), and the ratios of medians 1k/10,
    10k/10 and 100k/10 per store with a 95% bootstrap interval.

2. Prompt tokens over a 200-turn conversation
    One `OpenAITestServer` whose reply function answers summary requests (the last user
    message starts with ``SUMMARY_REQUEST_MARK``) with a ~60-word summary and every other
    request with a ~60-word answer (both deterministic: the same question gets the same
    answer from both contenders). The same 200 user messages (~30 words each) go to

    ``chatchain bot``  ``Chatbot`` with the DEFAULT settings (window + running summary);
    ``plain chain``    a bare ``ChatPromptTemplate([system, MessagesPlaceholder("history"),
                       human]) | ChatOpenAI(base_url=..., stream_usage=True)`` in
                       ``RunnableWithMessageHistory`` over a dict of ``InMemoryChatMessageHistory``
                       (its deprecation warnings are silenced while it is built).

    Prompt tokens are summed as the endpoint reported them: ``bot.usage()`` (summary calls
    included) and ``get_openai_callback`` per plain turn, each cross-checked against the
    requests the server received. The per-turn series goes to the JSON file.

3. Throughput across processes
    Turns per second with 1 and 4 processes (``multiprocessing`` spawn; the workers start
    once and wait for each run at a common start time) on one Redis, one PostgreSQL and (for
    reference) one SQLite store. Each process runs N turns of ``Chatbot.chat`` with
    ``FakeChatModel(delay=0.002)`` (a little wait, like I/O), default window, summary off;
    either on sessions of its own (4 per process, round-robin) or on 4 sessions that all
    processes share (random choice; turns on one session are serialised by its lock, so less
    scaling is expected). Throughput = all turns / (last end - first start); the machine's
    core count bounds the 4-process figure.

4. A verbose summarizer
    The same 200 user messages through ``Chatbot`` against an `OpenAITestServer` that echoes
    (`echo_reply`): a summary request is answered with the whole request, the old summary
    included, so a summary without a bound grows with every fold. Two contenders, one after
    the other, each on a fresh session: ``unbounded summary`` (``summary_tokens=None``: no
    budget and no cap on the summary call, the summary before issue 10) and ``summary budget``
    (the default ``CHATCHAIN_SUMMARY_TOKENS``). Reported: the final summary's length, the
    largest and last turn prompt, the largest summary request, and all prompt tokens, in the
    server's count, with the documented ceiling (system + summary budget + window tokens).
    ``--parts 4`` runs this part alone (about 10 s).

Targets
    1. 100,000 stored messages: median turn within 1.30x of 10, on every store.
    2. chatchain's prompt tokens, summary calls included, at most 10% of the plain chain's.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import queue
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import _servers
from bench_turn import (
    API_KEY,
    LANGUAGE,
    MODEL,
    SYSTEM,
    clean_environment,
    machine,
    percentile,
    quiet_plain_chain,
    ratio_ci,
    versions,
)
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

import chatchain
from chatchain.stores import HistoryStore, open_store
from chatchain.testing import FakeChatModel, OpenAITestServer, echo_reply
from chatchain.window import SUMMARY_HEADER, SUMMARY_REQUEST_MARK

# -- parameters --------------------------------------------------------------------------------

_FIELDS = chatchain.Settings.model_fields
WINDOW_TURNS: int = _FIELDS["window_turns"].default
WINDOW_TOKENS: int = _FIELDS["window_tokens"].default
SUMMARIZE: bool = _FIELDS["summarize"].default
SUMMARY_TOKENS: int = _FIELDS["summary_tokens"].default

SIZES = (10, 1_000, 10_000, 100_000)
PREFILL_BATCH = 1_000
HISTORY_TARGET = 1.30
TOKENS_TARGET = 0.10
CONVERSATION_TURNS = 200
FAKE_DELAY_S = 0.002
PROCESSES = (1, 4)
SESSIONS_PER_RUN = 4  # per process ("own"), or in all ("shared")
SCENARIOS = ("own", "shared")
THROUGHPUT_PREFILL = 4 * WINDOW_TURNS  # messages per session: a full window from turn one
WORKER_WARMUP = 3
SMALL_RESET_EVERY = 10  # rounds; the smallest history session then holds 12 to 30 messages
RUN_TIMEOUT_S = 300.0
SLOW_TURN_S = 0.040  # a turn this long mostly waited (a lock, a busy file, the CPU)


@dataclass(frozen=True)
class Profile:
    history_turns: int
    history_warmup: int
    throughput_turns: int
    throughput_reps: int


QUICK = Profile(history_turns=40, history_warmup=8, throughput_turns=50, throughput_reps=2)
FULL = Profile(history_turns=500, history_warmup=30, throughput_turns=300, throughput_reps=3)


def bench_settings(
    *, summarize: bool, base_url: str | None = None, summary_tokens: int | None = SUMMARY_TOKENS
) -> chatchain.Settings:
    """The default window, stated explicitly (no ``.env`` is read, see `main` for the env)."""
    return chatchain.Settings(
        _env_file=None,  # type: ignore[call-arg]
        api_key=SecretStr(API_KEY),
        base_url=base_url,
        model=MODEL,
        system_prompt=SYSTEM,
        window_turns=WINDOW_TURNS,
        window_tokens=WINDOW_TOKENS,
        summarize=summarize,
        summary_tokens=summary_tokens,
    )


# -- the conversation: deterministic, roughly English-shaped text -------------------------------

_VOCAB_TEXT = """
    the a to of and in that for it with as on this be at by from or have not are was but we
    they you can will would should could about which when there their what your more some into
    than then them these time people year way day work life world school state family group
    problem place case week company system program question number night point home water room
    money story month book job word business issue side kind head house service friend father
    power hour game line end member law car city community name president team minute idea
    body information back parent face others level office door health person art war history
    party result change morning reason research girl guy moment air teacher force education
    plan trip budget recipe garden train flight hotel museum weather dinner project schedule
    deadline meeting report chapter language travel price ticket coffee kitchen computer phone
    email account password screen window river mountain beach forest village market station
    usually really probably quickly certainly simply already perhaps maybe often however also
    good new first last long great little own other old right big high different small large
    next early young important few public bad same able cheap quiet busy warm cold simple clear
    make know take see come think look want give use find tell ask seem feel try leave call
    keep help start show hear play run move like live believe bring happen write provide sit
    stand lose pay meet include continue learn change lead understand watch follow stop create
    speak read spend grow open walk offer remember love consider appear buy wait serve build
"""
_VOCAB = tuple(_VOCAB_TEXT.split())


def _prose(rng: random.Random, words: int, end: str = ".") -> str:
    """``words`` words in sentences of 7 to 13 words."""
    tokens = [rng.choice(_VOCAB) for _ in range(words)]
    sentences = []
    at = 0
    while at < words:
        size = min(rng.randint(7, 13), words - at)
        sentences.append(" ".join(tokens[at : at + size]).capitalize() + ".")
        at += size
    return " ".join(sentences)[:-1] + end


def user_text(number: int) -> str:
    """The ``number``-th user message: about 30 words, ending with a question mark."""
    rng = random.Random(f"user:{number}")
    return _prose(rng, rng.randint(26, 34), "?")


def answer(text: str) -> str:
    """The assistant's answer to ``text``: about 60 words, the same every time."""
    rng = random.Random(f"answer:{text}")
    return _prose(rng, rng.randint(52, 68))


def summary_of(request: str) -> str:
    """A running summary: about 60 words."""
    rng = random.Random(f"summary:{request}")
    return _prose(rng, rng.randint(55, 65))


USER_TEXTS = tuple(user_text(i) for i in range(CONVERSATION_TURNS))
ANSWERS = {text: answer(text) for text in USER_TEXTS}


def respond(messages: list[BaseMessage]) -> str:
    """`FakeChatModel`'s reply: the answer to the last user message."""
    text = next((m.text for m in reversed(messages) if m.type == "human"), "")
    return ANSWERS.get(text) or answer(text)


def server_reply(messages: list[dict[str, Any]]) -> str:
    """`OpenAITestServer`'s reply: a summary for summary requests, else the answer."""
    text = next((_content(m) for m in reversed(messages) if m.get("role") == "user"), "")
    if text.startswith(SUMMARY_REQUEST_MARK):
        return summary_of(text)
    return ANSWERS.get(text) or answer(text)


def _content(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


_PAIRS = [(HumanMessage(text), AIMessage(ANSWERS[text])) for text in USER_TEXTS]
PREFILL_MESSAGES: list[BaseMessage] = [m for pair in _PAIRS for m in pair]


def prefill(store: HistoryStore, session_id: str, count: int) -> None:
    """Append ``count`` messages (user/assistant pairs) with the store's ``append``."""
    pool = PREFILL_MESSAGES
    for first in range(0, count, PREFILL_BATCH):
        size = min(PREFILL_BATCH, count - first)
        store.append(session_id, [pool[(first + i) % len(pool)] for i in range(size)])


# -- 1. history length -----------------------------------------------------------------------


def bench_history(store: HistoryStore, turns: int, warmup: int) -> dict[str, Any]:
    """Per-turn times of ``Chatbot.chat`` on sessions pre-filled with each of `SIZES`."""
    sessions = {size: f"history-{size}" for size in SIZES}
    prefill_s: dict[int, float] = {}
    for size, session_id in sessions.items():
        started = time.perf_counter()
        prefill(store, session_id, size)
        prefill_s[size] = time.perf_counter() - started
    shapes: list[int] = []

    def reply(messages: list[BaseMessage]) -> str:
        shapes.append(len(messages))
        return respond(messages)

    model = FakeChatModel(respond=reply)
    bot = chatchain.Chatbot(bench_settings(summarize=False), llm=model, store=store)
    samples: dict[int, list[float]] = {size: [] for size in SIZES}
    held = {size: size for size in SIZES}  # messages the session holds before its next turn
    held_when_timed: dict[int, list[int]] = {size: [] for size in SIZES}
    sent: set[int] = set()
    small = SIZES[0]
    perf_counter = time.perf_counter
    said = 0
    gc.collect()
    for number in range(warmup + turns):
        if number and number % SMALL_RESET_EVERY == 0:
            # Keep the smallest session small (untimed): back to its pre-fill, then one turn
            # so that its timed turns send a full window, as those of the others do.
            store.delete(sessions[small])
            prefill(store, sessions[small], small)
            bot.chat(USER_TEXTS[-1], session_id=sessions[small], language=LANGUAGE)
            held[small] = small + 2
        shift = number % len(SIZES)
        for size in SIZES[shift:] + SIZES[:shift]:
            text = USER_TEXTS[said % len(USER_TEXTS)]
            said += 1
            start = perf_counter()
            bot.chat(text, session_id=sessions[size], language=LANGUAGE)
            elapsed = perf_counter() - start
            if number >= warmup:
                samples[size].append(elapsed)
                held_when_timed[size].append(held[size])
                sent.add(shapes[-1])
            held[size] += 2
    # Every timed turn of every size must have sent the same prompt (a full window).
    if len(sent) != 1:
        raise AssertionError(f"timed turns sent prompts of different lengths: {sorted(sent)}")
    for size, session_id in sessions.items():
        if store.count(session_id) != held[size]:
            raise AssertionError(f"session {session_id}: {store.count(session_id)} messages")
    return {
        "samples": samples,
        "prefill_s": prefill_s,
        "held": {size: (min(v), max(v)) for size, v in held_when_timed.items()},
        "prompt_messages": sent.pop(),
    }


def _short(size: int) -> str:
    """``1_000`` -> ``"1k"``."""
    return f"{size // 1000}k" if size >= 1000 and size % 1000 == 0 else str(size)


def summarise_history(result: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    samples: dict[int, list[float]] = result["samples"]
    stats = {
        size: {
            "median_ms": statistics.median(values) * 1e3,
            "p90_ms": percentile(values, 90) * 1e3,
            "n": len(values),
        }
        for size, values in samples.items()
    }
    base = samples[SIZES[0]]
    ratios = {}
    for size in SIZES[1:]:
        low, high = ratio_ci(samples[size], base, rng)
        ratios[size] = {
            "ratio": statistics.median(samples[size]) / statistics.median(base),
            "ci95_low": low,
            "ci95_high": high,
        }
    return {"stats": stats, "ratios": ratios}


def report_history(results: dict[str, dict[str, Any]], profile: Profile) -> dict[str, Any]:
    rng = random.Random(0)
    print(
        f"1. Per-turn time against stored history: Chatbot.chat + FakeChatModel (no delay); "
        f"window {WINDOW_TURNS} turns / {WINDOW_TOKENS} tokens; running summary OFF here (no "
        "summary call is timed)"
    )
    print(
        f"   {profile.history_turns} timed turns per (store, size) after "
        f"{profile.history_warmup} warm-up rounds; sizes round-robin, order rotated each round; "
        f"pre-fill with append(), {PREFILL_BATCH:,} messages per call; each turn adds 2 "
        f"messages, and every {SMALL_RESET_EVERY} rounds the {SIZES[0]}-message session is put "
        "back to its pre-fill plus one turn (untimed)"
    )
    head = (
        f"{'store':<10}{'pre-filled':>11}{'held when timed':>19}{'median ms':>11}{'p90 ms':>9}"
        f"{'pre-fill s':>12}"
        + "".join(f"{f'{_short(size)}/{SIZES[0]} [95% CI]':>24}" for size in SIZES[1:])
    )
    print(head)
    print("-" * len(head))
    table: dict[str, Any] = {}
    for name, result in results.items():
        if "error" in result:
            print(f"{name:<10}not available: {result['error']}")
            table[name] = {"error": result["error"]}
            continue
        summary = summarise_history(result, rng)
        table[name] = {**summary, "prefill_s": result["prefill_s"], "held": result["held"]}
        for size in SIZES:
            stat = summary["stats"][size]
            low, high = result["held"][size]
            held = f"{low:,}-{high:,}"
            cells = ""
            if size == SIZES[0]:
                cells = "".join(
                    f"{r['ratio']:.3f} [{r['ci95_low']:.2f}, {r['ci95_high']:.2f}]".rjust(24)
                    for r in summary["ratios"].values()
                )
            label = name if size == SIZES[0] else ""
            print(
                f"{label:<10}{size:>11,}{held:>19}{stat['median_ms']:>11.3f}{stat['p90_ms']:>9.3f}"
                f"{result['prefill_s'][size]:>12.2f}{cells}"
            )
    shapes = sorted({r["prompt_messages"] for r in results.values() if "prompt_messages" in r})
    print(
        f"   every timed turn of every store and size sent {', '.join(map(str, shapes))} "
        "messages (system + full window + input; checked)"
    )
    verdicts = {name: t["ratios"][SIZES[-1]]["ratio"] for name, t in table.items() if "ratios" in t}
    missing = [name for name, t in table.items() if "error" in t]
    worst = max(verdicts.values()) if verdicts else float("nan")
    met = bool(verdicts) and worst <= HISTORY_TARGET
    print(
        f"target    100,000 stored messages within {HISTORY_TARGET:.2f}x of 10 on every store: "
        f"{'met' if met else 'NOT met'} (worst {worst:.3f}x"
        + (f"; not measured: {', '.join(missing)}" if missing else "")
        + ")"
    )
    for name, ratio in verdicts.items():
        if ratio > HISTORY_TARGET:
            print(f"          {name}: {ratio:.3f}x")
    return {"table": table, "target_met": met, "worst_ratio": worst}


# -- 2. prompt tokens ----------------------------------------------------------------------------


def _request_tokens(server: OpenAITestServer, body: dict[str, Any]) -> int:
    """Prompt tokens as `OpenAITestServer` bills them: per message text + 4, plus 3."""
    return sum(server.count_tokens(_content(m)) + 4 for m in body["messages"]) + 3


def _is_summary(body: dict[str, Any]) -> bool:
    users = [m for m in body["messages"] if m.get("role") == "user"]
    return bool(users) and _content(users[-1]).startswith(SUMMARY_REQUEST_MARK)


def _parts(server: OpenAITestServer, body: dict[str, Any]) -> dict[str, int]:
    """Where a turn's prompt tokens go: system, summary message, history, new input."""
    messages = body["messages"]
    parts = {"system": 3, "summary message": 0, "history": 0, "input": 0}
    for index, message in enumerate(messages):
        tokens = server.count_tokens(_content(message)) + 4
        if index == len(messages) - 1:
            parts["input"] += tokens
        elif message.get("role") == "system" and _content(message).startswith(SUMMARY_HEADER):
            parts["summary message"] += tokens
        elif message.get("role") == "system":
            parts["system"] += tokens
        else:
            parts["history"] += tokens
    return parts


class PlainChain:
    """The bare LangChain chain over one session, metered with ``get_openai_callback`` per turn."""

    def __init__(self, base_url: str, settings: chatchain.Settings, session_id: str) -> None:
        # LangChain's deprecation and sunset notices fire while the chain is built (its
        # histories are created up front, too), so they are silenced here only.
        with quiet_plain_chain():
            from langchain_community.callbacks import get_openai_callback
            from langchain_core.chat_history import (
                BaseChatMessageHistory,
                InMemoryChatMessageHistory,
            )
            from langchain_core.runnables.history import RunnableWithMessageHistory

            store: dict[str, BaseChatMessageHistory] = {session_id: InMemoryChatMessageHistory()}

            def get_session_history(session_id: str) -> BaseChatMessageHistory:
                return store[session_id]

            prompt = ChatPromptTemplate(
                [("system", SYSTEM), MessagesPlaceholder("history"), ("human", "{input}")]
            )
            model = ChatOpenAI(
                model=MODEL,
                base_url=base_url,
                api_key=SecretStr(API_KEY),
                temperature=settings.temperature,
                timeout=settings.timeout,
                max_retries=settings.max_retries,
                stream_usage=True,
            )
            self.chain: Runnable[Any, Any] = RunnableWithMessageHistory(
                prompt | model,
                get_session_history,
                input_messages_key="input",
                history_messages_key="history",
            )
        self.meter = get_openai_callback
        self.config: RunnableConfig = {"configurable": {"session_id": session_id}}

    def turn(self, text: str) -> tuple[str, int]:
        """One turn: the reply and the prompt tokens the endpoint reported for it."""
        with self.meter() as callback:
            reply = self.chain.invoke({"input": text, "language": LANGUAGE}, config=self.config)
        return str(reply.text), int(callback.prompt_tokens)


def bench_tokens(server: OpenAITestServer, turns: int) -> dict[str, Any]:
    """Drive both contenders through the same conversation; count every prompt token."""
    session = "conversation"
    settings = bench_settings(summarize=SUMMARIZE, base_url=server.base_url)
    bot = chatchain.Chatbot(settings)  # the default store, memory://
    plain = PlainChain(server.base_url, settings, session)
    series: list[dict[str, Any]] = []
    parts = {"system": 0, "summary message": 0, "history": 0, "input": 0, "summary calls": 0}
    plain_parts = {"system": 0, "summary message": 0, "history": 0, "input": 0}
    checks = {"chatchain_server": 0, "plain_server": 0, "plain_callback": 0}
    requests = {"chatchain": 0, "plain": 0}
    max_single = 0
    summary_requests: list[int] = []
    server.clear()
    for number, text in enumerate(USER_TEXTS[:turns], start=1):
        reply = bot.chat(text, session_id=session, language=LANGUAGE)
        bodies = [r["body"] for r in server.requests]
        server.clear()
        main = [b for b in bodies if not _is_summary(b)]
        summaries = [b for b in bodies if _is_summary(b)]
        if len(main) != 1:
            raise AssertionError(f"turn {number}: {len(main)} chat requests from chatchain")
        main_tokens = _request_tokens(server, main[0])
        summary_tokens = sum(_request_tokens(server, b) for b in summaries)
        summary_requests += [_request_tokens(server, b) for b in summaries]
        max_single = max(max_single, main_tokens)
        for key, value in _parts(server, main[0]).items():
            parts[key] += value
        parts["summary calls"] += summary_tokens
        checks["chatchain_server"] += main_tokens + summary_tokens
        requests["chatchain"] += len(bodies)

        plain_text, plain_tokens = plain.turn(text)
        plain_bodies = [r["body"] for r in server.requests]
        server.clear()
        if len(plain_bodies) != 1:
            raise AssertionError(
                f"turn {number}: {len(plain_bodies)} requests from the plain chain"
            )
        plain_server = _request_tokens(server, plain_bodies[0])
        for key, value in _parts(server, plain_bodies[0]).items():
            plain_parts[key] += value
        checks["plain_server"] += plain_server
        checks["plain_callback"] += plain_tokens
        requests["plain"] += 1
        if plain_text != reply.text:
            raise AssertionError(f"turn {number}: the contenders got different replies")
        series.append(
            {
                "turn": number,
                "chatchain": main_tokens,
                "chatchain_summary": summary_tokens,
                "chatchain_messages": len(main[0]["messages"]),
                "plain": plain_tokens,
                "plain_messages": len(plain_bodies[0]["messages"]),
            }
        )
    usage = bot.usage(session)
    bot.close()
    return {
        "series": series,
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "turns": usage.turns,
            "summaries": usage.summaries,
            "requests": usage.successful_requests,
        },
        "checks": checks,
        "requests": requests,
        "parts": parts,
        "plain_parts": plain_parts,
        "max_single_request": max_single,
        "summary_requests": summary_requests,
    }


def report_tokens(result: dict[str, Any]) -> dict[str, Any]:
    series = result["series"]
    usage, checks = result["usage"], result["checks"]
    chat_total = usage["prompt_tokens"]
    plain_total = checks["plain_callback"]
    ratio = chat_total / plain_total
    chat_max = max(t["chatchain"] + t["chatchain_summary"] for t in series)
    plain_max = max(t["plain"] for t in series)
    words = [len(text.split()) for text in USER_TEXTS[: len(series)]]
    answers = [len(ANSWERS[text].split()) for text in USER_TEXTS[: len(series)]]
    summaries = result["summary_requests"]
    print(
        f"2. Prompt tokens over a {len(series)}-turn conversation: one OpenAITestServer (its "
        "count: (chars+3)//4 per message + 4, + 3 per request); user messages "
        f"{statistics.mean(words):.1f} words, answers {statistics.mean(answers):.1f} words, "
        "summaries ~60 words"
    )
    print(
        f"   chatchain bot: DEFAULT settings (window {WINDOW_TURNS} turns / {WINDOW_TOKENS} "
        f"tokens, summarize={SUMMARIZE}); plain chain: whole history every turn"
    )
    head = (
        f"{'contender':<16}{'prompt tokens':>15}{'requests':>10}{'max per turn':>14}"
        f"{'summary calls':>15}"
    )
    print(head)
    print("-" * len(head))
    print(f"{'plain chain':<16}{plain_total:>15,}{result['requests']['plain']:>10}{plain_max:>14,}")
    print(
        f"{'chatchain bot':<16}{chat_total:>15,}{result['requests']['chatchain']:>10}"
        f"{chat_max:>14,}{usage['summaries']:>15}"
    )
    print(
        f"   largest single chatchain request: {result['max_single_request']:,} tokens (a turn); "
        + (
            f"summary requests: {len(summaries)}, {statistics.mean(summaries):,.0f} tokens "
            f"on average, {max(summaries):,} at most"
            if summaries
            else "no summary requests"
        )
    )
    ok_chat = chat_total == checks["chatchain_server"]
    ok_plain = plain_total == checks["plain_server"]
    print(
        f"   cross-check with the server's own count: chatchain bot.usage() {chat_total:,} vs "
        f"server {checks['chatchain_server']:,} ({'equal' if ok_chat else 'DIFFERENT'}); plain "
        f"get_openai_callback {plain_total:,} vs server {checks['plain_server']:,} "
        f"({'equal' if ok_plain else 'DIFFERENT'})"
    )
    parts = result["parts"]
    print(
        "   chatchain tokens by part: "
        + ", ".join(f"{name} {value:,} ({value / chat_total:.0%})" for name, value in parts.items())
    )
    plain_parts = result["plain_parts"]
    print(
        "   plain tokens by part:     "
        + ", ".join(
            f"{name} {value:,} ({value / plain_total:.0%})"
            for name, value in plain_parts.items()
            if name != "summary message"
        )
    )
    cumulative = []
    chat_sum = plain_sum = 0
    marks = {len(series) // 4, len(series) // 2, 3 * len(series) // 4, len(series)}
    for t in series:
        chat_sum += t["chatchain"] + t["chatchain_summary"]
        plain_sum += t["plain"]
        if t["turn"] in marks:
            cumulative.append(f"{t['turn']}: {chat_sum / plain_sum:.1%}")
    print("   cumulative chatchain/plain after turn " + ", ".join(cumulative))
    met = ratio <= TOKENS_TARGET
    print(
        f"target    chatchain at most {TOKENS_TARGET:.0%} of the plain chain's prompt tokens: "
        f"{'met' if met else 'NOT met'} ({ratio:.1%})"
    )
    return {
        "chatchain_prompt_tokens": chat_total,
        "plain_prompt_tokens": plain_total,
        "ratio": ratio,
        "target_met": met,
        "chatchain_max_turn_tokens": chat_max,
        "chatchain_max_request_tokens": result["max_single_request"],
        "plain_max_turn_tokens": plain_max,
        "summary_calls": usage["summaries"],
        "requests": result["requests"],
        "checks": {**checks, "chatchain_usage": chat_total, "equal": ok_chat and ok_plain},
        "parts": parts,
        "plain_parts": plain_parts,
    }


# -- 3. throughput across processes --------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One worker's share of a run."""

    url: str
    sessions: tuple[str, ...]
    shared: bool
    turns: int
    seed: int
    warmup_session: str


def _worker(index: int, inbox: Any, results: Any) -> None:
    """A worker process: runs the jobs it is sent until it gets ``None``."""
    while True:
        job = inbox.get()
        if job is None:
            return
        try:
            _run_job(index, job, inbox, results)
        except BaseException as exc:
            results.put(("error", index, f"{type(exc).__name__}: {exc}"))
            if not isinstance(exc, Exception):
                raise


def _run_job(index: int, job: Job, inbox: Any, results: Any) -> None:
    model = FakeChatModel(delay=FAKE_DELAY_S, respond=respond)
    with chatchain.Chatbot(
        bench_settings(summarize=False), llm=model, store=open_store(job.url)
    ) as bot:
        for number in range(WORKER_WARMUP):
            bot.chat(USER_TEXTS[number], session_id=job.warmup_session, language=LANGUAGE)
        results.put(("ready", index, None))
        start_at = inbox.get()
        if start_at is None:  # another worker failed: the run is off
            return
        rng = random.Random(job.seed)
        sessions = job.sessions
        latencies = []
        perf_counter = time.perf_counter
        time.sleep(max(0.0, start_at - time.monotonic()))
        cpu = time.process_time()
        started = time.monotonic()
        for number in range(job.turns):
            session = rng.choice(sessions) if job.shared else sessions[number % len(sessions)]
            text = USER_TEXTS[(number + index) % len(USER_TEXTS)]
            begin = perf_counter()
            bot.chat(text, session_id=session, language=LANGUAGE)
            latencies.append(perf_counter() - begin)
        ended = time.monotonic()
        cpu = time.process_time() - cpu
    results.put(
        ("done", index, {"start": started, "end": ended, "cpu_s": cpu, "latencies": latencies})
    )


class Workers:
    """Spawned worker processes, started once, each given one job per run."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._results = context.Queue()
        self._inboxes = [context.Queue() for _ in range(count)]
        self._processes = [
            context.Process(
                target=_worker,
                args=(i, inbox, self._results),
                name=f"bench-memory-worker-{i}",
                daemon=True,
            )
            for i, inbox in enumerate(self._inboxes)
        ]
        for process in self._processes:
            process.start()

    def _collect(self, kind: str, count: int) -> dict[int, Any]:
        found: dict[int, Any] = {}
        errors: list[str] = []
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while len(found) + len(errors) < count:
            try:
                what, index, payload = self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for p in self._processes if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"workers stopped or hung: {dead or 'timeout'}") from None
                continue
            if what == "error":
                errors.append(f"worker {index}: {payload}")
            elif what == kind:
                found[index] = payload
        if errors:
            for index in found:  # the ready ones wait for a start time: call the run off
                self._inboxes[index].put(None)
            raise RuntimeError("; ".join(errors))
        return found

    def run(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """Run one job per worker (the first ``len(jobs)`` workers), all starting together."""
        for inbox, job in zip(self._inboxes[: len(jobs)], jobs, strict=True):
            inbox.put(job)
        self._collect("ready", len(jobs))
        start_at = time.monotonic() + 0.05
        for inbox in self._inboxes[: len(jobs)]:
            inbox.put(start_at)
        done = self._collect("done", len(jobs))
        return [done[i] for i in range(len(jobs))]

    def close(self) -> None:
        for inbox in self._inboxes:
            inbox.put(None)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():  # our own child, by its handle
                process.terminate()
                process.join(timeout=5)


def bench_throughput(
    workers: Workers, name: str, url: str, turns: int, reps: int
) -> dict[str, Any]:
    """Turns per second for each scenario and process count, ``reps`` times each."""
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {
        s: {p: [] for p in PROCESSES} for s in SCENARIOS
    }
    store = open_store(url)
    try:
        for rep in range(reps):
            counts = PROCESSES if rep % 2 == 0 else PROCESSES[::-1]
            for scenario in SCENARIOS:
                for procs in counts:
                    tag = f"tp-{name}-{scenario}-{procs}p-{rep}"
                    if scenario == "own":
                        plan = [
                            tuple(f"{tag}-p{i}-s{k}" for k in range(SESSIONS_PER_RUN))
                            for i in range(procs)
                        ]
                    else:
                        shared = tuple(f"{tag}-s{k}" for k in range(SESSIONS_PER_RUN))
                        plan = [shared] * procs
                    for session in {s for sessions in plan for s in sessions}:
                        prefill(store, session, THROUGHPUT_PREFILL)
                    jobs = [
                        Job(
                            url, sessions, scenario == "shared", turns, rep * 100 + i, f"{tag}-w{i}"
                        )
                        for i, sessions in enumerate(plan)
                    ]
                    outcome = workers.run(jobs)
                    span = max(o["end"] for o in outcome) - min(o["start"] for o in outcome)
                    latencies = [x for o in outcome for x in o["latencies"]]
                    runs[scenario][procs].append(
                        {
                            "turns": procs * turns,
                            "span_s": span,
                            "turns_per_s": procs * turns / span,
                            "cpu_ms_per_turn": sum(o["cpu_s"] for o in outcome)
                            / (procs * turns)
                            * 1e3,
                            "median_ms": statistics.median(latencies) * 1e3,
                            "p90_ms": percentile(latencies, 90) * 1e3,
                            "slow_share": sum(x for x in latencies if x > SLOW_TURN_S)
                            / sum(latencies),
                            "latencies_ms": [round(x * 1e3, 3) for x in latencies],
                        }
                    )
    finally:
        store.close()
    return runs


def report_throughput(results: dict[str, dict[str, Any]], profile: Profile) -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"3. Throughput across processes (spawn): {profile.throughput_turns} turns per process "
        f"per run, FakeChatModel(delay={FAKE_DELAY_S}), window {WINDOW_TURNS} turns, summary "
        f"off; {profile.throughput_reps} run(s) per cell (median shown); {cores} usable cores "
        "for the workers, the servers and this process"
    )
    print(
        f"   own: {SESSIONS_PER_RUN} sessions per process, round-robin; shared: "
        f"{SESSIONS_PER_RUN} sessions for all processes, picked at random (one turn at a time "
        "per session)"
    )
    head = (
        f"{'store':<10}{'sessions':<10}{'1 proc t/s':>11}{'4 procs t/s':>13}{'4p/1p':>8}"
        f"{'median ms 1p/4p':>19}{'p90 ms 1p/4p':>17}{'client CPU ms/turn':>20}"
        f"{'4p slow share':>15}"
    )
    print(head)
    print("-" * len(head))
    table: dict[str, Any] = {}
    for name, runs in results.items():
        if "error" in runs:
            print(f"{name:<10}not available: {runs['error']}")
            table[name] = {"error": runs["error"]}
            continue
        table[name] = {}
        for scenario in SCENARIOS:
            cells = {
                procs: {
                    key: statistics.median(r[key] for r in runs[scenario][procs])
                    for key in (
                        "turns_per_s",
                        "median_ms",
                        "p90_ms",
                        "cpu_ms_per_turn",
                        "slow_share",
                    )
                }
                for procs in PROCESSES
            }
            one, four = cells[PROCESSES[0]], cells[PROCESSES[-1]]
            ratio = four["turns_per_s"] / one["turns_per_s"]
            table[name][scenario] = {"cells": cells, "ratio": ratio, "runs": runs[scenario]}
            label = name if scenario == SCENARIOS[0] else ""
            print(
                f"{label:<10}{scenario:<10}{one['turns_per_s']:>11.1f}{four['turns_per_s']:>13.1f}"
                f"{ratio:>8.2f}"
                f"{one['median_ms']:>11.2f} / {four['median_ms']:<6.2f}"
                f"{one['p90_ms']:>9.2f} / {four['p90_ms']:<6.2f}"
                f"{one['cpu_ms_per_turn']:>12.2f} / {four['cpu_ms_per_turn']:<6.2f}"
                f"{four['slow_share']:>10.0%}"
            )
    print(
        f"   no target; {cores} cores bound the 4-process figure at about {cores} / (CPU per "
        "turn of the client, above, plus the server's); median/p90 are per-turn latencies;"
    )
    print(
        f"   slow share = the part of all turn time spent in turns over {SLOW_TURN_S * 1e3:.0f} "
        "ms: waits for another process's session lock (shared) or a busy SQLite file, and "
        "CPU contention"
    )
    return table


# -- 4. a verbose summarizer ---------------------------------------------------------------------

VERBOSE_CONTENDERS: tuple[tuple[str, int | None], ...] = (
    ("unbounded summary", None),
    ("summary budget", SUMMARY_TOKENS),
)


def bench_verbose(server: OpenAITestServer, turns: int) -> dict[str, dict[str, Any]]:
    """Each contender through the conversation against the echo; every request counted."""
    results: dict[str, dict[str, Any]] = {}
    for name, budget in VERBOSE_CONTENDERS:
        settings = bench_settings(summarize=True, base_url=server.base_url, summary_tokens=budget)
        bot = chatchain.Chatbot(settings)
        server.clear()
        turn_tokens: list[int] = []
        summary_tokens: list[int] = []
        system = 0
        for text in USER_TEXTS[:turns]:
            bot.chat(text, session_id="verbose", language=LANGUAGE)
            for request in server.requests:
                body = request["body"]
                tokens = _request_tokens(server, body)
                if _is_summary(body):
                    summary_tokens.append(tokens)
                else:
                    turn_tokens.append(tokens)
                    system = server.count_tokens(_content(body["messages"][0])) + 4
            server.clear()
        summary = bot.summary("verbose") or ""
        bot.close()
        results[name] = {
            "summary_tokens_setting": budget,
            "summary_chars": len(summary),
            "summary_message_tokens": server.count_tokens(SUMMARY_HEADER + summary) + 4,
            "last_turn_tokens": turn_tokens[-1],
            "max_turn_tokens": max(turn_tokens),
            "max_summary_request_tokens": max(summary_tokens, default=0),
            "summary_calls": len(summary_tokens),
            "all_prompt_tokens": sum(turn_tokens) + sum(summary_tokens),
            "system_tokens": system,
            "series": turn_tokens,
        }
    return results


def report_verbose(results: dict[str, dict[str, Any]], turns: int) -> dict[str, Any]:
    print(
        f"4. A verbose summarizer: {turns} turns against OpenAITestServer's echo (a summary "
        "request is answered with the whole request, old summary included); window "
        f"{WINDOW_TURNS} turns / {WINDOW_TOKENS} tokens; tokens in the server's count"
    )
    columns = (
        ("summary chars", "summary_chars"),
        ("summary tokens", "summary_message_tokens"),
        ("last turn", "last_turn_tokens"),
        ("max turn", "max_turn_tokens"),
        ("max summary req", "max_summary_request_tokens"),
        ("all prompt tokens", "all_prompt_tokens"),
    )
    head = f"{'contender':<26}" + "".join(f"{title:>18}" for title, _ in columns)
    print(head)
    print("-" * len(head))
    for name, result in results.items():
        budget = result["summary_tokens_setting"]
        label = f"{name} ({'none' if budget is None else budget})"
        print(f"{label:<26}" + "".join(f"{result[key]:>18,}" for _, key in columns))
    before, after = (results[name] for name, _ in VERBOSE_CONTENDERS)
    print(
        f"{'budget / unbounded':<26}"
        + "".join(f"{after[key] / before[key]:>18.3f}" for _, key in columns)
    )
    ceiling = after["system_tokens"] + SUMMARY_TOKENS + WINDOW_TOKENS
    within = after["max_turn_tokens"] <= ceiling
    print(
        f"   documented ceiling: system {after['system_tokens']} + CHATCHAIN_SUMMARY_TOKENS "
        f"{SUMMARY_TOKENS} + CHATCHAIN_WINDOW_TOKENS {WINDOW_TOKENS:,} = {ceiling:,} tokens; "
        f"largest turn with the budget: {after['max_turn_tokens']:,} "
        f"({'within' if within else 'OVER'}); summary calls {before['summary_calls']} / "
        f"{after['summary_calls']}"
    )
    return {
        "contenders": {
            k: {n: v for n, v in r.items() if n != "series"} for k, r in results.items()
        },
        "ceiling": ceiling,
        "within_ceiling": within,
    }


# -- the run -------------------------------------------------------------------------------------


def server_versions(urls: dict[str, str]) -> dict[str, str]:
    found = {"SQLite": sqlite3.sqlite_version}
    if "redis" in urls:
        found["redis-server"] = _servers.redis_version(urls["redis"])
    if "postgres" in urls:
        found["PostgreSQL"] = _servers.postgres_version(urls["postgres"])
    return found


def all_versions() -> dict[str, str]:
    found = versions()
    for name in ("redis", "psycopg", "psycopg-pool"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (under ~2 minutes)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--parts", default="1,2,3,4", help="which parts to run, comma-separated (1,2,3,4)"
    )
    args = parser.parse_args(argv)
    try:
        args.parts = {int(p) for p in args.parts.split(",") if p.strip()}
    except ValueError:
        parser.error("--parts takes numbers 1 to 4, e.g. --parts 1,3")
    if not args.parts or not args.parts <= {1, 2, 3, 4}:
        parser.error("--parts takes numbers 1 to 4, e.g. --parts 1,3")
    return args


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = QUICK if args.quick else FULL
    clean_environment()
    wall = time.perf_counter()
    errors: dict[str, str] = {}
    payload: dict[str, Any] = {}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chatchain-bench-")))
        urls = {"memory": "memory://", "sqlite": f"sqlite:///{tmp / 'history.db'}"}
        needs_servers = bool(args.parts & {1, 3})
        for name, launch in (("redis", _servers.redis_url), ("postgres", _servers.postgres_url)):
            if not needs_servers:
                continue
            try:  # a launcher that fails cleans up after itself; the rows say why
                urls[name] = stack.enter_context(launch())
            except Exception as exc:
                errors[name] = _reason(exc)
        info = {
            "machine": machine(),
            "versions": all_versions(),
            "servers": server_versions(urls),
            "profile": "quick" if args.quick else "default",
            "config": {
                "window_turns": WINDOW_TURNS,
                "window_tokens": WINDOW_TOKENS,
                "summarize_default": SUMMARIZE,
                **profile.__dict__,
            },
        }
        m = info["machine"]
        print(f"machine   {m['cpu']}; {m['cores']} cores ({m['usable_cores']} usable)")
        print(f"          {m['python']}; {m['platform']}")
        print("versions  " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
        print(
            "servers   "
            + ", ".join(f"{k} {v}" for k, v in info["servers"].items())
            + "; all started by this script on 127.0.0.1 (PostgreSQL with fsync, "
            "synchronous_commit and full_page_writes off, as the tests' launcher runs it; "
            "redis-server without persistence; SQLite files in a temporary directory, "
            "the store's own settings)"
        )
        for name, reason in errors.items():
            print(f"          {name}: not available ({reason})")
        print(f"profile   {info['profile']} ({'--quick' if args.quick else 'no --quick'})")
        print(flush=True)

        if 1 in args.parts:
            history: dict[str, dict[str, Any]] = {}
            for name in ("memory", "sqlite", "redis", "postgres"):
                if name not in urls:
                    history[name] = {"error": errors.get(name, "not started")}
                    continue
                gc.collect()
                try:
                    store = open_store(urls[name])
                except Exception as exc:  # e.g. a backend whose driver is missing
                    history[name] = {"error": _reason(exc)}
                    continue
                try:
                    history[name] = bench_history(
                        store, profile.history_turns, profile.history_warmup
                    )
                finally:
                    store.close()
                    del store
                    gc.collect()
            payload["history"] = report_history(history, profile)
            payload["history_samples_ms"] = {
                name: {str(size): [s * 1e3 for s in v] for size, v in r["samples"].items()}
                for name, r in history.items()
                if "samples" in r
            }
            print(flush=True)

        if 2 in args.parts:
            with OpenAITestServer(host="127.0.0.1", reply=server_reply) as server:
                tokens = bench_tokens(server, CONVERSATION_TURNS)
            payload["tokens"] = report_tokens(tokens)
            payload["tokens_series"] = tokens["series"]
            print(flush=True)

        if 4 in args.parts:
            with OpenAITestServer(host="127.0.0.1", reply=echo_reply) as server:
                verbose = bench_verbose(server, CONVERSATION_TURNS)
            payload["verbose"] = report_verbose(verbose, CONVERSATION_TURNS)
            payload["verbose_series"] = {name: r["series"] for name, r in verbose.items()}
            print(flush=True)

        if 3 in args.parts:
            urls["sqlite"] = f"sqlite:///{tmp / 'throughput.db'}"
            throughput: dict[str, dict[str, Any]] = {}
            workers = Workers(max(PROCESSES))
            try:
                for name in ("redis", "postgres", "sqlite"):
                    if name not in urls:
                        throughput[name] = {"error": errors.get(name, "not started")}
                        continue
                    try:
                        throughput[name] = bench_throughput(
                            workers,
                            name,
                            urls[name],
                            profile.throughput_turns,
                            profile.throughput_reps,
                        )
                    except Exception as exc:  # the row says why; the other stores still run
                        throughput[name] = {"error": _reason(exc)}
            finally:
                workers.close()
            payload["throughput"] = report_throughput(throughput, profile)
            print(flush=True)

    elapsed = time.perf_counter() - wall
    print(f"wall      {elapsed:.1f} s")
    if args.json is not None:
        data = {**info, "elapsed_s": elapsed, "unavailable": errors, **payload}
        args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
