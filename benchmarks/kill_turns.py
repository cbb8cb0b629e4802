"""kill -9 of a ``chatchain serve`` worker mid-stream: what the killed turns leave behind.

Usage::

    .venv/bin/python benchmarks/kill_turns.py [--store sqlite|redis|postgres] [--streams 2]
        [--checkout DIR]

Runs ``chatchain serve --workers 2`` (the package of ``--checkout``, this checkout by default:
pass the checkout of an older version to measure it) over a store of its own, against a
`chatchain.testing.OpenAITestServer` in this process that streams a word every 50 ms, all
on 127.0.0.1. It opens ``--streams`` streamed turns (native SSE route, one session each),
waits 1.5 s, then kills with SIGKILL the worker that serves the most of them (found by its
connections to the endpoint). Then, for each killed turn, it sends the session's next turn
(JSON route) until one succeeds, and prints:

- the killed turns' user messages kept in the store (and replies marked interrupted);
- ledger entries vs the calls the endpoint served (every call, killed or not);
- seconds from the kill until each killed session's next turn succeeded;
- the tokens still held in budget holds of the killed sessions once that turn is done.

Bounded: about 30 s with the current code (more with a 30 s lock lease); gives up on a
session after 120 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import _servers
import httpx

from chatchain.budgets import BudgetHold, BudgetLimit
from chatchain.stores import HistoryStore, open_store
from chatchain.testing import OpenAITestServer
from chatchain.users import Users

ROOT = Path(__file__).resolve().parent.parent
USER = "killed"
STORY = " ".join(f"word{i}" for i in range(2000))  # 100 s at 50 ms a word: outlives the kill
GIVE_UP_S = 120.0


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def store_url(kind: str, folder: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'chat.db'}"
    elif kind == "redis":
        with _servers.redis_url() as url:
            yield url
    else:
        with _servers.postgres_url() as url:
            yield url


@contextmanager
def serve(checkout: Path, store: str, endpoint: str, log: IO[bytes]) -> Iterator[tuple[str, int]]:
    """``chatchain serve --workers 2`` of ``checkout``; yields its URL and process id (its
    output goes to ``log``)."""
    port = free_port()
    python = checkout / ".venv" / "bin" / "python"
    env = {
        **os.environ,
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": endpoint,
        "CHATCHAIN_SUMMARIZE": "false",
        "CHATCHAIN_MAX_RETRIES": "0",
        "CHATCHAIN_BUDGET_SESSION_TOKENS": "1000000",  # so that turns hold budget
        "CHATCHAIN_SERVER_REQUESTS_PER_MINUTE": "0",
        "CHATCHAIN_SERVER_STREAMS_PER_USER": "0",
    }
    env.pop("PYTHONPATH", None)
    argv = [str(python), "-m", "chatchain", "serve", "--port", str(port), "--store", store]
    process = subprocess.Popen(
        [*argv, "--workers", "2"],
        cwd=checkout,  # its own package, not this one
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while len(children(process.pid)) < 2 or not healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"chatchain serve did not start within 60 s:\n{tail}")
            time.sleep(0.2)
        yield url, process.pid
    finally:
        process.terminate()  # our own child, by its handle
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def children(pid: int) -> list[int]:
    """The process ids whose parent is ``pid`` (the workers, and helpers such as uvicorn's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found


def connections_to(pid: int, port: int) -> int:
    """How many established TCP connections process ``pid`` has to 127.0.0.1:``port``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port == port and fields[3] == "01" and fields[9] in inodes:
            count += 1
    return count


async def stream(http: httpx.AsyncClient, session_id: str) -> str:
    """A streamed turn; returns how it ended ("done", or the error that cut it)."""
    try:
        async with http.stream(
            "POST",
            f"/v1/sessions/{session_id}/messages",
            json={"text": f"Tell me a long story ({session_id})"},
            headers={"Accept": "text/event-stream"},
        ) as answer:
            async for _ in answer.aiter_lines():
                pass
        return "done"
    except httpx.HTTPError as exc:
        return type(exc).__name__


def sent(endpoint: OpenAITestServer, calls: int) -> None:
    """Wait until the endpoint has received ``calls`` requests (at most 30 s)."""
    deadline = time.monotonic() + 30
    while len(endpoint.requests) < calls and time.monotonic() < deadline:
        time.sleep(0.1)


async def next_turn(http: httpx.AsyncClient, session_id: str, killed_at: float) -> float | None:
    """Seconds from the kill until a turn on the session succeeds (``None``: gave up)."""
    while time.monotonic() - killed_at < GIVE_UP_S:
        try:
            answer = await http.post(
                f"/v1/sessions/{session_id}/messages", json={"text": "Are you there?"}
            )
            if answer.status_code == 200:
                return time.monotonic() - killed_at
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.2)
    return None


async def measure(
    url: str, token: str, serve_pid: int, endpoint: OpenAITestServer, streams: int
) -> dict[str, Any]:
    """Kill the worker serving the streams; which sessions it cut, and their next turns."""
    sessions = [f"story-{i}" for i in range(streams)]
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=auth, timeout=150.0) as http:
        tasks = {sid: asyncio.create_task(stream(http, sid)) for sid in sessions}
        await asyncio.to_thread(sent, endpoint, streams)
        await asyncio.sleep(1.5)  # ...and has streamed for a while
        port = int(endpoint.base_url.rsplit(":", 1)[1].split("/")[0])
        victim = max(children(serve_pid), key=lambda pid: connections_to(pid, port))
        os.kill(victim, 9)  # SIGKILL: the worker we started (a child of our serve process)
        killed_at = time.monotonic()
        await asyncio.sleep(0.5)
        killed = [sid for sid, task in tasks.items() if task.done()]
        for task in tasks.values():
            task.cancel()
        waits = [await next_turn(http, sid, killed_at) for sid in killed]
    return {"killed": killed, "waits": waits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=["sqlite", "redis", "postgres"], default="sqlite")
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--checkout", type=Path, default=ROOT)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="kill-turns-") as folder,
        store_url(args.store, Path(folder)) as url,
        OpenAITestServer(chunk_interval=0.05) as endpoint,
        tempfile.TemporaryFile() as log,
    ):
        endpoint.queue_replies(*[STORY] * args.streams)
        with closing(open_store(url)) as store:
            token = Users(store).add(USER)
        with serve(args.checkout.resolve(), url, endpoint.base_url, log) as (service, pid):
            result = asyncio.run(measure(service, token, pid, endpoint, args.streams))
            calls = len(endpoint.requests)
        report(url, args, result, calls)


def report(url: str, args: argparse.Namespace, result: dict[str, Any], calls: int) -> None:
    killed = result["killed"]
    with closing(open_store(url)) as store:
        entries = [e for e in store.usage_entries() if not e.summary]
        kept = replies = 0
        held = 0
        for sid in killed:
            key = f"{USER}:{sid}"
            messages = store.load(key)
            kept += any(m.type == "human" and "long story" in str(m.content) for m in messages)
            replies += any(m.response_metadata.get("interrupted") for m in messages)
            held += held_tokens(store, key)
    print(f"store: {args.store}; code: {args.checkout.resolve()}")
    print(f"turns killed mid-stream: {len(killed)} of {args.streams}")
    print(
        f"their user messages kept: {kept} of {len(killed)} (replies marked interrupted: {replies})"
    )
    print(f"ledger entries: {len(entries)}; calls the endpoint served: {calls}")
    for sid, wait in zip(killed, result["waits"], strict=True):
        shown = "gave up" if wait is None else f"{wait:.1f} s"
        print(f"  {sid}: next turn succeeded {shown} after the kill")
    print(f"tokens still held by the killed sessions after their next turn: {held}")


def held_tokens(store: HistoryStore, session_id: str) -> int:
    """The tokens budget holds keep on the session (a probe hold at the cap tells)."""
    spent = store.usage_total("session", session_id).total_tokens
    probe = BudgetHold(session_id, 1, 0.0, datetime.now(UTC) + timedelta(minutes=1))
    refusal = store.hold_budget(probe, [BudgetLimit("session", session_id, max_tokens=spent + 1)])
    if refusal is None:
        store.release_budget(probe.id)
        return 0
    return int(refusal.held_tokens)


if __name__ == "__main__":
    main()
