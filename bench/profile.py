"""Profile runner's P1 drain: ``python bench/profile.py [--jobs N]``.

Three views of one ``runner worker --drain`` over N no-op jobs (default 20,000), on a server of its own
(RUNNER_BENCH_HOME/profile, with pg_stat_statements loaded) so the queue bench is not disturbed:

- py-spy (from bench/.venv-competitors) samples the worker: on-CPU and wall-clock (``--idle``) runs, as
  collapsed stacks, summarised as the top functions by self time and by inclusive time;
- pg_stat_statements: calls, total and mean execution time of every statement the worker ran;
- CPU: the worker's user+sys seconds against the whole machine's busy seconds (the rest is PostgreSQL).

Writes bench/results/profile.md plus the raw stacks (profile-cpu.txt, profile-wall.txt).
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import asyncpg  # noqa: E402

from bench._common import (  # noqa: E402
    COMPETITOR_VENV,
    DEFAULT_HOME,
    RESULTS,
    RUNNER_CLI,
    SCRATCH,
    Proc,
    Server,
    cpu_busy_s,
    ensure_competitor_venv,
    fetchval,
    git_commit,
    log,
    run,
    runner_env,
    server_cpu_s,
)
from runner.embedded import EmbeddedPostgres  # noqa: E402

PY_SPY = COMPETITOR_VENV / "bin" / "py-spy"
TEMPLATE = "bench_profile_tpl"


def profile_server() -> Server:
    embedded = EmbeddedPostgres(DEFAULT_HOME / "profile")
    embedded.ensure_started()
    server = Server(embedded.url("postgres"), embedded, started_here=True)

    async def preload() -> bool:
        connection = await asyncpg.connect(server.admin_url)
        try:
            current = await connection.fetchval("SHOW shared_preload_libraries")
            if "pg_stat_statements" in current:
                return False
            await connection.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            await connection.execute("ALTER SYSTEM SET pg_stat_statements.track = 'all'")
            return True
        finally:
            await connection.close()

    if asyncio.run(preload()):
        embedded.restart()
    asyncio.run(server.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
    return server


# Consensus loops off (as in queue.py): with RUNNER_CHAIN_URL unset each worker would run a dev chain.
def env(url: str) -> dict[str, str]:
    return runner_env(url, RUNNER_WORKER_ID="bench-profile")


async def prepare(server: Server, jobs: int, name: str) -> str:
    if not await fetchval(server.admin_url, "SELECT count(*) FROM pg_database WHERE datname = $1", TEMPLATE):
        url = await server.create(TEMPLATE)
        await run([RUNNER_CLI, "migrate"], env(url), SCRATCH / "logs" / "profile-migrate.log")
    url = await server.create(name, TEMPLATE)
    path = SCRATCH / "work" / f"profile-noop-{jobs}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}\n" * jobs)
    await run([RUNNER_CLI, "enqueue", "noop", "--jsonl", path], env(url), SCRATCH / "logs" / "profile-enqueue.log")
    return url


async def drain(server: Server, jobs: int, name: str, py_spy: list[str] | None) -> dict[str, Any]:
    url = await prepare(server, jobs, name)
    await server.execute("SELECT pg_stat_statements_reset()")
    argv: list[Any] = [RUNNER_CLI, "worker", "--drain"]
    if py_spy:
        argv = [PY_SPY, "record", *py_spy, "--", *argv]
    busy0, server0 = cpu_busy_s(), server_cpu_s(server)
    result = (await Proc(argv, env(url), SCRATCH / "logs" / f"profile-{name}.log").start().wait(1800)).check()
    busy = cpu_busy_s() - busy0
    await asyncio.sleep(0.2)  # the worker's backends are reaped by the postmaster
    server_s = (server_cpu_s(server) or 0.0) - (server0 or 0.0)
    connection = await asyncpg.connect(server.admin_url)
    try:
        rows = await connection.fetch(
            """SELECT calls, total_exec_time, mean_exec_time, rows, query FROM pg_stat_statements s
               JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1 ORDER BY total_exec_time DESC""", name)
    finally:
        await connection.close()
    succeeded = await fetchval(url, "SELECT count(*) FROM runner_jobs WHERE status = 'succeeded'")
    await server.drop(name)
    return {"wall_s": result.wall_s, "worker_cpu_s": result.user_s + result.sys_s, "machine_busy_s": busy,
            "server_cpu_s": server_s,
            "succeeded": succeeded, "statements": [dict(r) for r in rows]}


# (bucket, marker frames): a main-thread sample goes to the first bucket one of whose markers is in its stack.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("startup: imports, settings, plugin loading (before the event loop)", ("<startup>",)),
    ("App.open: pool, plugin resources", ("App.open ",)),
    ("fetcher: claim + start jobs", ("Fetcher.",)),
    ("completer: write outcomes", ("Completer.",)),
    ("job tasks: Executor._execute + handler", ("Executor._execute ",)),
    ("heartbeat", ("Heartbeat.",)),
    ("canceller", ("CancelWatcher.",)),
    ("drain watcher", ("DrainWatcher.",)),
    ("listener (LISTEN connection)", ("Listener.",)),
    ("rescuer / depth sampler / other services", ("Rescuer.", "DepthSampler.", "Service.run ")),
    ("HTTP server", ("runner/http.py",)),
    ("shutdown: App.close, worker stop", ("App.close ", "Worker._supervise ", "Worker.run ")),
    ("event loop: waiting in select() (idle, or waiting on PostgreSQL)", ("EpollSelector.select ",)),
    ("event loop: I/O callbacks, protocol parsing, task switching", ("BaseEventLoop._run_once ",)),
]


def function_of(frame: str) -> str:
    """"name (path/to/module.py:123)" -> "name (module path)": one entry per function, not per line."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})"


def summarise_stacks(path: Path, top: int = 25) -> dict[str, Any]:
    """Main-thread samples from py-spy's collapsed (raw) output: top functions by self and by inclusive
    samples, and the share of each BUCKETS entry. asyncpg's and the loop's threads are left out."""
    self_counts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    buckets: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = [f for f in stack.split(";") if f]
        if not frames or "threading.py" in frames[0]:
            continue
        count = int(count_text)
        total += count
        functions = [function_of(f) for f in frames]
        self_counts[functions[-1]] += count
        for function in set(functions):
            inclusive[function] += count
        joined = ";".join(functions)
        if "run_async (runner/cli.py)" not in joined:
            joined += ";<startup>"
        buckets[next((name for name, markers in BUCKETS if any(m in joined for m in markers)), "other")] += count
    return {"total": total, "self": self_counts.most_common(top), "inclusive": inclusive.most_common(top + 15),
            "buckets": [(name, buckets[name]) for name, _ in [*BUCKETS, ("other", ())] if buckets[name]]}


def table(rows: list[tuple[str, int]], total: int) -> list[str]:
    lines = ["| samples | share | where |", "| ---: | ---: | --- |"]
    lines += [f"| {n} | {100 * n / total:.1f}% | `{frame}` |" for frame, n in rows]
    return lines


def statements_table(statements: list[dict[str, Any]], wall_s: float) -> list[str]:
    lines = ["| calls | total ms | mean ms | rows | share of drain wall | statement |",
             "| ---: | ---: | ---: | ---: | ---: | --- |"]
    for s in statements[:15]:
        query = " ".join(s["query"].split())[:110].replace("|", "\\|")
        lines.append(f"| {s['calls']:,} | {s['total_exec_time']:,.0f} | {s['mean_exec_time']:.3f} | {s['rows']:,} "
                     f"| {s['total_exec_time'] / 10 / wall_s:.1f}% | `{query}` |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    args = parser.parse_args()
    ensure_competitor_venv()
    server = profile_server()
    started = time.time()
    try:
        plain = asyncio.run(drain(server, args.jobs, "bench_profile_plain", None))
        log(f"plain drain: {args.jobs / plain['wall_s']:.0f} jobs/s")
        cpu_out, wall_out = RESULTS / "profile-cpu.txt", RESULTS / "profile-wall.txt"
        cpu = asyncio.run(drain(server, args.jobs, "bench_profile_cpu",
                                ["--format", "raw", "--rate", str(args.rate), "-o", str(cpu_out)]))
        wall = asyncio.run(drain(server, args.jobs, "bench_profile_wall",
                                 ["--idle", "--format", "raw", "--rate", str(args.rate), "-o", str(wall_out)]))
    finally:
        server.stop_if_started_here()
    cpu_stacks, wall_stacks = summarise_stacks(cpu_out), summarise_stacks(wall_out)
    calls = sum(s["calls"] for s in plain["statements"])
    db_ms = sum(s["total_exec_time"] for s in plain["statements"])
    lines = [
        f"# Profile of `runner worker --drain`, {args.jobs:,} no-op jobs",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, runner {git_commit()}; "
        f"command: `python bench/profile.py --jobs {args.jobs}`",
        "",
        "## Where the time goes (run without py-spy)",
        "",
        f"- drain wall {plain['wall_s']:.2f} s = **{args.jobs / plain['wall_s']:,.0f} jobs/s** (whole process); "
        f"{plain['succeeded']:,} succeeded",
        f"- worker CPU (user+sys) {plain['worker_cpu_s']:.2f} s = {100 * plain['worker_cpu_s'] / plain['wall_s']:.0f}% "
        f"of one core ({1000 * plain['worker_cpu_s'] / args.jobs:.3f} ms per job); PostgreSQL (all its processes) "
        f"{plain['server_cpu_s']:.2f} CPU-s ({1000 * plain['server_cpu_s'] / args.jobs:.3f} ms per job); "
        f"whole machine busy {plain['machine_busy_s']:.2f} CPU-s of {2 * plain['wall_s']:.2f} available "
        f"(2 cores; the rest is other processes)",
        f"- statements executed: {calls:,} ({calls / args.jobs:.3f} per job), server execution time "
        f"{db_ms / 1000:.2f} s ({db_ms / 10 / plain['wall_s']:.0f}% of the wall; parse, commit/WAL flush and "
        "network are not in it)",
        "",
        "### Statements (pg_stat_statements, plain run)",
        "",
        *statements_table(plain["statements"], plain["wall_s"]),
        "",
    ]
    for title, stacks, run_ in (("on-CPU", cpu_stacks, cpu), ("wall clock (--idle)", wall_stacks, wall)):
        total = stacks["total"]
        lines += [
            f"## py-spy {title}: {total:,} main-thread samples at {args.rate}/s "
            f"(drain {run_['wall_s']:.2f} s under py-spy)",
            "",
            "### By phase / loop",
            "",
            *table(stacks["buckets"], total),
            "",
            "### Top functions by self time",
            "",
            *table(stacks["self"], total),
            "",
            "### Top functions by inclusive time",
            "",
            *table(stacks["inclusive"], total),
            "",
        ]
    (RESULTS / "profile.md").write_text("\n".join(lines))
    (RESULTS / "profile.json").write_text(json.dumps({"plain": plain, "cpu": {k: v for k, v in cpu.items()
                                                                              if k != "statements"},
                                                      "wall": {k: v for k, v in wall.items() if k != "statements"}},
                                                     indent=2, default=str) + "\n")
    print("\n".join(lines[:20]))


if __name__ == "__main__":
    main()
