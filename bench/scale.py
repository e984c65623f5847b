"""Scale-out: 1, 2 and 4 ``runner worker --drain`` processes on one database: ``python bench/scale.py``.

Each run gets a fresh database with N ``record`` jobs (the tests' kind, tests/kinds.py: one row per execution
into runner_executions, in the same transaction as a lease-fenced progress write). All workers start
together with RUNNER_WORKER_REPLICAS=<workers> and RUNNER_DB_MAX_CONNECTIONS=<the server's
max_connections>, so each pool is sized by the budget formula. Reported per run: jobs/s (jobs over the
time from the first start to the last exit), peak server connections on the database (total and the
largest per worker, from pg_stat_activity by application_name), the pool size the formula gave, how the
executions split between workers, and duplicate executions (job ids with more than one row), which must
be 0.

``--stress`` adds, for each worker count of ``--workers`` from 2 up, a run under stress (``--stress-only``:
that run alone): 2 CPU hogs beside the workers for the whole run, N ``record`` jobs of 0.2 s that log
``record started``, pools of 3 (RUNNER_POOL_MAX_SIZE=3, RUNNER_POOL_MIN_SIZE=1), a 3 s lease, and one
worker stopped with SIGSTOP once it holds running jobs and continued (SIGCONT) once the database shows
none of its jobs running any more (each lease expired and another worker's rescuer took it). Reported:
starts and distinct jobs started (from the JSON logs), effects (rows in runner_executions), duplicate
effects, succeeded jobs, rescues, the jobs the paused worker held and the exit codes. The script exits 1
if a run has duplicate effects, effects or succeeded jobs other than N, or a worker exiting non-zero.

Options: ``--workers 1,2,4``, ``--jobs`` (default 20,000), ``--rounds`` (default 1; median reported),
``--stress``, ``--stress-only``.
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import asyncpg  # noqa: E402

from bench._common import (  # noqa: E402
    RESULTS,
    RUNNER_CLI,
    SCRATCH,
    Proc,
    Server,
    base_env,
    cpu_busy_s,
    fetchval,
    fresh_name,
    git_commit,
    log,
    machine,
    median,
    run,
    server_cpu_s,
    start_server,
    wait_for_quiet,
    write_report,
)
from runner.config.settings import LISTENER_CONNECTIONS, POOL_BUDGET_SHARE, POOL_MAX_CAP  # noqa: E402
from tests.kinds import REFERENCE as TEST_KINDS  # noqa: E402  (record: the tests' kind)
from tests.stress import cpu_hogs  # noqa: E402  (the tests' stress fixture and this run share the hogs)

TEMPLATE = "bench_tpl_scale"
SAMPLER_APP = "bench-scale-sampler"

# The stress run (as tests/stress.py): CPU hogs, a small pool budget, a short lease, one worker paused.
STRESS_HOGS = 2
STRESS_PAYLOAD = '{"seconds": 0.2, "log_start": true}'
STRESS_ENV = {
    "RUNNER_POOL_MAX_SIZE": "3",
    "RUNNER_POOL_MIN_SIZE": "1",
    "RUNNER_LOG_FORMAT": "json",
    "RUNNER_HEARTBEAT_INTERVAL": "0.5",
    "RUNNER_LEASE_TIMEOUT": "3",
    "RUNNER_RESCUE_INTERVAL": "0.5",
}
RUNNING_OF = "SELECT count(*) FROM runner_jobs WHERE status = 'running' AND lease_owner = $1"


def budget_pool_max(db_max_connections: int, replicas: int) -> int:
    """The formula of config.settings.Settings.pool_budget (derived case), for the report."""
    return min(POOL_MAX_CAP, int(db_max_connections * POOL_BUDGET_SHARE / replicas) - LISTENER_CONNECTIONS)


@dataclass
class PerWorkerSampler:
    """Connections on one database every interval, by worker (application_name without ':listen')."""

    server: Server
    database: str
    interval_s: float = 0.05
    peak_total: int = 0
    peak_by_worker: dict[str, int] = field(default_factory=dict)
    samples: int = 0

    async def __aenter__(self) -> PerWorkerSampler:
        self._connection = await asyncpg.connect(self.server.admin_url,
                                                 server_settings={"application_name": SAMPLER_APP})
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *_: object) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._connection.close()

    async def _loop(self) -> None:
        while True:
            rows = await self._connection.fetch(
                """SELECT application_name, count(*) AS n FROM pg_stat_activity
                   WHERE datname = $1 AND backend_type = 'client backend' AND application_name <> $2
                   GROUP BY application_name""", self.database, SAMPLER_APP)
            by_worker: dict[str, int] = {}
            for row in rows:
                worker = row["application_name"].removesuffix(":listen")
                by_worker[worker] = by_worker.get(worker, 0) + row["n"]
            self.peak_total = max(self.peak_total, sum(by_worker.values()))
            for worker, n in by_worker.items():
                self.peak_by_worker[worker] = max(self.peak_by_worker.get(worker, 0), n)
            self.samples += 1
            await asyncio.sleep(self.interval_s)


# Consensus loops off (as in queue.py): with RUNNER_CHAIN_URL unset each worker would run a dev chain.
# RUNNER_APP: the tests' `record` kind and its runner_executions table (tests/kinds.py; the processes run in ROOT).
def env(url: str, **extra: str) -> dict[str, str]:
    return base_env(RUNNER_DATABASE_URL=url, RUNNER_HOME=str(SCRATCH / "runner-home"), RUNNER_HTTP_PORT="0",
                    RUNNER_CONSENSUS_ENABLED="false", RUNNER_APP=TEST_KINDS, **extra)


async def one_run(server: Server, workers: int, jobs: int, max_connections: int, round_: int) -> dict[str, Any]:
    name = fresh_name(f"scale{workers}")
    url = await server.create(name, TEMPLATE)
    logs = SCRATCH / "logs"
    try:
        jsonl = SCRATCH / "work" / f"record-{jobs}.jsonl"
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        jsonl.write_text('{"seconds": 0}\n' * jobs)
        await run([RUNNER_CLI, "enqueue", "record", "--jsonl", jsonl], env(url), logs / f"scale{workers}-enqueue.log")
        ids = [f"scale{workers}-r{round_}-w{i}" for i in range(workers)]
        busy0, server0 = cpu_busy_s(), server_cpu_s(server)
        async with PerWorkerSampler(server, name) as sampler:
            started = time.perf_counter()
            procs = [
                Proc([RUNNER_CLI, "worker", "--drain"],
                     env(url, RUNNER_WORKER_ID=worker_id, RUNNER_WORKER_REPLICAS=str(workers),
                         RUNNER_DB_MAX_CONNECTIONS=str(max_connections)),
                     logs / f"scale{workers}-r{round_}-{worker_id}.log").start()
                for worker_id in ids
            ]
            results = [(await p.wait(timeout_s=1800)).check() for p in procs]
            elapsed = time.perf_counter() - started
        busy = cpu_busy_s() - busy0
        await asyncio.sleep(0.2)  # the workers' backends are reaped by the postmaster
        server1 = server_cpu_s(server)
        server_s = server1 - server0 if server0 is not None and server1 is not None else None
        connection = await asyncpg.connect(url)
        try:
            executions, duplicates = await effect_counts(connection)
            by_worker = {r["worker_id"]: r["n"] for r in await connection.fetch(
                "SELECT worker_id, count(*) AS n FROM runner_executions GROUP BY worker_id ORDER BY worker_id")}
            succeeded = await connection.fetchval("SELECT count(*) FROM runner_jobs WHERE status = 'succeeded'")
        finally:
            await connection.close()
    finally:
        await server.drop(name)
    pool_max = budget_pool_max(max_connections, workers)
    return {
        "workers": workers,
        "jobs": jobs,
        "elapsed_s": elapsed,
        "jobs_per_s": jobs / elapsed,
        "pool_max_per_worker": pool_max,
        "connection_budget": workers * (pool_max + LISTENER_CONNECTIONS),
        "peak_connections_total": sampler.peak_total,
        "peak_connections_per_worker": max(sampler.peak_by_worker.values(), default=0),
        "succeeded": succeeded,
        "executions": executions,
        "duplicate_executions": duplicates,
        "executions_by_worker": {k.removeprefix("scale"): v for k, v in by_worker.items()},
        "worker_cpu_s": sum(r.user_s + r.sys_s for r in results),
        "server_cpu_s": server_s,
        "machine_busy_cpu_s": busy,
        "worker_wall_s": [round(r.wall_s, 2) for r in results],
    }


def log_events(path: Path, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of one event in a worker's log file."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if f'"{event}"' not in line or not line.startswith("{"):
            continue
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("event") == event:
                found.append(entry)
    return found


async def poll(condition: Any, timeout_s: float, what: str, interval_s: float = 0.02) -> None:
    """Until ``await condition()`` is true (a database condition), checked every interval_s."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:g}s")
        await asyncio.sleep(interval_s)


@dataclass
class Pause:
    """What the paused worker held when it was stopped, and how long it stayed stopped."""

    worker_id: str
    held: int | None = None
    stopped_after_s: float | None = None
    stopped_s: float | None = None
    attempts: int = 0
    error: str | None = None


async def pause_past_lease(connection: asyncpg.Connection, proc: Proc, pause: Pause, started: float,
                           timeout_s: float = 300) -> None:
    """SIGSTOP the worker once it holds running jobs; SIGCONT it once none of its jobs is running any more
    (each lease expired and another worker's rescuer took it). If it held nothing by the time it stopped
    (its jobs finished between the check and the signal), it is continued and stopped again later."""
    async def holds() -> bool:
        return not proc.running() or await connection.fetchval(RUNNING_OF, pause.worker_id) >= 1

    async def released() -> bool:
        return await connection.fetchval(RUNNING_OF, pause.worker_id) == 0

    try:
        while True:
            await poll(holds, timeout_s, f"{pause.worker_id} holding a running job")
            if not proc.running():
                raise RuntimeError(f"{pause.worker_id} exited before it could be paused")
            os.kill(proc.pid, signal.SIGSTOP)
            stopped = time.perf_counter()
            pause.attempts += 1
            try:
                held = int(await connection.fetchval(RUNNING_OF, pause.worker_id))
                if held:
                    pause.held, pause.stopped_after_s = held, stopped - started
                    log(f"  {pause.worker_id} stopped holding {held} running job(s); waiting for the rescues")
                    await poll(released, timeout_s, f"{pause.worker_id}'s jobs rescued", interval_s=0.05)
                    pause.stopped_s = time.perf_counter() - stopped
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            if pause.held is not None:
                log(f"  {pause.worker_id} continued after {pause.stopped_s:.1f}s stopped")
                return
    except (TimeoutError, RuntimeError) as error:
        pause.error = str(error)
        log(f"  pause failed: {error}")


async def effect_counts(connection: asyncpg.Connection) -> tuple[int, int]:
    """Rows in runner_executions, and job ids with more than one (duplicate effects, which must be 0)."""
    row = await connection.fetchrow(
        "SELECT (SELECT count(*) FROM runner_executions) AS rows, count(*) AS duplicates "
        "FROM (SELECT job_id FROM runner_executions GROUP BY job_id HAVING count(*) > 1) d")
    assert row is not None
    return int(row["rows"]), int(row["duplicates"])


async def stress_run(server: Server, workers: int, jobs: int, round_: int) -> dict[str, Any]:
    name = fresh_name(f"stress{workers}")
    url = await server.create(name, TEMPLATE)
    logs = SCRATCH / "logs"
    procs: list[Proc] = []
    try:
        jsonl = SCRATCH / "work" / f"record-stress-{jobs}.jsonl"
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        jsonl.write_text((STRESS_PAYLOAD + "\n") * jobs)
        await run([str(RUNNER_CLI), "enqueue", "record", "--jsonl", str(jsonl)], env(url),
                  logs / f"stress{workers}-enqueue.log")
        ids = [f"stress{workers}-r{round_}-w{i}" for i in range(workers)]
        paths = [logs / f"stress{workers}-r{round_}-{worker_id}.log" for worker_id in ids]
        pause = Pause(ids[0])
        pauser: asyncio.Task[None] | None = None
        connection = await asyncpg.connect(url, server_settings={"application_name": SAMPLER_APP})
        try:
            with cpu_hogs(STRESS_HOGS):
                started = time.perf_counter()
                procs = [Proc([str(RUNNER_CLI), "worker", "--drain"],
                              env(url, RUNNER_WORKER_ID=worker_id, **STRESS_ENV), path).start()
                         for worker_id, path in zip(ids, paths, strict=True)]
                pauser = asyncio.create_task(pause_past_lease(connection, procs[0], pause, started))
                results = [await p.wait(timeout_s=1800) for p in procs]
                elapsed = time.perf_counter() - started
                await pauser
        finally:
            if pauser is not None and not pauser.done():  # only after a failure above
                pauser.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pauser
            for p in procs:  # likewise: no worker outlives a failed run
                p.signal(signal.SIGCONT)
                p.signal(signal.SIGKILL)
            await connection.close()
        db = await asyncpg.connect(url)
        try:
            effects, duplicates = await effect_counts(db)
            statuses = {r["status"]: r["n"] for r in await db.fetch(
                "SELECT status, count(*) AS n FROM runner_jobs GROUP BY status ORDER BY status")}
            recovered = await db.fetchval("SELECT count(*) FROM runner_jobs WHERE recoveries > 0")
        finally:
            await db.close()
    finally:
        await server.drop(name)
    starts = [entry.get("job_id") for path in paths for entry in log_events(path, "record started")]
    rescues = sum(len(log_events(path, "stale job recovered")) for path in paths)
    return {
        "workers": workers,
        "jobs": jobs,
        "elapsed_s": elapsed,
        "jobs_per_s": jobs / elapsed,
        "starts": len(starts),
        "distinct_started": len(set(starts)),
        "effects": effects,
        "duplicate_effects": duplicates,
        "succeeded": statuses.get("succeeded", 0),
        "statuses": statuses,
        "rescues": rescues,
        "jobs_recovered": recovered,
        "paused_worker": pause.worker_id,
        "paused_held": pause.held,
        "paused_after_s": pause.stopped_after_s,
        "paused_s": pause.stopped_s,
        "pause_error": pause.error,
        "exit_codes": [r.returncode for r in results],
        "worker_cpu_s": sum(r.user_s + r.sys_s for r in results),
        "worker_wall_s": [round(r.wall_s, 2) for r in results],
        "hogs": STRESS_HOGS,
        "settings": STRESS_ENV,
        "payload": json.loads(STRESS_PAYLOAD),
    }


def stress_failures(row: dict[str, Any]) -> list[str]:
    """Why a stress run failed (empty: it passed)."""
    why = []
    if row["duplicate_effects"]:
        why.append(f"{row['duplicate_effects']} job(s) with more than one effect")
    if row["effects"] != row["jobs"]:
        why.append(f"{row['effects']} effects for {row['jobs']} jobs")
    if row["succeeded"] != row["jobs"]:
        why.append(f"{row['succeeded']} of {row['jobs']} jobs succeeded ({row['statuses']})")
    if any(row["exit_codes"]):
        why.append(f"worker exit codes {row['exit_codes']}")
    if row["pause_error"] or not row["paused_held"]:
        why.append(f"the pause did not happen: {row['pause_error']}")
    return why


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"{report['started_at']}; runner {report['runner_commit']}; {report['jobs']:,} `record` jobs; "
        f"median of {report['rounds']} round(s); server max_connections {report['max_connections']}.",
    ]
    if report["summary"]:
        lines += [
            "",
            "| workers | jobs/s | pool max per worker (formula) | connection budget N x (pool + 1) "
            "| peak server connections | peak per worker | executions | duplicate executions "
            "| CPU-s workers / PostgreSQL / wall |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
    for row in report["summary"]:
        lines.append(
            f"| {row['workers']} | {row['jobs_per_s']:,.0f} | {row['pool_max_per_worker']} "
            f"| {row['connection_budget']} | {row['peak_connections_total']} | {row['peak_connections_per_worker']} "
            f"| {row['executions']:,} | {row['duplicate_executions']} "
            f"| {row['worker_cpu_s']:.1f} / {row['server_cpu_s']:.1f} / {row['elapsed_s']:.1f} |")
    if report.get("stress"):
        lines += [
            "",
            f"Under stress (every run): {STRESS_HOGS} CPU hogs, `record` jobs of 0.2 s logging `record started`, "
            "pools of 3 (min 1), heartbeat 0.5 s, lease 3 s, rescuer every 0.5 s; one worker stopped (SIGSTOP) "
            "once it held running jobs and continued once none of them was running any more.",
            "",
            "| workers | jobs | seconds | jobs/s | starts | distinct jobs started | effects | duplicate effects "
            "| succeeded | rescues | held by the paused worker | stopped s | exit codes |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
    for row in report.get("stress", []):
        stopped = f"{row['paused_s']:.1f}" if row["paused_s"] is not None else "-"
        lines.append(
            f"| {row['workers']} | {row['jobs']:,} | {row['elapsed_s']:.1f} | {row['jobs_per_s']:,.0f} "
            f"| {row['starts']:,} | {row['distinct_started']:,} | {row['effects']:,} | {row['duplicate_effects']} "
            f"| {row['succeeded']:,} | {row['rescues']} | {row['paused_held'] if row['paused_held'] else '-'} "
            f"| {stopped} | {' '.join(str(c) for c in row['exit_codes'])} |")
    m = report["machine"]
    lines += ["", f"Machine: {m['nproc']} cores, {m['ram_gib']} GiB RAM, PostgreSQL {report['server_version']} "
                  "on the same host.", "", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    counts = [int(x) for x in args.workers.split(",") if x]
    started = time.time()
    server = start_server()
    try:
        url = await server.create(TEMPLATE)
        await run([RUNNER_CLI, "migrate"], env(url), SCRATCH / "logs" / "scale-migrate.log")
        max_connections = int(await fetchval(server.admin_url, "SHOW max_connections"))
        version = await fetchval(server.admin_url, "SHOW server_version")
        plain = [] if args.stress_only else counts
        runs: dict[int, list[dict[str, Any]]] = {n: [] for n in plain}
        for round_ in range(args.rounds):
            for n in plain if round_ % 2 == 0 else list(reversed(plain)):
                background = await wait_for_quiet(args.quiet_cores, args.quiet_wait)
                log(f"round {round_ + 1}/{args.rounds}: {n} worker(s) (background load {background:.2f} cores)")
                result = await one_run(server, n, args.jobs, max_connections, round_)
                result["background_busy_cores"] = background
                log(f"  {json.dumps(result)}")
                runs[n].append(result)
        stress: list[dict[str, Any]] = []
        stressed = [n for n in counts if n >= 2] if args.stress or args.stress_only else []
        for n in sorted(set(counts) - set(stressed)) if stressed else []:
            log(f"no stress run with {n} worker: nobody would rescue the paused worker's jobs")
        for round_ in range(args.rounds):
            for n in stressed if round_ % 2 == 0 else list(reversed(stressed)):
                background = await wait_for_quiet(args.quiet_cores, args.quiet_wait)
                log(f"round {round_ + 1}/{args.rounds}: {n} worker(s) under stress "
                    f"(background load {background:.2f} cores)")
                result = await stress_run(server, n, args.jobs, round_)
                result["round"] = round_ + 1
                result["background_busy_cores"] = background
                log(f"  {json.dumps(result)}")
                stress.append(result)
        await server.drop(TEMPLATE)
    finally:
        server.stop_if_started_here()
    summary = []
    for n in plain:
        rows = runs[n]
        summary.append({
            "workers": n,
            "jobs_per_s": median([r["jobs_per_s"] for r in rows]),
            "pool_max_per_worker": rows[0]["pool_max_per_worker"],
            "connection_budget": rows[0]["connection_budget"],
            "peak_connections_total": max(r["peak_connections_total"] for r in rows),
            "peak_connections_per_worker": max(r["peak_connections_per_worker"] for r in rows),
            "executions": min(r["executions"] for r in rows),
            "duplicate_executions": max(r["duplicate_executions"] for r in rows),
            "worker_cpu_s": median([r["worker_cpu_s"] for r in rows]),
            "server_cpu_s": median([r["server_cpu_s"] for r in rows if r["server_cpu_s"] is not None] or [0.0]),
            "elapsed_s": median([r["elapsed_s"] for r in rows]),
        })
    return {
        "started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "elapsed_s": time.time() - started,
        "command": "python bench/scale.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        "jobs": args.jobs,
        "rounds": args.rounds,
        "max_connections": max_connections,
        "server_version": version,
        "machine": machine(),
        "runner_commit": git_commit(),
        "summary": summary,
        "runs": runs,
        "stress": stress,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--quiet-cores", type=float, default=0.5,
                        help="before each run, wait until other processes use fewer cores than this")
    parser.add_argument("--quiet-wait", type=float, default=90.0, help="...but at most this many seconds")
    parser.add_argument("--stress", action="store_true",
                        help="after the plain runs, a run under stress for each --workers count from 2 up")
    parser.add_argument("--stress-only", action="store_true", help="the runs under stress alone")
    args = parser.parse_args()
    if (args.stress or args.stress_only) and not any(int(x) >= 2 for x in args.workers.split(",") if x):
        parser.error("a run under stress needs --workers 2 or more (one paused, another to rescue its jobs)")
    report = asyncio.run(main_async(args))
    write_report(args.out_dir, "scale", markdown(report), report)
    print(markdown(report))
    failed = [row for row in report["summary"] if row["duplicate_executions"] or row["executions"] != args.jobs]
    if failed:
        print(f"error: duplicate or missing executions: {failed}", file=sys.stderr)
    stress_failed = [(row, why) for row in report["stress"] if (why := stress_failures(row))]
    for row, why in stress_failed:
        print(f"error: run under stress with {row['workers']} workers (round {row['round']}): {'; '.join(why)}",
              file=sys.stderr)
    if failed or stress_failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
