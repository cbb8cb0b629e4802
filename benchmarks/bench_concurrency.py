"""Turns per second against concurrency: chatchain, the plain LangChain chain, the raw client.

Usage::

    .venv/bin/python benchmarks/bench_concurrency.py [--quick] [--json PATH]

What runs
    One asyncio event loop in this process drives 1, 4, 16 and 64 concurrent sessions against
    one `chatchain.testing.OpenAITestServer` on 127.0.0.1 that runs in a process of its own
    (``_servers.openai_test_server``), so the server's threads do not share this
    process's GIL with the clients being measured. Three contenders, the classes of
    ``bench_turn.py`` with their async calls:

    ``raw client``     ``openai.AsyncOpenAI(max_retries=0)``, the history kept by hand;
    ``plain chain``    a bare LangChain prompt | ``ChatOpenAI`` in ``RunnableWithMessageHistory``,
                       ``ainvoke`` inside ``get_openai_callback()``;
    ``chatchain bot``  ``Chatbot.achat``, default settings (``memory://`` store).

    Before timing, each contender runs one session against an in-process server, and the
    script checks that all of them send the same request bodies and get the right replies.

Method
    A *run* is one contender at one concurrency C: C coroutines start together, each runs
    sessions of `TURNS_PER_SESSION` turns (fresh session ids, so every contender sends the
    same prompts) until the run's turns are done. Kept: throughput = turns / wall time of the
    run, CPU time per turn of this process (``time.process_time``) and of the server's (from
    ``/proc``), and every turn's latency.
    A *round* runs every (concurrency, contender) once, the contenders in an order rotated by
    one every round; warm-up rounds come first and are discarded. Cells are the median over
    the rounds; ratios are of those medians, with a 95% bootstrap interval over the runs.

    The server answers in well under a millisecond of its own CPU and uses a small share of
    a core, so each contender's turns per second are bounded by its own CPU per turn in this
    process (one event loop, one GIL); the CPU table shows that directly. The machine may be
    shared: compare the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import _servers
from bench_turn import (
    API_KEY,
    MODEL,
    SYSTEM,
    ChatchainBot,
    PlainChain,
    RawClient,
    clean_environment,
    machine,
    percentile,
    quiet_plain_chain,
    ratio_ci,
    versions,
)
from pydantic import SecretStr

import chatchain
from chatchain.testing import OpenAITestServer

CONCURRENCY = (1, 4, 16, 64)
TEXTS = ("Hi! I'm Bob.", "What's my name?", "What did I say first?")
TURNS_PER_SESSION = len(TEXTS)
PAIRS = {
    "chatchain bot / plain chain": ("chatchain bot", "plain chain"),
    "chatchain bot / raw client": ("chatchain bot", "raw client"),
    "plain chain / raw client": ("plain chain", "raw client"),
}
PER_TURN_TARGET = 1.10  # bench_turn's: chatchain's time per turn at most 1.10x the plain chain's


class AsyncContender(Protocol):
    name: str

    def ainvoke(self, session_id: str, text: str) -> Awaitable[str]:
        """Run one non-streamed turn; return the reply text."""
        ...


@dataclass(frozen=True)
class Profile:
    turns: int  # per run; a multiple of max(CONCURRENCY) * TURNS_PER_SESSION
    rounds: int
    warmup: int


QUICK = Profile(turns=192, rounds=2, warmup=1)
FULL = Profile(turns=256, rounds=8, warmup=1)


def settings(base_url: str) -> chatchain.Settings:
    """chatchain's defaults, with the endpoint; nothing from the environment or a ``.env``."""
    return chatchain.Settings(
        _env_file=None,  # type: ignore[call-arg]
        api_key=SecretStr(API_KEY),
        base_url=base_url,
        model=MODEL,
        system_prompt=SYSTEM,
    )


def contenders(base_url: str) -> list[Any]:
    s = settings(base_url)
    return [RawClient(base_url, s.temperature), PlainChain(base_url, s), ChatchainBot(s)]


async def close(found: list[Any]) -> None:
    for contender in found:
        if isinstance(contender, RawClient):
            await contender.aclose()
        contender.close()


async def run_once(
    contender: AsyncContender, concurrency: int, turns: int, tag: str
) -> dict[str, Any]:
    """One run: ``concurrency`` coroutines share ``turns`` turns.

    Returns turns/s, this process's CPU ms per turn, and every turn's latency in ms.
    """
    per_task = turns // concurrency
    perf_counter = time.perf_counter

    async def task(index: int) -> list[float]:
        latencies = []
        for number in range(per_task):
            text = TEXTS[number % TURNS_PER_SESSION]
            session_id = f"{tag}-t{index}-s{number // TURNS_PER_SESSION}"
            begin = perf_counter()
            reply = await contender.ainvoke(session_id, text)
            latencies.append(perf_counter() - begin)
            if reply != f"Echo: {text}":
                raise AssertionError(f"{contender.name}: unexpected reply {reply!r}")
        return latencies

    cpu = time.process_time()
    start = perf_counter()
    done = await asyncio.gather(*(task(i) for i in range(concurrency)))
    span = perf_counter() - start
    cpu = time.process_time() - cpu
    count = per_task * concurrency
    return {
        "turns_per_s": count / span,
        "cpu_ms_per_turn": cpu / count * 1e3,
        "latencies_ms": [x * 1e3 for latencies in done for x in latencies],
    }


async def check_payloads() -> None:
    """One session per contender on an in-process server: same bodies, right replies."""
    with OpenAITestServer(host="127.0.0.1") as server:
        found = contenders(server.base_url)
        try:
            bodies: dict[str, list[Any]] = {}
            for contender in found:
                server.clear()
                await run_once(contender, 1, TURNS_PER_SESSION, f"check-{contender.name}")
                bodies[contender.name] = [
                    {k: v for k, v in r["body"].items() if (k, v) != ("stream", False)}
                    for r in server.requests
                ]
            reference = bodies[found[0].name]
            if len(reference) != TURNS_PER_SESSION:
                raise AssertionError(f"{len(reference)} requests, expected {TURNS_PER_SESSION}")
            for name, sent in bodies.items():
                if sent != reference:
                    raise AssertionError(f"request bodies differ:\n{reference}\n{name}: {sent}")
        finally:
            await close(found)


async def measure(server: _servers.ServerProcess, profile: Profile) -> dict[str, Any]:
    """Every (concurrency, contender) once per round, contenders rotated; warm-up first."""
    found = contenders(server.base_url)
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {
        c.name: {n: [] for n in CONCURRENCY} for c in found
    }
    try:
        for number in range(profile.warmup + profile.rounds):
            shift = number % len(found)
            order = found[shift:] + found[:shift]
            for concurrency in CONCURRENCY:
                for contender in order:
                    tag = f"r{number}-c{concurrency}"
                    server_cpu = server.cpu_seconds()
                    run = await run_once(contender, concurrency, profile.turns, tag)
                    server_cpu = server.cpu_seconds() - server_cpu
                    run["server_cpu_ms_per_turn"] = server_cpu / profile.turns * 1e3
                    run["server_core_share"] = server_cpu / (profile.turns / run["turns_per_s"])
                    if number >= profile.warmup:
                        runs[contender.name][concurrency].append(run)
            label = "warm-up round" if number < profile.warmup else "round"
            print(f"   {label} {number + 1} of {profile.warmup + profile.rounds} done", flush=True)
    finally:
        await close(found)
    return runs


def summarise(runs: dict[str, dict[int, list[dict[str, Any]]]]) -> dict[str, Any]:
    rng = random.Random(0)
    cells: dict[str, dict[int, dict[str, float]]] = {}
    for name, by_concurrency in runs.items():
        cells[name] = {}
        for concurrency, found in by_concurrency.items():
            latencies = [x for run in found for x in run["latencies_ms"]]
            cells[name][concurrency] = {
                "turns_per_s": statistics.median(run["turns_per_s"] for run in found),
                **{
                    key: statistics.median(run[key] for run in found)
                    for key in ("cpu_ms_per_turn", "server_cpu_ms_per_turn", "server_core_share")
                },
                "median_ms": statistics.median(latencies),
                "p90_ms": percentile(latencies, 90),
                "runs": len(found),
            }
    ratios: dict[str, dict[int, dict[str, float]]] = {}
    for label, (top, bottom) in PAIRS.items():
        ratios[label] = {}
        for concurrency in CONCURRENCY:
            a = [run["turns_per_s"] for run in runs[top][concurrency]]
            b = [run["turns_per_s"] for run in runs[bottom][concurrency]]
            low, high = ratio_ci(a, b, rng)
            ratios[label][concurrency] = {
                "ratio": statistics.median(a) / statistics.median(b),
                "ci95_low": low,
                "ci95_high": high,
            }
    # The per-turn target, read as time per turn under load: plain t/s over chatchain t/s.
    worst = max(1 / r["ratio"] for r in ratios["chatchain bot / plain chain"].values())
    return {
        "cells": cells,
        "ratios": ratios,
        "per_turn_target": PER_TURN_TARGET,
        "worst_time_ratio": worst,
        "per_turn_target_met": worst <= PER_TURN_TARGET,
    }


def report(summary: dict[str, Any], profile: Profile, elapsed: float) -> None:
    print(
        f"method    {profile.turns} turns per run (sessions of {TURNS_PER_SESSION} turns), "
        f"{profile.rounds} rounds after {profile.warmup} warm-up; contenders rotated each round; "
        "one asyncio loop; server in its own process on 127.0.0.1"
    )
    print(f"wall      {elapsed:.1f} s")
    print()
    cells = summary["cells"]
    head = f"{'contender':<16}" + "".join(f"{f'{c} sessions':>14}" for c in CONCURRENCY)
    print(head + "   (turns/s, median of runs)")
    print("-" * len(head))
    for name, row in cells.items():
        print(f"{name:<16}" + "".join(f"{row[c]['turns_per_s']:>14.1f}" for c in CONCURRENCY))
    print()
    print(f"{'CPU ms per turn, client / server (share of a core the server used)':<16}")
    for name, row in cells.items():
        print(
            f"{name:<16}"
            + "".join(
                f"{row[c]['cpu_ms_per_turn']:>6.2f} /{row[c]['server_cpu_ms_per_turn']:>5.2f}"
                f" ({row[c]['server_core_share']:>4.0%})"
                for c in CONCURRENCY
            )
        )
    print()
    print(f"{'median latency / p90 (ms)':<16}")
    for name, row in cells.items():
        print(
            f"{name:<16}"
            + "".join(f"{row[c]['median_ms']:>7.1f} /{row[c]['p90_ms']:>5.0f}" for c in CONCURRENCY)
        )
    print()
    print(f"{'turns/s ratio [95% CI]':<30}" + "".join(f"{c:>20}" for c in CONCURRENCY))
    for label, by_concurrency in summary["ratios"].items():
        print(
            f"{label:<30}"
            + "".join(
                f"{r['ratio']:.3f} [{r['ci95_low']:.2f}, {r['ci95_high']:.2f}]".rjust(20)
                for r in by_concurrency.values()
            )
        )
    print()
    verdict = "met" if summary["per_turn_target_met"] else "NOT met"
    print(
        f"per turn  chatchain's time per turn under load (plain t/s / chatchain t/s) at most "
        f"{PER_TURN_TARGET:.2f}x the plain chain's at every concurrency: {verdict} "
        f"(worst {summary['worst_time_ratio']:.3f}x)"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about 1 minute)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = QUICK if args.quick else FULL
    clean_environment()
    started = time.perf_counter()
    with quiet_plain_chain():
        asyncio.run(check_payloads())
        print(
            f"{', '.join(map(str, CONCURRENCY))} concurrent sessions; request bodies checked "
            "equal across contenders",
            flush=True,
        )
        with _servers.openai_test_server() as server:
            runs = asyncio.run(measure(server, profile))
    elapsed = time.perf_counter() - started
    summary = summarise(runs)
    info = {
        "machine": machine(),
        "versions": versions(),
        "profile": "quick" if args.quick else "default",
        "config": {**profile.__dict__, "concurrency": CONCURRENCY, "elapsed_s": elapsed},
    }
    report(summary, profile, elapsed)
    if args.json is not None:
        payload = {**info, **summary, "runs": runs}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
