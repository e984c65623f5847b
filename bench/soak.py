"""Soak: a steady enqueue rate into 2 `runner worker` processes: ``python bench/soak.py [--jobs N --rate R]``.

One producer enqueues --jobs no-op jobs (default 1,000,000) at --rate jobs/s (default 2,000) through
runner's ENQUEUE, one batch every 100 ms, into two `runner worker` processes (default settings, consensus
loops off as in bench/queue.py) with RUNNER_RETENTION=60 and RUNNER_CLEANUP_INTERVAL=5, so finished rows
are deleted during the run as in production. Every --interval seconds (default 5) it samples:

- jobs/s done (jobs produced minus jobs pending or running, per interval);
- claim latency: (a) the workers' own CLAIM statements from pg_stat_statements, per interval (calls, mean,
  max; the entry is reset after each sample); (b) a probe: the CLAIM statement with the worker's
  parameters but LIMIT 10, timed from a side connection inside a transaction that is rolled back, every
  0.05 s: p50/p99 per interval, and p99 per 30 s window for the flatness check (600 probes: a p99 of one
  interval's 100 is nearly its maximum); its rolled-back updates add ~200 dead tuples/s; (c) queue delay
  created_at -> started_at of the jobs started in the interval, p50/p99;
- pg_stat_user_tables for runner_jobs: n_live_tup, n_dead_tup, n_tup_upd, n_tup_hot_upd, n_tup_del,
  autovacuum_count, vacuum_count (the workers' own VACUUMs, runner.loops.vacuum), autoanalyze_count;
- pg_relation_size, pg_indexes_size of runner_jobs.

Reports the samples as a table and the last half's flatness (claim p99 and table size within +-20% of the
last half's mean). Runs its own embedded PostgreSQL in RUNNER_BENCH_HOME/soak (pg_stat_statements
preloaded). Writes bench/results/soak.md (raw samples: RUNNER_BENCH_HOME/scratch/work/soak.json).
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
import signal  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import asyncpg  # noqa: E402

from bench._common import (  # noqa: E402
    DEFAULT_HOME,
    RESULTS,
    RUNNER_CLI,
    SCRATCH,
    Proc,
    Server,
    base_env,
    fresh_name,
    git_commit,
    log,
    machine,
    percentile,
    run,
    write_report,
)
from runner import queue_sql as sql  # noqa: E402
from runner.embedded import EmbeddedPostgres  # noqa: E402

TEMPLATE = "bench_soak_tpl"
QUEUES = ["default"]
TICK_S = 0.1
PROBE_PERIOD_S = 0.05
WINDOW_S = 30.0  # claim p99 for the flatness check: over this many seconds of probes


def soak_server() -> Server:
    embedded = EmbeddedPostgres(DEFAULT_HOME / "soak")
    embedded.ensure_started()
    server = Server(embedded.url("postgres"), embedded, started_here=True)

    async def preload() -> bool:
        connection = await asyncpg.connect(server.admin_url)
        try:
            if "pg_stat_statements" in await connection.fetchval("SHOW shared_preload_libraries"):
                return False
            await connection.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            return True
        finally:
            await connection.close()

    if asyncio.run(preload()):
        embedded.restart()
    return server


def env(url: str, **extra: str) -> dict[str, str]:
    return base_env(RUNNER_DATABASE_URL=url, RUNNER_HOME=str(SCRATCH / "runner-home"), RUNNER_HTTP_PORT="0",
                    RUNNER_CONSENSUS_ENABLED="false", **extra)


def worker_kinds() -> list[str]:
    from runner.plugins import build_registry, load_plugins

    return sorted(build_registry(load_plugins()).kinds)


class Producer:
    def __init__(self, url: str, total: int, rate: float) -> None:
        self.url, self.total, self.rate = url, total, rate
        self.produced = 0
        self.behind_max_s = 0.0

    async def run(self) -> None:
        connection = await asyncpg.connect(self.url)
        started = time.monotonic()
        try:
            while self.produced < self.total:
                due = min(self.total, int((time.monotonic() - started + TICK_S) * self.rate))
                k = due - self.produced
                if k > 0:
                    await connection.fetch(sql.ENQUEUE, ["noop"] * k, QUEUES * k, ["{}"] * k, [0] * k,
                                           [0.0] * k, [5] * k, [None] * k)
                    self.produced += k
                wake = started + (self.produced / self.rate)
                self.behind_max_s = max(self.behind_max_s, time.monotonic() - wake - TICK_S)
                await asyncio.sleep(max(0.0, wake - time.monotonic()))
        finally:
            await connection.close()


class Prober:
    """Times CLAIM (worker parameters, LIMIT 10) in a rolled-back transaction every PROBE_PERIOD_S."""

    def __init__(self, url: str, kinds: list[str]) -> None:
        self.url, self.kinds = url, kinds
        self.latencies_ms: list[float] = []

    async def run(self) -> None:
        connection = await asyncpg.connect(self.url)
        try:
            while True:
                t0 = time.perf_counter()
                transaction = connection.transaction()
                await transaction.start()
                try:
                    await connection.fetch(sql.CLAIM, QUEUES, 10, "bench-soak-probe", 30.0, self.kinds)
                    self.latencies_ms.append((time.perf_counter() - t0) * 1000)
                finally:
                    await transaction.rollback()
                await asyncio.sleep(PROBE_PERIOD_S)
        finally:
            with contextlib.suppress(Exception):
                await connection.close()

    def take(self) -> list[float]:
        taken, self.latencies_ms = self.latencies_ms, []
        return taken


STATS = """
SELECT n_live_tup, n_dead_tup, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del, autovacuum_count,
       vacuum_count, autoanalyze_count, pg_relation_size('runner_jobs') AS table_bytes,
       pg_indexes_size('runner_jobs') AS index_bytes
FROM pg_stat_user_tables WHERE relname = 'runner_jobs'
"""

PGSS = """
SELECT s.userid, s.dbid, s.queryid, s.calls, s.mean_exec_time, s.max_exec_time, s.query
FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
WHERE d.datname = current_database() AND (s.query LIKE 'WITH candidates AS%' OR s.query LIKE 'WITH outcome AS%')
"""


async def sample(connection: asyncpg.Connection, producer: Producer, since: float) -> dict[str, Any]:
    remaining = await connection.fetchval("SELECT count(*) FROM runner_jobs WHERE status IN ('pending', 'running')")
    stats = dict(await connection.fetchrow(STATS) or {})
    delays = await connection.fetchval(
        """SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at))
           FROM runner_jobs WHERE started_at >= to_timestamp($1)""", since)
    statements: dict[str, Any] = {}
    with contextlib.suppress(asyncpg.PostgresError):
        for row in await connection.fetch(PGSS):
            key = "claim" if row["query"].startswith("WITH candidates") else "complete"
            if row["query"].startswith("WITH candidates") and "SKIP LOCKED" not in row["query"]:
                continue
            previous = statements.get(key)
            if previous is None or row["calls"] > previous["calls"]:
                statements[key] = {"calls": row["calls"], "mean_ms": row["mean_exec_time"],
                                   "max_ms": row["max_exec_time"]}
            await connection.execute("SELECT pg_stat_statements_reset($1, $2, $3)",
                                     row["userid"], row["dbid"], row["queryid"])
    return {"produced": producer.produced, "remaining": remaining, **stats,
            "delay_p50_ms": delays[0] * 1000 if delays and delays[0] is not None else None,
            "delay_p99_ms": delays[1] * 1000 if delays and delays[1] is not None else None,
            "statements": statements}


async def soak(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    kinds = worker_kinds()
    url = await server.create(TEMPLATE)
    await run([RUNNER_CLI, "migrate"], env(url), SCRATCH / "logs" / "soak-migrate.log")
    name = fresh_name("soak")
    url = await server.create(name, TEMPLATE)
    await server.drop(TEMPLATE)
    await server.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    admin = await asyncpg.connect(url)
    await admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    settings = {k: await admin.fetchval(f"SHOW {k}") for k in
                ("server_version", "autovacuum_naptime", "autovacuum_vacuum_scale_factor",
                 "autovacuum_vacuum_threshold", "autovacuum_vacuum_cost_delay", "synchronous_commit")}
    reloptions = await admin.fetchval("SELECT reloptions FROM pg_class WHERE relname = 'runner_jobs'")
    worker_env = {"RUNNER_RETENTION": str(args.retention), "RUNNER_CLEANUP_INTERVAL": str(args.cleanup_interval)}
    if args.vacuum_dead_rows is not None:  # else the product's default
        worker_env["RUNNER_VACUUM_DEAD_ROWS"] = str(args.vacuum_dead_rows)
    workers = [Proc([RUNNER_CLI, "worker"], env(url, RUNNER_WORKER_ID=f"bench-soak-{i}", **worker_env),
                    SCRATCH / "logs" / f"soak-worker-{i}.log").start() for i in range(args.workers)]
    producer = Producer(url, args.jobs, args.rate)
    prober = Prober(url, kinds)
    samples: list[dict[str, Any]] = []
    started = time.time()
    try:
        await asyncio.sleep(2.0)  # workers start up (imports, pool, LISTEN)
        for w in workers:
            if not w.running():
                (await w.wait(5)).check()
        await sample(admin, producer, time.time())  # resets the statement entries
        t0 = time.monotonic()
        last_t, last_done, since = 0.0, 0, time.time()
        producing = asyncio.create_task(producer.run())
        probing = asyncio.create_task(prober.run())
        while True:
            await asyncio.sleep(args.interval)
            now_wall = time.time()
            s = await sample(admin, producer, since)
            since = now_wall
            t = time.monotonic() - t0
            done = s["produced"] - s["remaining"]
            probe = prober.take()
            s.update(t_s=t, done=done, jobs_per_s=(done - last_done) / (t - last_t),
                     probe_n=len(probe), probe_p50_ms=percentile(probe, 50), probe_p99_ms=percentile(probe, 99),
                     probe_ms=[round(v, 3) for v in probe])
            samples.append(s)
            claim = s["statements"].get("claim", {})
            log(f"t={t:5.0f}s done {done:,} ({s['jobs_per_s']:,.0f}/s) remaining {s['remaining']:,} "
                f"probe p50/p99 {s['probe_p50_ms']:.2f}/{s['probe_p99_ms']:.2f} ms claim mean "
                f"{claim.get('mean_ms', float('nan')):.2f} ms dead {s['n_dead_tup']:,} "
                f"table {s['table_bytes'] / 2**20:.1f} MiB idx {s['index_bytes'] / 2**20:.1f} MiB "
                f"autovac {s['autovacuum_count']} vacuum {s['vacuum_count']}")
            last_t, last_done = t, done
            for w in workers:
                if not w.running():
                    raise RuntimeError(f"worker {w.argv} exited during the soak")
            if producing.done():
                producing.result()
                if s["remaining"] == 0:
                    break
            if t > args.timeout:
                raise RuntimeError(f"soak did not finish in {args.timeout:g} s")
        probing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probing
    finally:
        for w in workers:
            w.signal(signal.SIGTERM)
        for w in workers:
            with contextlib.suppress(Exception):
                await w.wait(60)
        await admin.close()
        await server.drop(name)
    return {"started": started, "commit": git_commit(), "machine": machine(), "settings": settings,
            "reloptions": reloptions, "jobs": args.jobs, "rate": args.rate, "workers": args.workers,
            "retention_s": args.retention, "cleanup_interval_s": args.cleanup_interval, "interval_s": args.interval,
            "vacuum_dead_rows": args.vacuum_dead_rows,
            "producer_behind_max_s": producer.behind_max_s, "elapsed_s": time.time() - started,
            "samples": samples}


def flatness(values: list[float]) -> dict[str, float]:
    values = [v for v in values if v == v]
    if not values:
        return {"mean": float("nan"), "min": float("nan"), "max": float("nan"), "within": False}
    mean = sum(values) / len(values)
    return {"mean": mean, "min": min(values), "max": max(values),
            "within": bool(mean) and max(values) <= 1.2 * mean and min(values) >= 0.8 * mean}


def report(data: dict[str, Any]) -> list[str]:
    samples = data["samples"]
    # the last half of the steady part: while the producer still produced (the tail drains what is left)
    steady = [s for s in samples if s["produced"] < data["jobs"]] or samples
    half = steady[len(steady) // 2:]
    per_window = max(1, round(WINDOW_S / data["interval_s"]))
    windows = [half[i:i + per_window] for i in range(0, len(half) - per_window + 1, per_window)]
    checks = {
        f"claim p99 (probe, per {WINDOW_S:g} s window)": (
            [percentile([v for s in w for v in s["probe_ms"]], 99) for w in windows], "ms"),
        f"claim p99 (probe, per {data['interval_s']:g} s sample: information)": (
            [s["probe_p99_ms"] for s in half], "ms"),
        "claim mean (workers' CLAIM, pg_stat_statements)": (
            [s["statements"].get("claim", {}).get("mean_ms", float("nan")) for s in half], "ms"),
        "table size": ([s["table_bytes"] / 2**20 for s in half], "MiB"),
        "index size": ([s["index_bytes"] / 2**20 for s in half], "MiB"),
        "jobs/s done": ([s["jobs_per_s"] for s in half], "/s"),
    }
    m, st = data["machine"], data["settings"]
    vacuum = data.get("vacuum_dead_rows")
    vacuum_flag = "" if vacuum is None else f" --vacuum-dead-rows {vacuum}"
    lines = [
        f"# Soak: {data['jobs']:,} no-op jobs at {data['rate']:,}/s into {data['workers']} `runner worker`",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(data['started']))}, runner {data['commit']}; "
        f"command: `python bench/soak.py --jobs {data['jobs']} --rate {data['rate']:g}{vacuum_flag}` "
        f"({data['elapsed_s'] / 60:.1f} min); {m['nproc']} cores ({m['cpu']}), PostgreSQL "
        f"{st['server_version']} embedded on the same host (autovacuum_naptime {st['autovacuum_naptime']}, "
        f"vacuum scale factor {st['autovacuum_vacuum_scale_factor']}, threshold "
        f"{st['autovacuum_vacuum_threshold']}, cost delay {st['autovacuum_vacuum_cost_delay']}); runner_jobs "
        f"reloptions: {data['reloptions'] or 'none'}. RUNNER_RETENTION={data['retention_s']:g}, "
        f"RUNNER_CLEANUP_INTERVAL={data['cleanup_interval_s']:g}; producer at most "
        f"{data['producer_behind_max_s']:.2f} s behind its schedule.",
        "",
        f"## Last half of the steady part ({len(half)} samples, t = {half[0]['t_s']:.0f}-{half[-1]['t_s']:.0f} s)",
        "",
        "| measure | mean | min | max | max/min | within ±20% of the mean |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for label, (values, unit) in checks.items():
        f = flatness(values)
        ratio = f["max"] / f["min"] if f["min"] else float("nan")
        lines.append(f"| {label} | {f['mean']:.2f} {unit} | {f['min']:.2f} | {f['max']:.2f} | {ratio:.2f} "
                     f"| {'yes' if f['within'] else 'no'} |")
    lines += [
        "",
        "## Samples",
        "",
        "| t s | produced | done | jobs/s | pending+running | probe p50 / p99 ms | CLAIM calls / mean / max ms "
        "| COMPLETE mean ms | delay p50 / p99 ms | live | dead | table MiB | index MiB | upd | HOT upd % | del "
        "| autovacuum | worker vacuums | autoanalyze |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | ---: |",
    ]
    for s in samples:
        c, k = s["statements"].get("claim", {}), s["statements"].get("complete", {})
        hot = 100 * s["n_tup_hot_upd"] / s["n_tup_upd"] if s["n_tup_upd"] else float("nan")
        lines.append(
            f"| {s['t_s']:.0f} | {s['produced']:,} | {s['done']:,} | {s['jobs_per_s']:,.0f} | {s['remaining']:,} "
            f"| {s['probe_p50_ms']:.2f} / {s['probe_p99_ms']:.2f} "
            f"| {c.get('calls', 0):,} / {c.get('mean_ms', float('nan')):.2f} / {c.get('max_ms', float('nan')):.1f} "
            f"| {k.get('mean_ms', float('nan')):.2f} "
            f"| {s['delay_p50_ms'] or float('nan'):.1f} / {s['delay_p99_ms'] or float('nan'):.1f} "
            f"| {s['n_live_tup']:,} | {s['n_dead_tup']:,} | {s['table_bytes'] / 2**20:.1f} "
            f"| {s['index_bytes'] / 2**20:.1f} | {s['n_tup_upd']:,} | {hot:.0f}% | {s['n_tup_del']:,} "
            f"| {s['autovacuum_count']} | {s['vacuum_count']} | {s['autoanalyze_count']} |")
    lines += ["", "upd, HOT upd %, del, autovacuum, worker vacuums and autoanalyze are cumulative since the database "
              "was created "
              "(PostgreSQL's statistics reach pg_stat_user_tables with up to a second's delay).", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=2_000.0, help="jobs/s enqueued")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--retention", type=float, default=60.0, help="RUNNER_RETENTION of the workers")
    parser.add_argument("--cleanup-interval", type=float, default=5.0, help="RUNNER_CLEANUP_INTERVAL")
    parser.add_argument("--vacuum-dead-rows", type=int, default=None,
                        help="RUNNER_VACUUM_DEAD_ROWS of the workers (default: runner's; 0: autovacuum only)")
    parser.add_argument("--timeout", type=float, default=4 * 3600.0)
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args()
    server = soak_server()
    try:
        data = asyncio.run(soak(server, args))
    finally:
        server.stop_if_started_here()
    lines = report(data)
    write_report(args.out_dir, "soak", "\n".join(lines), data, raw_only=True)
    print("\n".join(lines[:16]))


if __name__ == "__main__":
    main()
