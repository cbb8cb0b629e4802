"""Instances behind nginx: turns per second, turn time and the store's work per turn.

Usage::

    .venv/bin/python benchmarks/bench_instances.py [--quick] [--json PATH] [--no-docs]

What runs (everything on 127.0.0.1, started and stopped here)
    One `chatchain.testing.OpenAITestServer` in a process of its own, answering at once; one
    PostgreSQL cluster (with ``pg_stat_statements`` loaded) and one redis-server; for each
    store and each count of instances (1, 2 and 4), that many ``chatchain serve`` processes
    (one uvicorn worker each, the per-user throttle off) over the store, behind Debian's nginx
    running the README's configuration (``tests/server/nginx.py`` extracts it, as the
    deployment test does). Clients: 64 concurrent sessions of native JSON turns
    (``POST /v1/sessions/{id}/messages``, sessions of three turns), ``httpx.AsyncClient`` on
    one event loop in this process, through nginx.

Kept per store and count: turns per second over ``--turns`` turns (after a warm-up of 64),
the median of ``--rounds`` rounds; p50 and p99 of every measured turn's time; the CPU seconds
each process used during the measured rounds (``/proc/PID/stat``: the instances, nginx's
master and worker, the test server, the store's server with its backends, this client), as
a share of one core; and the store's own work, counted: PostgreSQL's statements
(``pg_stat_statements`` calls, BEGIN and COMMIT included: each is a round trip) and
transactions (``pg_stat_database``), Redis's commands (``INFO commandstats`` calls, by
command) per turn.

The section goes to ``docs/benchmarks.md`` between its own markers (replaced in place, nothing
else touched) and the plot to ``docs/img/bench-instances.png``, unless ``--no-docs``; `report.py`
keeps the section when it rewrites the page. Runtime: about 4 minutes (``--quick``: under one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import _servers
from bench_server import add_user, client, native_turn, run, serve
from bench_turn import clean_environment, machine, percentile, versions

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # the README's nginx configuration, as the test runs it
    sys.path.insert(0, str(ROOT))
from tests.server.nginx import Nginx, for_test, free_ports, readme_config  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "img" / "bench-instances.png"
BEGIN, END = "<!-- bench_instances: begin -->", "<!-- bench_instances: end -->"
CONCURRENCY = 64
STORES = ("postgres", "redis")
CLK_TCK = os.sysconf("SC_CLK_TCK")
CLIENT = "client (this process)"
MACHINE = "machine"  # every process of the machine, these and others


# -- CPU of each process, from /proc -----------------------------------------------------------


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int, reaped: bool = False) -> float:
    """User + system CPU of ``pid``; with ``reaped``, that of its children it waited for too
    (PostgreSQL's postmaster reaps the backends of closed connections)."""
    try:
        fields = _stat(pid)
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def children(pid: int) -> list[int]:
    """The ids of the processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def tree_cpu(pid: int) -> float:
    """CPU of ``pid``, of its live children and of the children it reaped."""
    return cpu_seconds(pid, reaped=True) + sum(cpu_seconds(child) for child in children(pid))


def machine_cpu() -> float:
    """CPU seconds the whole machine has been busy (every core, ``/proc/stat``): with the
    processes measured, it shows how much other work shared the cores."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the stores and their counters -------------------------------------------------------------


@contextmanager
def postgres_with_statements() -> Iterator[str]:
    """A PostgreSQL cluster of our own with ``pg_stat_statements`` loaded; yields its URL."""
    import psycopg

    from chatchain.testing import PostgresCluster

    cluster = PostgresCluster()
    try:
        conf = cluster.data / "postgresql.conf"
        conf.write_text(conf.read_text() + "\nshared_preload_libraries = 'pg_stat_statements'\n")
        cluster.start()
        with psycopg.connect(cluster.url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        yield cluster.url
    finally:
        cluster.destroy()


def server_pid(store_url: str) -> int:
    """The process id of the store's server (PostgreSQL's postmaster, or redis-server)."""
    if store_url.startswith("redis"):
        import redis

        with redis.Redis.from_url(store_url) as r:
            return int(r.info("server")["process_id"])
    import psycopg

    with psycopg.connect(store_url) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    assert row is not None
    return int((Path(row[0]) / "postmaster.pid").read_text().split()[0])


def store_counters(store_url: str) -> dict[str, float]:
    """The store's counters now: statements and transactions, or commands by name."""
    if store_url.startswith("redis"):
        import redis

        with redis.Redis.from_url(store_url) as r:
            stats = r.info("commandstats")
        # The counting connection's own INFO calls are left out.
        return {
            name.removeprefix("cmdstat_"): float(value["calls"])
            for name, value in stats.items()
            if name != "cmdstat_info"
        }
    import psycopg

    # pg_stat_statements counts each statement when it ends (pg_stat_database's transaction
    # counts reach the server's totals up to seconds late, so they are not used).
    with psycopg.connect(store_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT s.query, s.calls, s.rows FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = current_database() "
            "AND s.query NOT LIKE '%pg_stat_%'"
        ).fetchall()
    found = {"statements": 0.0, "transactions": 0.0, "rows": 0.0}
    for query, calls, count in rows:
        found["statements"] += calls
        found["rows"] += count
        words = query.split(None, 1)
        first = words[0].upper() if words else ""
        if first in ("COMMIT", "ROLLBACK"):
            found["transactions"] += calls
        found[f"statement: {first}"] = found.get(f"statement: {first}", 0.0) + calls
    return found


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


def wipe(store_url: str) -> None:
    """Empty the store (each count of instances starts from nothing)."""
    if store_url.startswith("redis"):
        import redis

        with redis.Redis.from_url(store_url) as r:
            r.flushdb()
        return
    import psycopg

    with psycopg.connect(store_url, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE 'chatchain%'"
        ).fetchall()
        for (table,) in tables:
            conn.execute(f'DROP TABLE IF EXISTS "{table}" CASCADE')


# -- one measurement ---------------------------------------------------------------------------


async def measure_one(
    store_url: str, endpoint: _servers.ServerProcess, count: int, rounds: int, turns: int
) -> dict[str, Any]:
    """``count`` instances behind nginx over ``store_url``: throughput, latency, CPU, store."""
    wipe(store_url)
    token = add_user(store_url, "bench")
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-nginx-") as name:
        instances = [stack.enter_context(serve(store_url, endpoint.base_url)) for _ in range(count)]
        ports = [int(i.base_url.rsplit(":", 1)[1]) for i in instances]
        [listen] = free_ports(1)
        proxy = Nginx(for_test(readme_config(), ports, listen), Path(name), listen)
        proxy.start()
        stack.callback(proxy.stop)
        assert proxy.process is not None
        http = client(proxy.url, token, CONCURRENCY)
        try:
            await run(native_turn(http), CONCURRENCY, CONCURRENCY, f"warm-{count}")
            pids = {
                "instances": [i.pid for i in instances],
                "nginx": [proxy.process.pid],
                "test server": [endpoint.pid],
                "store server": [server_pid(store_url)],
            }
            cpu_before = _cpu(pids)
            store_before = store_counters(store_url)
            started = time.perf_counter()
            rates, latencies = [], []
            for number in range(rounds):
                begun = time.perf_counter()
                found = await run(native_turn(http), CONCURRENCY, turns, f"r{number}-{count}")
                rates.append(turns / (time.perf_counter() - begun))
                latencies += found
            wall = time.perf_counter() - started
            store_after = store_counters(store_url)
            cpu_after = _cpu(pids)
        finally:
            await http.aclose()
    measured = rounds * turns
    cpu = {k: cpu_after[k] - cpu_before[k] for k in cpu_after}
    work = delta(store_before, store_after)
    latencies.sort()
    return {
        "instances": count,
        "turns": measured,
        "turns_per_s": statistics.median(rates),
        "rounds_turns_per_s": rates,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "wall_s": wall,
        "cpu_s": cpu,
        "cores_used": {k: v / wall for k, v in cpu.items()},
        "store_per_turn": {k: v / measured for k, v in work.items() if v},
    }


def _cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    found = {CLIENT: client_cpu(), MACHINE: machine_cpu()}
    for group, ids in pids.items():
        if group == "store server":
            found[group] = sum(tree_cpu(pid) for pid in ids)
        elif group == "nginx":  # its master and worker
            found[group] = sum(cpu_seconds(pid) for pid in ids)
            found[group] += sum(cpu_seconds(c) for pid in ids for c in children(pid))
        else:
            found[group] = sum(cpu_seconds(pid) for pid in ids)
    return found


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    counts = [int(c) for c in args.instances.split(",")]
    stores = [s for s in args.stores.split(",") if s]
    data: dict[str, Any] = {"concurrency": CONCURRENCY, "results": {}}
    with _servers.openai_test_server() as endpoint:
        for store in stores:
            launcher = postgres_with_statements if store == "postgres" else _servers.redis_url
            with launcher() as url:
                data["results"][store] = {}
                for count in counts:
                    print(f"{store}, {count} instance(s) ...", flush=True)
                    found = await measure_one(url, endpoint, count, args.rounds, args.turns)
                    data["results"][store][str(count)] = found
                    print(row_text(store, found), flush=True)
    return data


# -- the report --------------------------------------------------------------------------------


def busiest(found: dict[str, Any]) -> tuple[str, float]:
    """The process group that used the most CPU, and how many cores it used."""
    used = {k: v for k, v in found["cores_used"].items() if k != MACHINE}
    group = max(used, key=used.__getitem__)
    return group, used[group]


def store_cost(store: str, found: dict[str, Any]) -> str:
    per = found["store_per_turn"]
    if store == "postgres":
        kinds = sorted(
            ((k.split(": ", 1)[1], v) for k, v in per.items() if k.startswith("statement: ")),
            key=lambda item: -item[1],
        )
        return (
            f"{per.get('statements', 0):.1f} statements "
            f"({', '.join(f'{k} {v:.1f}' for k, v in kinds[:5])}), "
            f"{per.get('transactions', 0):.1f} explicit transactions"
        )
    total = sum(per.values())
    top = sorted(per.items(), key=lambda item: -item[1])[:4]
    return f"{total:.1f} commands ({', '.join(f'{k} {v:.1f}' for k, v in top)})"


def row_text(store: str, found: dict[str, Any]) -> str:
    group, cores = busiest(found)
    return (
        f"  {found['instances']} instance(s): {found['turns_per_s']:.0f} turns/s, "
        f"p50 {found['p50_ms']:.0f} ms, p99 {found['p99_ms']:.0f} ms; busiest: {group} "
        f"({cores:.2f} cores); store per turn: {store_cost(store, found)}"
    )


def table(data: dict[str, Any]) -> list[str]:
    lines = [
        "| store | instances | turns/s | p50 ms | p99 ms | CPU, cores: instances / nginx / "
        "store / test server / client / whole machine | store's work per turn (counted) |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for store, rows in data["results"].items():
        for count, found in rows.items():
            c = found["cores_used"]
            cpu = " / ".join(
                f"{c[k]:.2f}"
                for k in ("instances", "nginx", "store server", "test server", CLIENT, MACHINE)
            )
            lines.append(
                f"| {store} | {count} | {found['turns_per_s']:.0f} | {found['p50_ms']:.0f} | "
                f"{found['p99_ms']:.0f} | {cpu} | {store_cost(store, found)} |"
            )
    return lines


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for store, rows in data["results"].items():
        counts = [int(c) for c in rows]
        left.plot(counts, [r["turns_per_s"] for r in rows.values()], marker="o", label=store)
        right.plot(counts, [r["p50_ms"] for r in rows.values()], marker="o", label=f"{store} p50")
        right.plot(
            counts,
            [r["p99_ms"] for r in rows.values()],
            marker="x",
            linestyle="--",
            label=f"{store} p99",
        )
    for ax in (left, right):
        ax.set_xticks([1, 2, 4])
        ax.set_xlabel("chatchain serve instances behind nginx")
        ax.set_ylim(bottom=0)
        ax.legend()
    left.set_ylabel("turns per second")
    left.set_title(f"Throughput, {data['concurrency']} concurrent sessions")
    right.set_ylabel("ms per turn")
    right.set_title("Turn time")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def section(data: dict[str, Any]) -> str:
    cores = data["machine"].get("cores", "?")
    lines = [
        BEGIN,
        "## 10. Instances behind nginx",
        "",
        f"Written by `{data['command']}` ({data['date']}, {data['minutes']:.1f} min, "
        f"5-minute load average {data.get('load_average', float('nan')):.1f} on {cores} "
        "cores, shared); not run by `report.py` (which keeps this section). 1, 2 and 4 "
        "`chatchain serve` processes (one worker each, throttle off) over one PostgreSQL and "
        "over one Redis, behind Debian's nginx running the README's configuration; "
        f"{data['concurrency']} concurrent sessions of native JSON turns through nginx; the "
        "test server answers at once. CPU is each process's own (`/proc`), over the measured "
        "rounds, in cores (1.00 = one core busy all the time). The store's work is counted: "
        "PostgreSQL's statements (`pg_stat_statements` calls, BEGIN and COMMIT included: one "
        "round trip each) and transactions, Redis's commands (`INFO commandstats`; a "
        "pipeline sends several in one round trip). See "
        "[`benchmarks/bench_instances.py`](../benchmarks/bench_instances.py).",
        "",
        "![Turns per second and turn time by instances](img/bench-instances.png)",
        "",
        *table(data),
        "",
    ]
    lines += findings(data)
    lines.append(END)
    return "\n".join(lines) + "\n"


def order(found: dict[str, Any]) -> str:
    """The measured process groups, busiest first, with the cores each used."""
    used = sorted(
        ((k, v) for k, v in found["cores_used"].items() if k != MACHINE), key=lambda kv: -kv[1]
    )
    return ", ".join(f"{k} {v:.2f}" for k, v in used)


def findings(data: dict[str, Any]) -> list[str]:
    """What saturates, in words the figures support."""
    cores = data["machine"].get("cores", 0) or 0
    out = []
    for store, rows in data["results"].items():
        counts = sorted(rows, key=int)
        first, last = rows[counts[0]], rows[counts[-1]]
        group, used = busiest(last)
        measured = sum(v for k, v in last["cores_used"].items() if k != MACHINE)
        machine_busy = last["cores_used"].get(MACHINE, 0.0)
        full = cores and machine_busy >= 0.9 * cores
        out.append(
            f"- **{store}**: {first['turns_per_s']:.0f} turns/s with {counts[0]} instance, "
            f"{last['turns_per_s']:.0f} with {counts[-1]} "
            f"({last['turns_per_s'] / first['turns_per_s']:.2f}x). With {counts[-1]}: the "
            f"machine was busy {machine_busy:.2f} of its {cores} cores"
            f"{' (saturated)' if full else ''}, {measured:.2f} of them by the processes "
            f"measured and {max(machine_busy - measured, 0):.2f} by other work; the busiest "
            f"process was {group} ({used:.2f} cores); in order: {order(last)}."
        )
    out += [
        "",
        "On one machine of two cores, every process of the benchmark shares the same CPU: "
        "more instances add processes to share it, not cores, so past what the cores give, "
        "throughput cannot grow and the turn time grows with the queue. On separate "
        "machines each instance brings its own cores, and throughput "
        "would grow with instances until the one store is the limit: then what counts is "
        "the store's work per turn above, each statement or command a network round trip "
        "(about 0.1-0.5 ms in one data centre instead of loopback's tens of microseconds), "
        "and the store server's CPU, which this table shows is small per turn.",
    ]
    return out


def insert_section(page: str, text: str) -> str:
    """``page`` with ``text`` in place of its section, or before "## Running it"."""
    if BEGIN in page and END in page:
        head, rest = page.split(BEGIN, 1)
        return head + text + "\n" + rest.split(END, 1)[1].lstrip("\n")
    marker = "## Running it"
    if marker in page:
        head, tail = page.split(marker, 1)
        return head + text + "\n" + marker + tail
    return page.rstrip("\n") + "\n\n" + text


def section_of(page: str) -> str | None:
    """The page's section of this benchmark, if it has one."""
    if BEGIN not in page or END not in page:
        return None
    return BEGIN + page.split(BEGIN, 1)[1].split(END, 1)[0] + END + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="1 and 2 instances, few turns")
    parser.add_argument("--instances", default=None, help="counts to run (1,2,4)")
    parser.add_argument("--stores", default=",".join(STORES), help="postgres,redis")
    parser.add_argument("--turns", type=int, default=None, help="turns a round (256)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (3)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/")
    parser.add_argument(
        "--render-only", type=Path, default=None, help="write the docs from this --json file"
    )
    args = parser.parse_args(argv)
    args.instances = args.instances or ("1,2" if args.quick else "1,2,4")
    args.turns = args.turns or (64 if args.quick else 256)
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


def _shown(argv: list[str] | None) -> list[str]:
    """The options of this run, without where its JSON went (a path of this machine)."""
    given = list(sys.argv[1:] if argv is None else argv)
    if "--json" in given:
        at = given.index("--json")
        del given[at : at + 2]
    return given


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only is not None:
        data = json.loads(args.render_only.read_text())
    else:
        clean_environment()
        # SIGTERM unwinds like an error, so every server started here is stopped.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
        started = time.monotonic()
        data = asyncio.run(measure(args))
        data |= {
            "load_average": os.getloadavg()[1],
            "machine": machine(),
            "versions": versions(),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "minutes": (time.monotonic() - started) / 60,
            "command": " ".join(
                [".venv/bin/python", "benchmarks/bench_instances.py", *_shown(argv)]
            ),
        }
    print("\n".join(table(data)))
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    if not args.no_docs:
        plot(data, PLOT)
        DOCS.write_text(insert_section(DOCS.read_text(), section(data)))
        print(f"wrote {DOCS.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
