"""PostgreSQL for the store tests: a throwaway cluster on a free port, started once per run.

The cluster lives in a temporary directory with trust authentication on 127.0.0.1 only, and
is stopped and removed at the end of the run. It never touches the system cluster that the
Debian package may have started on port 5432.

PostgreSQL refuses to run as root. When the tests run as root (as CI does), its binaries run as
the Debian ``postgres`` user through ``runuser``, in a directory that user owns; otherwise they
run directly as the current user.
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
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from chatchain.stores._postgres import PostgresStore

__all__ = ["postgres_store", "postgres_url"]

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
    pytest.fail("PostgreSQL is not installed: run `bash .ci/services` (Debian package postgresql).")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresCluster:
    """A temporary PostgreSQL cluster on a free port of 127.0.0.1, for tests only.

    Example:
        >>> cluster = PostgresCluster()  # doctest: +SKIP
        >>> cluster.start()  # doctest: +SKIP
        >>> store = open_store(cluster.url)  # doctest: +SKIP
        >>> cluster.stop("immediate"); cluster.start()  # a crash and a restart  # doctest: +SKIP
        >>> cluster.destroy()  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.bin = _bin_dir()
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="chatchain-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        # As root, the server runs as `postgres`, which must own its directory (and socket).
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("Tests run as root need the `postgres` user of Debian's postgresql.")
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
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, program: str, *args: str) -> None:
        argv = [*self._as, str(self.bin / program), *args]
        done = subprocess.run(argv, cwd=self.root, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{program} failed: {done.stderr or done.stdout}\n{log}")

    def start(self) -> None:
        """Start the server (again) and make sure the test database exists."""
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


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL of a PostgreSQL server this test run started, on a free port of 127.0.0.1."""
    with PostgresCluster.running() as url:
        yield url


def wipe(url: str, prefix: str = "chatchain") -> None:
    """Drop every table a store of ``prefix`` creates (it recreates them when opened)."""
    tables = ["messages", "sessions", "migrations", "usage", "usage_totals", "budget_holds"]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS " + ", ".join(f"{prefix}_{t}" for t in tables))


@pytest.fixture
def postgres_store(postgres_url: str) -> Iterator[PostgresStore]:
    """A fresh, empty store (the default tables, as `open_store` opens them), dropped after."""
    wipe(postgres_url)  # also what earlier tests left through open_store(postgres_url)
    store = PostgresStore(postgres_url, lock_timeout=1.0)
    try:
        yield store
    finally:
        store.close()
        wipe(postgres_url)
