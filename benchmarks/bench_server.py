"""The chat service (``chatchain serve``): overhead per turn, open streams, workers.

Usage::

    .venv/bin/python benchmarks/bench_server.py [--quick] [--json PATH] [--no-docs]

What runs (everything on 127.0.0.1, started and stopped here)
    One `chatchain.testing.OpenAITestServer` in a process of its own (``_servers``), one
    SQLite store per part in a temporary folder, and ``chatchain serve`` processes (uvicorn,
    the real CLI) over it with requests-per-minute and streams-per-user limits off. Clients
    are ``httpx.AsyncClient`` on one event loop in this process.

1. Overhead per turn. At 1, 16 and 64 concurrent sessions, three contenders run side by side,
   round-robin with the order rotated every round: ``Chatbot.achat`` in this process over
   its own SQLite store (``in-process``), and one 1-worker ``chatchain serve`` answering
   ``POST /v1/sessions/{id}/messages`` (``native API``) and ``POST /v1/chat/completions``
   with ``X-Session-Id`` (``OpenAI API``), each over HTTP with keep-alive. Each coroutine runs
   sessions of three turns (fresh session ids, so every contender sends the same prompts).
   Kept: every turn's latency. Ratio: median server turn / median in-process turn, with a
   95% bootstrap interval. **Target: at most 1.3x at 16 sessions.**
2. Open streams. The test server streams a chunk every ``--chunk-interval`` seconds (a model
   writing); ``--streams`` native SSE turns start within ``--ramp`` seconds on one worker,
   each on its own session. Kept: the most streams open at once (first text event received,
   ``done`` not yet), errors (a status other than 200, an ``error`` event, no ``done``, a
   wrong text, an exception), and the gaps between a stream's text events (ideal: the
   interval). **Target: 1,000 open streams, no errors; the p99 gap is reported.**
3. Turns per second with 1 and 2 workers: 64 concurrent sessions of native JSON turns
   against ``chatchain serve --workers N`` over one SQLite file; the median of the runs.
   The machine's two cores also run this client and the test server: read the ratio as
   what a second worker adds on this machine, not as a bound.

4. Server CPU per relayed chunk (``--parts 4``, not in the default run): the test server
   streams a ``--relay-chunks`` reply as fast as it can; ``--relay-streams`` turns at once on
   one route, native SSE and the OpenAI route interleaved over ``--relay-rounds`` rounds after
   a warm-up. Kept: the worker's CPU (``/proc``) over the chunks the endpoint streamed, turn
   start and end included; each relayed text is checked to be exactly the reply. With
   ``--litellm`` (or ``BENCH_LITELLM``) naming the ``litellm`` command of a virtual
   environment holding ``litellm[proxy]`` (not a dependency of chatchain; see
   ``benchmarks/README.md``), a LiteLLM proxy relays the same stream from the same test server
   too, in the same rounds, read by the same client as the OpenAI route, and the ratios of
   chatchain's routes to it are printed. **Target: at most 0.5x LiteLLM on both routes.**
   Printed, not written to the docs. Runtime: about 3 minutes with LiteLLM and 3 rounds.

The figures of parts 1-3 go to ``docs/benchmarks.md`` (its "The chat service" section, replaced in
place) and ``docs/img/bench-server.png``, unless ``--no-docs``. Runtime: about 3 minutes
(``--quick``: about 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import _servers
import httpx
from bench_turn import API_KEY, MODEL, clean_environment, machine, percentile, ratio_ci, versions

import chatchain
from chatchain.stores import open_store
from chatchain.testing._stores import free_port
from chatchain.users import Users

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "img" / "bench-server.png"
BEGIN, END = "<!-- bench_server: begin -->", "<!-- bench_server: end -->"
TEXTS = ("Hi! I'm Bob.", "What's my name?", "What did I say first?")
CONTENDERS = ("in-process", "native API", "OpenAI API")
TARGET_RATIO = 1.3
TARGET_STREAMS = 1000

Turn = Callable[[str, str], Awaitable[None]]


# -- the service ------------------------------------------------------------------------------


def service_env(endpoint: str) -> dict[str, str]:
    """The settings of every service and of the in-process bot: no summaries, limits off."""
    return {
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_BASE_URL": endpoint,
        "OPENAI_MODEL": MODEL,
        "CHATCHAIN_SUMMARIZE": "false",
        "CHATCHAIN_SERVER_REQUESTS_PER_MINUTE": "0",
        "CHATCHAIN_SERVER_STREAMS_PER_USER": "0",
    }


def add_user(store_url: str, name: str) -> str:
    """A user in the store, as ``chatchain users add NAME`` does; returns the token."""
    with closing(open_store(store_url)) as store:
        return Users(store).add(name)


@contextmanager
def serve(
    store_url: str, endpoint: str, workers: int = 1, env: dict[str, str] | None = None
) -> Iterator[_servers.ServerProcess]:
    """``chatchain serve`` over ``store_url``, once ``/healthz`` answers (with one worker, its
    process is the worker); ``env``: more settings."""
    port = free_port()
    env = {**os.environ, **service_env(endpoint), **(env or {})}
    argv = [sys.executable, "-m", "chatchain", "serve", "--port", str(port)]
    argv += ["--store", store_url, "--workers", str(workers)]
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"chatchain serve exited: {process.stderr.read()[-2000:]}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("chatchain serve did not start within 60 s")
            time.sleep(0.1)
        yield _servers.ServerProcess(url, process.pid)
    finally:
        process.terminate()  # our own child, by its handle
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


def client(url: str, token: str, connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {token}"},
        timeout=httpx.Timeout(120.0),
        # Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them
        # under a request about to reuse one.
        limits=httpx.Limits(
            max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=2
        ),
    )


# -- part 1: overhead per turn ------------------------------------------------------------


def in_process_turn(bot: chatchain.Chatbot) -> Turn:
    async def turn(session_id: str, text: str) -> None:
        reply = await bot.achat(text, session_id=session_id, user_id="bench")
        assert reply.text == f"Echo: {text}", reply.text

    return turn


def native_turn(http: httpx.AsyncClient) -> Turn:
    async def turn(session_id: str, text: str) -> None:
        answer = await http.post(f"/v1/sessions/{session_id}/messages", json={"text": text})
        assert answer.status_code == 200, answer.text
        assert answer.json()["text"] == f"Echo: {text}"

    return turn


def openai_turn(http: httpx.AsyncClient) -> Turn:
    async def turn(session_id: str, text: str) -> None:
        answer = await http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": text}]},
            headers={"X-Session-Id": session_id},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == f"Echo: {text}"

    return turn


async def run(turn: Turn, concurrency: int, turns: int, prefix: str) -> list[float]:
    """``turns`` turns by ``concurrency`` coroutines, in sessions of `TEXTS`; each latency."""
    latencies: list[float] = []
    left = [turns]

    async def worker(number: int) -> None:
        session = 0
        while left[0] > 0:
            session += 1
            for text in TEXTS:
                if left[0] <= 0:
                    return
                left[0] -= 1
                started = time.perf_counter()
                await turn(f"{prefix}-{number}-{session}", text)
                latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return latencies


async def overhead(
    endpoint: str, folder: Path, levels: tuple[int, ...], rounds: int, turns: int
) -> dict[str, Any]:
    os.environ.update(service_env(endpoint))
    settings = chatchain.Settings.load(None)
    local_store = f"sqlite:///{folder / 'in-process.db'}"
    bot = chatchain.Chatbot(settings, store=open_store(local_store))
    served_store = f"sqlite:///{folder / 'served.db'}"
    token = add_user(served_store, "bench")
    results: dict[str, dict[str, list[float]]] = {
        str(c): {n: [] for n in CONTENDERS} for c in levels
    }
    with serve(served_store, endpoint) as server:
        http = client(server.base_url, token, max(levels))
        contenders = {
            "in-process": in_process_turn(bot),
            "native API": native_turn(http),
            "OpenAI API": openai_turn(http),
        }
        for name, turn in contenders.items():  # warm-up: connections, model client, pages
            await run(turn, max(levels), max(levels), f"warm-{name[:2]}")
        order = list(CONTENDERS)
        for number in range(rounds):
            for level in levels:
                for name in order:
                    count = {1: turns // 4, 16: turns // 2}.get(level, turns)
                    prefix = f"r{number}-{name[:2]}-{level}"
                    results[str(level)][name] += await run(contenders[name], level, count, prefix)
            order = order[1:] + order[:1]
        await http.aclose()
    bot.close()
    rng = random.Random(0)
    table: dict[str, Any] = {}
    for level, by_name in results.items():
        base = by_name["in-process"]
        row: dict[str, Any] = {"turns": {n: len(v) for n, v in by_name.items()}}
        for name, values in by_name.items():
            row[name] = {
                "median_ms": statistics.median(values) * 1000,
                "p90_ms": percentile(values, 90) * 1000,
            }
            if name != "in-process":
                low, high = ratio_ci(values, base, rng)
                ratio = statistics.median(values) / statistics.median(base)
                row[name] |= {"ratio": ratio, "low": low, "high": high}
        table[level] = row
    return table


# -- part 2: open streams --------------------------------------------------------------------


@dataclass
class StreamLog:
    status: int = 0
    texts: list[float] = field(default_factory=list)
    text: str = ""
    done: float | None = None
    error: str | None = None


async def one_stream(http: httpx.AsyncClient, session_id: str, words: str) -> StreamLog:
    log = StreamLog()
    try:
        async with http.stream(
            "POST",
            f"/v1/sessions/{session_id}/messages",
            json={"text": words},
            headers={"Accept": "text/event-stream"},
        ) as response:
            log.status = response.status_code
            if response.status_code != 200:
                log.error = f"status {response.status_code}"
                return log
            event = ""
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = json.loads(line[5:])
                    if event == "text":
                        log.texts.append(time.monotonic())
                        log.text += data["text"]
                    elif event == "done":
                        log.done = time.monotonic()
                    elif event == "error":
                        log.error = data.get("type", "error")
    except Exception as exc:  # counted as an error of this stream
        log.error = type(exc).__name__
    if log.error is None and log.done is None:
        log.error = "no done event"
    if log.error is None and log.text != f"Echo: {words}":
        log.error = "wrong text"
    return log


def most_open(logs: list[StreamLog]) -> int:
    """The most streams open at once: from the first text event to ``done``."""
    marks = []
    for log in logs:
        if log.texts:
            marks.append((log.texts[0], 1))
            marks.append((log.done or log.texts[-1], -1))
    open_now = best = 0
    for _, step in sorted(marks):
        open_now += step
        best = max(best, open_now)
    return best


async def streams(count: int, interval: float, chunks: int, ramp: float) -> dict[str, Any]:
    words = " ".join(f"w{n}" for n in range(chunks - 1))  # "Echo:" is the first chunk
    with (
        _servers.openai_test_server(chunk_interval=interval) as endpoint,
        tempfile.TemporaryDirectory(prefix="bench-server-") as folder,
    ):
        store = f"sqlite:///{Path(folder) / 'streams.db'}"
        token = add_user(store, "bench")
        with serve(store, endpoint.base_url) as server:
            http = client(server.base_url, token, count + 10)
            cpu = server.cpu_seconds()
            started = time.monotonic()
            tasks = []
            for number in range(count):
                tasks.append(asyncio.create_task(one_stream(http, f"st-{number}", words)))
                await asyncio.sleep(ramp / count)
            logs = await asyncio.gather(*tasks)
            wall = time.monotonic() - started
            cpu = server.cpu_seconds() - cpu
            await http.aclose()
    gaps = [b - a for log in logs for a, b in zip(log.texts, log.texts[1:], strict=False)]
    errors: dict[str, int] = {}
    for log in logs:
        if log.error is not None:
            errors[log.error] = errors.get(log.error, 0) + 1
    return {
        "streams": count,
        "interval_s": interval,
        "chunks": chunks,
        "ramp_s": ramp,
        "wall_s": wall,
        "most_open": most_open(logs),
        "server_cpu_s": cpu,
        "server_cpu_ms_per_event": 1000 * cpu / max(1, sum(len(log.texts) for log in logs)),
        "errors": errors,
        "gap_p50_s": percentile(gaps, 50) if gaps else None,
        "gap_p99_s": percentile(gaps, 99) if gaps else None,
        "gap_max_s": max(gaps) if gaps else None,
        "gaps_s": sorted(gaps)[:: max(1, len(gaps) // 2000)],
    }


# -- part 4: server CPU per relayed chunk ---------------------------------------------------


RELAY_ROUTES = ("native SSE", "OpenAI stream")
LITELLM = "LiteLLM proxy"
TARGET_RELAY = 0.5  # chatchain's CPU per relayed chunk over LiteLLM's, at most


@contextmanager
def litellm_proxy(command: str, endpoint: str, folder: Path) -> Iterator[tuple[str, int, str]]:
    """A LiteLLM proxy (``command``: its ``litellm`` executable) serving `MODEL` from
    ``endpoint``; yields its base URL, its pid (one process: uvicorn with one worker) and its
    master key. No database, no telemetry, the bundled model price map (no download)."""
    key = f"sk-{secrets.token_hex(32)}"
    config = folder / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {endpoint}\n"
        f"      api_key: {API_KEY}\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "general_settings:\n"
        f"  master_key: {key}\n"
    )
    port = free_port()
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("LITELLM_", "DATABASE_", "OPENAI_"))
    }
    env |= {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False"}
    argv = [command, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(
        argv, env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"litellm exited: {process.stderr.read()[-2000:]}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{url}/health/liveliness", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the LiteLLM proxy did not start within 120 s")
            time.sleep(0.2)
        yield url, process.pid, key
    finally:
        process.terminate()  # our own child, by its handle
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


async def relay_one(http: httpx.AsyncClient, route: str, session_id: str, words: str) -> int:
    """One streamed turn of ``route``, read to its end; the chunks the endpoint streamed
    (one per word, and "Echo:"), once the relayed text is checked to be exactly the reply."""
    if route == "native SSE":
        url, body = f"/v1/sessions/{session_id}/messages", {"text": words}
        headers = {"Accept": "text/event-stream"}
    else:
        url, headers = "/v1/chat/completions", {"X-Session-Id": session_id}
        body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": words}]}
    text = ""
    async with http.stream("POST", url, json=body, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            data = json.loads(line[5:])
            if route == "native SSE":
                text += data.get("text", "") if isinstance(data, dict) else ""
            else:
                text += "".join(c["delta"].get("content") or "" for c in data["choices"])
    assert text == f"Echo: {words}", text[-80:]
    return len(words.split()) + 1


async def relay(
    chunks: int, rounds: int, streams: int, litellm: str | None = None
) -> dict[str, Any]:
    """Server CPU per relayed chunk on each streaming route (and a LiteLLM proxy's, given its
    ``litellm`` command): ``streams`` turns of ``chunks`` chunks at once per measure, the
    contenders interleaved over ``rounds`` rounds, the order rotated each round; the median."""
    words = " ".join(f"w{n}" for n in range(chunks - 1))
    names = [*RELAY_ROUTES, *([LITELLM] if litellm else [])]
    found: dict[str, list[float]] = {name: [] for name in names}
    with (
        _servers.openai_test_server() as endpoint,
        tempfile.TemporaryDirectory(prefix="bench-server-") as folder,
        contextlib.ExitStack() as stack,
    ):
        store = f"sqlite:///{Path(folder) / 'relay.db'}"
        token = add_user(store, "bench")
        long_turns = {"CHATCHAIN_WINDOW_TOKENS": str(10 * chunks)}  # the message fits
        server = stack.enter_context(serve(store, endpoint.base_url, env=long_turns))
        http = client(server.base_url, token, streams + 2)
        contenders = {route: (http, route, server.cpu_seconds) for route in RELAY_ROUTES}
        if litellm:
            url, pid, key = stack.enter_context(
                litellm_proxy(litellm, endpoint.base_url, Path(folder))
            )
            proxy = client(url, key, streams + 2)
            # The same client and request as chatchain's OpenAI route (the session header is
            # ignored there); the proxy's CPU from /proc, as chatchain's worker's.
            cpu = _servers.ServerProcess(url, pid).cpu_seconds
            contenders[LITELLM] = (proxy, "OpenAI stream", cpu)
        order = list(names)
        for number in range(rounds + 1):  # round 0 warms up
            for name in order:
                http_of, route, cpu_of = contenders[name]
                cpu = cpu_of()
                sent = await asyncio.gather(
                    *(
                        relay_one(http_of, route, f"{number}-{name[:2]}-{n}", words)
                        for n in range(streams)
                    )
                )
                if number:
                    found[name].append(1e6 * (cpu_of() - cpu) / sum(sent))
            order = order[1:] + order[:1]
        for http_of, _, _ in contenders.values():
            await http_of.aclose()
    medians = {name: statistics.median(v) for name, v in found.items()}
    data: dict[str, Any] = {
        "chunks": chunks,
        "streams": streams,
        "rounds": rounds,
        "runs_us": found,
        "us_per_chunk": medians,
    }
    if litellm:
        data["ratio_to_litellm"] = {
            route: medians[route] / medians[LITELLM] for route in RELAY_ROUTES
        }
        data["target_ratio"] = TARGET_RELAY
        data["met"] = all(r <= TARGET_RELAY for r in data["ratio_to_litellm"].values())
    return data


# -- part 3: workers ------------------------------------------------------------------------


async def workers(
    endpoint: str, folder: Path, counts: tuple[int, ...], rounds: int, turns: int
) -> dict[str, Any]:
    concurrency = 64
    found: dict[str, list[float]] = {}
    for count in counts:
        store = f"sqlite:///{folder / f'workers-{count}.db'}"
        token = add_user(store, "bench")
        with serve(store, endpoint, workers=count) as server:
            http = client(server.base_url, token, concurrency)
            await run(native_turn(http), concurrency, concurrency, f"warm-{count}")
            found[str(count)] = []
            for number in range(rounds):
                started = time.perf_counter()
                await run(native_turn(http), concurrency, turns, f"r{number}-{count}")
                found[str(count)].append(turns / (time.perf_counter() - started))
            await http.aclose()
    medians = {count: statistics.median(values) for count, values in found.items()}
    return {"concurrency": concurrency, "turns": turns, "runs": found, "turns_per_s": medians}


# -- the report -----------------------------------------------------------------------------


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    levels = list(data["overhead"])
    for name in CONTENDERS:
        left.plot(
            [int(c) for c in levels],
            [data["overhead"][c][name]["median_ms"] for c in levels],
            marker="o",
            label=name,
        )
    left.set(xscale="log", yscale="log", xlabel="concurrent sessions", ylabel="median ms per turn")
    left.set_xticks([int(c) for c in levels], labels=levels)
    left.set_title("1. Per-turn time: service vs in-process")
    left.legend()
    part2 = data["streams"]
    gaps = part2["gaps_s"]
    middle.hist(gaps, bins=50)
    middle.axvline(part2["gap_p99_s"], color="black", linestyle="--", label="p99")
    middle.set(xlabel="seconds between text events", ylabel="gaps")
    middle.set_title(f"2. {part2['most_open']:,} streams open on one worker")
    middle.legend()
    part3 = data["workers"]["turns_per_s"]
    right.bar([f"{n} worker{'s' if n != '1' else ''}" for n in part3], list(part3.values()))
    right.set(ylabel="turns per second")
    right.set_title("3. Throughput, 64 concurrent sessions")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def section(data: dict[str, Any]) -> str:
    over, part2, part3 = data["overhead"], data["streams"], data["workers"]
    at16 = over.get("16", {})
    worst16 = max((at16[n]["ratio"] for n in CONTENDERS[1:]), default=None) if at16 else None
    met1 = worst16 is not None and worst16 <= TARGET_RATIO
    met2 = part2["most_open"] >= TARGET_STREAMS and not part2["errors"]
    lines = [
        BEGIN,
        "## 7. The chat service (`chatchain serve`)",
        "",
        f"Written by `{data['command']}` ({data['date']}, {data['minutes']:.1f} min, "
        f"5-minute load average {data.get('load_average', float('nan')):.1f} on "
        f"{data['machine'].get('cores', '?')} cores: the machine was shared, so read the "
        "ratios, and the absolute times as a busy machine's); not run "
        "by `report.py` (which keeps this section). One `OpenAITestServer` process, SQLite "
        "stores, `chatchain serve` (uvicorn, the real CLI) with the per-user request and "
        "stream limits off, httpx clients on one event loop. See "
        "[`benchmarks/bench_server.py`](../benchmarks/bench_server.py).",
        "",
        "![Per-turn time, open streams and workers](img/bench-server.png)",
        "",
        "| target | measured | verdict |",
        "| --- | --- | --- |",
        f"| service at most {TARGET_RATIO}x `Chatbot.achat` in-process per turn at 16 sessions "
        f"(median) | {'n/a' if worst16 is None else f'{worst16:.2f}x (worst route)'} | "
        f"**{'met' if met1 else 'not met'}** |",
        f"| {TARGET_STREAMS:,} SSE streams open on one worker, no errors | "
        f"{part2['most_open']:,} open, {sum(part2['errors'].values())} errors | "
        f"**{'met' if met2 else 'not met'}** |",
        "",
        "**1. Per-turn time**, median (p90) ms, and the service's median over the in-process "
        "median with its 95% interval:",
        "",
        "| sessions | in-process | native API | ratio | OpenAI API | ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for level, row in over.items():
        cells = [level]
        for name in CONTENDERS:
            cells.append(f"{row[name]['median_ms']:.1f} ({row[name]['p90_ms']:.1f})")
            if name != "in-process":
                r = row[name]
                cells.append(f"{r['ratio']:.2f}x [{r['low']:.2f}, {r['high']:.2f}]")
        lines.append("| " + " | ".join(cells) + " |")
    errors = ", ".join(f"{k}: {v}" for k, v in part2["errors"].items()) or "none"
    lines += [
        "",
        f"**2. Open streams.** {part2['streams']:,} native SSE turns started within "
        f"{part2['ramp_s']:g} s, each of {part2['chunks']} text events the test server sent "
        f"{part2['interval_s']:g} s apart, on one worker: **{part2['most_open']:,} open at "
        f"once**, errors: {errors}. Gap between a stream's text events: median "
        f"{part2['gap_p50_s']:.3f} s, **p99 {part2['gap_p99_s']:.3f} s**, max "
        f"{part2['gap_max_s']:.3f} s (the endpoint's own: {part2['interval_s']:g} s); all "
        f"done in {part2['wall_s']:.1f} s. The worker used {part2['server_cpu_s']:.1f} s of "
        f"CPU, {part2['server_cpu_ms_per_event']:.1f} ms per text event with the turns' "
        "starts and ends (LangChain's streaming path is most of it: `Chatbot.astream` "
        "in-process costs about 1 ms per chunk): how many streams a worker holds depends on "
        "how fast they stream.",
        "",
        f"**3. Workers.** {part3['concurrency']} concurrent sessions of native JSON turns, "
        f"{part3['turns']} turns a run, median of {len(part3['runs']['1'])} runs:",
        "",
        "| workers | turns/s |",
        "| ---: | ---: |",
    ]
    for count, value in part3["turns_per_s"].items():
        lines.append(f"| {count} | {value:.0f} |")
    one, two = part3["turns_per_s"].get("1"), part3["turns_per_s"].get("2")
    if one and two:
        lines += [
            "",
            f"2 workers / 1 worker: {two / one:.2f}x. This machine has "
            f"{data['machine'].get('cores', '?')} cores, shared with the client and the test "
            "server (and, while this ran, other work): a second worker helps as far as a core "
            "is free; every worker shares the one SQLite file and its write lock.",
        ]
    lines.append(END)
    return "\n".join(lines) + "\n"


def insert_section(page: str, text: str) -> str:
    """``page`` with ``text`` in place of its "chat service" section, or before "## Running it".

    `report.py` (which rewrites the page without running this script) keeps the section so.
    """
    if BEGIN in page and END in page:
        head, rest = page.split(BEGIN, 1)
        return head + text + "\n" + rest.split(END, 1)[1].lstrip("\n")
    marker = "## Running it"
    if marker in page:
        head, tail = page.split(marker, 1)
        return head + text + "\n" + marker + tail
    return page.rstrip("\n") + "\n\n" + text


def section_of(page: str) -> str | None:
    """The page's "chat service" section, if it has one."""
    if BEGIN not in page or END not in page:
        return None
    return BEGIN + page.split(BEGIN, 1)[1].split(END, 1)[0] + END + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer turns and streams (~1.5 min)")
    parser.add_argument("--streams", type=int, default=None, help="streams of part 2 (1000)")
    parser.add_argument("--chunk-interval", type=float, default=5.0, help="seconds (5.0)")
    parser.add_argument("--ramp", type=float, default=None, help="seconds to start them (30)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run (1,2,3; 4)")
    parser.add_argument("--relay-chunks", type=int, default=2000, help="part 4 (2000)")
    parser.add_argument("--relay-rounds", type=int, default=5, help="part 4 (5)")
    parser.add_argument("--relay-streams", type=int, default=4, help="part 4, at once (4)")
    parser.add_argument(
        "--litellm",
        default=os.environ.get("BENCH_LITELLM") or None,
        help="part 4: the `litellm` command of a virtual environment with litellm[proxy] "
        "installed, to relay the same stream through a LiteLLM proxy too (default: "
        "$BENCH_LITELLM; without it, chatchain's routes only)",
    )
    parser.add_argument(
        "--render-only", type=Path, default=None, help="write the docs from this --json file"
    )
    return parser.parse_args(argv)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    parts = {int(p) for p in args.parts.split(",")}
    rounds, turns = (2, 64) if args.quick else (3, 128)
    count = args.streams or (200 if args.quick else 1000)
    ramp = args.ramp if args.ramp is not None else (10.0 if args.quick else 30.0)
    chunks = 6 if args.quick else 12  # each stream outlasts the ramp: all are open at once
    data: dict[str, Any] = {}
    with (
        _servers.openai_test_server() as endpoint,
        tempfile.TemporaryDirectory(prefix="bench-server-") as name,
    ):
        folder = Path(name)
        if 1 in parts:
            print("1. overhead per turn ...", flush=True)
            data["overhead"] = await overhead(endpoint.base_url, folder, (1, 16, 64), rounds, turns)
            print(json.dumps(data["overhead"], indent=1), flush=True)
        if 3 in parts:
            print("3. workers ...", flush=True)
            data["workers"] = await workers(
                endpoint.base_url, folder, (1, 2), 2 if args.quick else 3, 2 * turns
            )
            print(json.dumps(data["workers"], indent=1), flush=True)
    if 4 in parts:
        print("4. server CPU per relayed chunk ...", flush=True)
        litellm = args.litellm and (shutil.which(args.litellm) or args.litellm)
        data["relay"] = await relay(
            args.relay_chunks, args.relay_rounds, args.relay_streams, litellm
        )
        print(json.dumps(data["relay"], indent=1), flush=True)
    if 2 in parts:
        print(f"2. {count} streams ...", flush=True)
        data["streams"] = await streams(count, args.chunk_interval, chunks, ramp)
        shown = {k: v for k, v in data["streams"].items() if k != "gaps_s"}
        print(json.dumps(shown, indent=1), flush=True)
    return data


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only is not None:
        data = json.loads(args.render_only.read_text())
        plot(data, PLOT)
        DOCS.write_text(insert_section(DOCS.read_text(), section(data)))
        return 0
    clean_environment()
    started = time.monotonic()
    data = asyncio.run(measure(args))
    data |= {
        "load_average": os.getloadavg()[1],  # the last 5 minutes: about the run
        "machine": machine(),
        "versions": versions(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "minutes": (time.monotonic() - started) / 60,
        "command": " ".join(
            [".venv/bin/python", "benchmarks/bench_server.py", *(argv or sys.argv[1:])]
        ),
    }
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    if not args.no_docs and {"overhead", "streams", "workers"} <= set(data):
        plot(data, PLOT)
        DOCS.write_text(insert_section(DOCS.read_text(), section(data)))
        print(f"wrote {DOCS.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
