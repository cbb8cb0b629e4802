"""Real Redis and PostgreSQL servers for tests and benchmarks, on free ports of 127.0.0.1.

Each runs the Debian (or any installed) server binaries in a temporary directory and never
touches a system service on 6379 or 5432:

- `redis_server`: ``redis-server`` through pytest-redis's `RedisExecutor` (a mirakuru
  executor that waits for the port; ``pip install pytest-redis``);
- `PostgresCluster`: ``initdb`` and ``pg_ctl`` of the newest installed PostgreSQL, trust
  authentication on 127.0.0.1 only, ``fsync`` and ``full_page_writes`` off (tests crash the
  server, never the machine); when run as root, as the ``postgres`` user through ``runuser``.
  It needs the ``postgres`` extra (psycopg).

chatchain's own store tests and benchmarks run their servers with these, and so can yours.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_redis.executor import RedisExecutor

__all__ = ["PostgresCluster", "free_port", "redis_server", "redis_url_of"]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free at the time of the call."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def redis_server(
    datadir: str | Path | None = None, *, appendonly: bool = False
) -> Iterator[RedisExecutor]:
    """A redis-server of its own on a free port of 127.0.0.1, stopped on the way out.

    The executor yielded can ``stop()``, ``start()`` and ``kill()`` the server (an outage, a
    crash); `redis_url_of` gives its URL. Files go to ``datadir`` (a temporary directory,
    removed afterwards, when ``None``). With ``appendonly``, every acknowledged write survives
    a kill -9, as in production.

    Raises:
        RuntimeError: pytest-redis or redis-server is not installed (the message says how to).

    Example:
        >>> with redis_server() as server:  # doctest: +SKIP
        ...     store = open_store(redis_url_of(server))
    """
    try:
        from pytest_redis.executor import RedisExecutor
    except ImportError:
        raise RuntimeError("redis_server needs pytest-redis: pip install pytest-redis") from None
    executable = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(executable).exists():
        raise RuntimeError("redis-server is not installed: apt-get install redis-server")
    with ExitStack() as stack:
        if datadir is None:
            datadir = stack.enter_context(tempfile.TemporaryDirectory(prefix="chatchain-redis-"))
        server = RedisExecutor(
            executable=executable,
            databases=2,
            redis_timeout=0,
            loglevel="warning",
            host="127.0.0.1",
            port=free_port(),
            datadir=Path(datadir),
            appendonly="yes" if appendonly else "no",
            startup_timeout=30,
        )
        with server:
            yield server


def redis_url_of(server: RedisExecutor) -> str:
    """The ``redis://`` URL of a `redis_server`, database 0."""
    return f"redis://{server.host}:{server.port}/0"


ROLE = "chatchain"
DATABASE = "chatchain_test"


def _bin_dir() -> Path:
    """The newest installed server's binaries (Debian keeps each major version apart)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(re.sub(r"\D", "", p.parent.parent.name) or 0),
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")


class PostgresCluster:
    """A temporary PostgreSQL cluster on a free port of 127.0.0.1, for tests only.

    ``PostgresCluster()`` runs ``initdb``; `start` serves `url` (role ``chatchain``, database
    ``chatchain_test``); `stop` and `start` again play an outage or a crash; `destroy`
    removes it all. `running` does it all in a ``with`` block.

    Example:
        >>> with PostgresCluster.running() as url:  # doctest: +SKIP
        ...     store = open_store(url)
        >>> cluster = PostgresCluster()  # doctest: +SKIP
        >>> cluster.start()  # doctest: +SKIP
        >>> cluster.stop("immediate"); cluster.start()  # a crash and a restart  # doctest: +SKIP
        >>> cluster.destroy()  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.bin = _bin_dir()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="chatchain-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        # As root, the server runs as `postgres`, which must own its directory (and socket).
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                raise RuntimeError(
                    "PostgreSQL refuses to run as root, and there is no `postgres` user to run "
                    "it as: apt-get install postgresql creates one."
                ) from None
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        try:
            self._run("initdb", "-D", str(self.data), "-U", ROLE, "-A", "trust", "-E", "UTF8",
                      "--locale=C", "--no-sync")  # fmt: skip
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    @property
    def url(self) -> str:
        """The ``postgresql://`` URL of the test database."""
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, program: str, *args: str) -> None:
        argv = [*self._as, str(self.bin / program), *args]
        done = subprocess.run(argv, cwd=self.root, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{program} failed: {done.stderr or done.stdout}\n{log}")

    def start(self) -> None:
        """Start the server (again) and make sure the test database exists."""
        import psycopg

        # Skip fsyncs to keep the run fast: the tests crash the server, never the machine.
        # (Commits stay synchronous, so a crashed server keeps what it acknowledged.)
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                  "-t", "30", "start")  # fmt: skip
        with psycopg.connect(
            f"postgresql://{ROLE}@127.0.0.1:{self.port}/postgres", autocommit=True
        ) as conn:
            if not conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
            ).fetchone():
                conn.execute(f"CREATE DATABASE {DATABASE}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` ends sessions cleanly, ``immediate`` is like a crash."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def destroy(self) -> None:
        """Stop the server if it runs, and remove its files."""
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    @classmethod
    @contextmanager
    def running(cls) -> Iterator[str]:
        """A new cluster, started; yields its URL and removes everything afterwards."""
        cluster = cls()
        try:
            cluster.start()
            yield cluster.url
        finally:
            cluster.destroy()
