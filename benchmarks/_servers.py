"""Throwaway servers for the benchmarks, on free ports of 127.0.0.1.

Redis and PostgreSQL come from `chatchain.testing`, whose launchers the store tests use too, so
benchmarks and tests run the servers the same way:

- `redis_url`: `chatchain.testing.redis_server` (pytest-redis's executor running
  /usr/bin/redis-server), with snapshots to disk off;
- `postgres_url`: `chatchain.testing.PostgresCluster` (``initdb`` in a temporary directory,
  trust authentication on 127.0.0.1 only, run as the ``postgres`` user when we are root, with
  ``fsync`` and ``full_page_writes`` off).

`openai_test_server` runs `chatchain.testing.OpenAITestServer` in a process of its own.

Each is a context manager that stops its server and removes its files on the way out, even
after an error. None touches a system service on 5432 or 6379.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

_SERVE_FLAG = "--openai-test-server"

__all__ = [
    "ServerProcess",
    "openai_test_server",
    "postgres_url",
    "postgres_version",
    "redis_url",
    "redis_version",
]


@contextmanager
def redis_url() -> Iterator[str]:
    """A redis-server of our own; yields its ``redis://`` URL."""
    import redis

    from chatchain.testing import redis_server, redis_url_of

    with redis_server() as server:
        url = redis_url_of(server)
        # Redis's default snapshot rules would fork a background save in the middle of the
        # measurements (the 100,000-message pre-fill crosses "10000 changes in 60 s").
        with redis.Redis.from_url(url) as client:
            client.config_set("save", "")
        yield url


@contextmanager
def postgres_url() -> Iterator[str]:
    """A PostgreSQL cluster of our own; yields its ``postgresql://`` URL."""
    from chatchain.testing import PostgresCluster

    with PostgresCluster.running() as url:
        yield url


def redis_version(url: str) -> str:
    import redis

    with redis.Redis.from_url(url) as client:
        return str(client.info("server")["redis_version"])


def postgres_version(url: str) -> str:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]).split()[0] if row else "unknown"


class ServerProcess(NamedTuple):
    """A server running in a child process."""

    base_url: str
    pid: int

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the process has used so far, from ``/proc``."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def openai_test_server(
    timeout: float = 30.0, chunk_interval: float = 0.0
) -> Iterator[ServerProcess]:
    """chatchain's `OpenAITestServer` in a process of its own.

    A benchmark whose client should not share the GIL with the server uses this instead of an
    in-process server. The child is this file run as a script (`_serve_openai_test_server`):
    like ``python -m chatchain.testing`` it prints ``base_url=...`` once it serves, and in
    addition it empties its request log every second (a long benchmark makes tens of thousands
    of requests) and stops when its stdin closes, so it cannot outlive this process even if
    this one is killed. On the way out the pipe is closed and the child waited for; it is
    terminated, then killed, if it does not stop in time. ``chunk_interval`` spaces its
    streamed chunks (`OpenAITestServer`'s, a model writing).
    """
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), _SERVE_FLAG, str(chunk_interval)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        line = process.stdout.readline() if ready else ""
        if not line.startswith("base_url="):
            raise RuntimeError(
                f"the OpenAI test server process did not start within {timeout:g} s "
                f"(exit code {process.poll()}, first line {line!r})"
            )
        yield ServerProcess(line.strip().split("=", 1)[1], process.pid)
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.terminate()  # our own child, by its handle
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _serve_openai_test_server(chunk_interval: float) -> None:
    """The child of `openai_test_server`: serve until stdin closes or SIGTERM."""
    import signal
    import threading

    from chatchain.testing import OpenAITestServer

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())

    def watch_stdin() -> None:
        sys.stdin.read()  # returns at end of file: the parent closed the pipe, or died
        stop.set()

    with OpenAITestServer(host="127.0.0.1", chunk_interval=chunk_interval) as server:
        threading.Thread(target=watch_stdin, daemon=True).start()
        print(f"base_url={server.base_url}", flush=True)
        while not stop.wait(1.0):
            server.clear()


if __name__ == "__main__" and sys.argv[1:2] == [_SERVE_FLAG]:
    _serve_openai_test_server(float(sys.argv[2]) if sys.argv[2:] else 0.0)
