"""Dashboard page times at a million jobs (not a test): ``python bench/dashboard.py [--jobs 1000000]``.

One fresh database (RUNNER_BENCH_DATABASE_URL's server, or the embedded PostgreSQL under RUNNER_BENCH_HOME,
default /tmp/runner-bench) gets --jobs finished jobs (finished_at over 7 days, 1% failed with an error, 0.4%
cancelled; one INSERT ... SELECT generate_series), 5,000 pending and 100 running ones, 4 workers, then
ANALYZE. The dashboard runs in-process on a real port (aiohttp) and each page and JSON route is fetched
--requests times after two warm-ups; the time is the request's round trip on localhost (server time plus a
local hop). Target: the overview and the job list at most 200 ms each (median). Also the plan of each
dashboard statement (EXPLAIN ANALYZE: the nodes that read runner_jobs). Writes bench/results/dashboard-1m.md
and .json (--name).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import asyncpg  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from bench._common import (  # noqa: E402
    RESULTS,
    RUNNER_CLI,
    SCRATCH,
    base_env,
    fresh_name,
    git_commit,
    log,
    machine,
    median,
    percentile,
    run,
    start_server,
    write_report,
)
from runner import queue_sql as sql  # noqa: E402
from runner.app import App  # noqa: E402
from runner.config import load_settings  # noqa: E402
from runner.dashboard import Auth, build  # noqa: E402
from runner.dashboard.data import SEARCH_WINDOW  # noqa: E402

TARGET_MS = 200.0
INSERT_FINISHED = """
INSERT INTO runner_jobs (kind, queue, payload, status, attempts, run_at, created_at, started_at, finished_at,
                         last_error)
SELECT CASE WHEN g % 10 = 0 THEN 'sleep' ELSE 'noop' END, CASE WHEN g % 3 = 0 THEN 'bulk' ELSE 'default' END,
       '{"n": 1}', CASE WHEN g % 100 = 0 THEN 'failed' WHEN g % 250 = 0 THEN 'cancelled' ELSE 'succeeded' END,
       1, f - interval '2 seconds', f - interval '2 seconds', f - interval '1 second', f,
       CASE WHEN g % 100 = 0 THEN 'RuntimeError: boom ' || g END
FROM (SELECT g, now() - (($1 - g) * (7 * 86400.0 / $1)) * interval '1 second' AS f
      FROM generate_series(1, $1) g) s
"""
INSERT_LIVE = """
INSERT INTO runner_jobs (kind, queue, payload, status, lease_owner, lease_epoch, lease_expires_at, started_at,
                         progress_done, progress_total)
SELECT 'noop', 'default', '{}', CASE WHEN g <= 100 THEN 'running' ELSE 'pending' END,
       CASE WHEN g <= 100 THEN 'bench-worker-' || (g % 4) END, 1,
       CASE WHEN g <= 100 THEN now() + interval '1 hour' END, CASE WHEN g <= 100 THEN now() - interval '1 minute' END,
       g, 1000
FROM generate_series(1, 5100) g
"""
INSERT_WORKERS = """
INSERT INTO runner_workers (id, host, pid, queues, concurrency)
SELECT 'bench-worker-' || g, 'host-' || g, 1000 + g, 'default,bulk', 200 FROM generate_series(0, 3) g
"""
# A search no index serves (kind, finished status, error text) looks at 100,000 ids a page: "no-such-text"
# and kind=backfill (none) are its worst case, a whole window read.
ROUTES = ("/", "/api/overview", "/jobs", "/api/jobs", "/jobs?status=failed", "/jobs?status=cancelled",
          "/jobs?kind=sleep&queue=bulk", "/jobs?kind=backfill", "/jobs?error=boom", "/jobs?error=no-such-text",
          "/jobs?status=running", "/jobs/{id}", "/backfills", "/schedules", "/consensus")
WINDOW = "window"  # replaced by the lowest id of the newest SEARCH_WINDOW, as the dashboard computes it
PLANS: dict[str, tuple[str, list[Any]]] = {
    "DASH_THROUGHPUT": (sql.DASH_THROUGHPUT, []),
    "DASH_WORKERS": (sql.DASH_WORKERS, []),
    "DASH_RECENT_JOBS": (sql.DASH_RECENT_JOBS, [15]),
    "DASH_LIST_JOBS (no filter)": (sql.DASH_LIST_JOBS, [[], [], [], 51, None, None, None]),
    "DASH_LIST_JOBS (status failed)": (sql.DASH_LIST_JOBS, [["failed"], [], [], 51, None, None, WINDOW]),
    "DASH_LIST_JOBS (error text, a window)": (sql.DASH_LIST_JOBS, [[], [], [], 51, None, "no-such-text", WINDOW]),
    "DASH_LIST_JOBS (kind, a window)": (sql.DASH_LIST_JOBS, [[], ["backfill"], [], 51, None, None, WINDOW]),
    "DASH_LIST_JOBS (running)": (sql.DASH_LIST_JOBS, [["running"], [], [], 51, None, None, None]),
    "DASH_UNFINISHED_OF_KINDS": (sql.DASH_UNFINISHED_OF_KINDS, [["backfill"], 100]),
    "DASH_RECENT_FINISHED_OF_KINDS": (sql.DASH_RECENT_FINISHED_OF_KINDS, [["backfill"], 10_000, 20]),
    "COUNT_UNFINISHED_BY_QUEUE": (sql.COUNT_UNFINISHED_BY_QUEUE, []),
    "COUNT_RECENT_FINISHED_BY_QUEUE": (sql.COUNT_RECENT_FINISHED_BY_QUEUE, [10_000]),
}


def plan_line(plan: dict[str, Any]) -> str:
    found: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        if node.get("Relation Name") == "runner_jobs":
            index = node.get("Index Name")
            found.append(f"{node['Node Type']}" + (f" using {index}" if index else ""))
        for child in node.get("Plans", []):
            walk(child)

    walk(plan["Plan"])
    return "; ".join(dict.fromkeys(found)) or "(no scan of runner_jobs)"


async def fill(url: str, jobs: int) -> float:
    connection = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        await connection.execute(INSERT_FINISHED, jobs)
        await connection.execute(INSERT_LIVE)
        await connection.execute(INSERT_WORKERS)
        await connection.execute("ANALYZE runner_jobs")
        return time.perf_counter() - started
    finally:
        await connection.close()


async def plans(url: str) -> dict[str, dict[str, Any]]:
    connection = await asyncpg.connect(url)
    out: dict[str, dict[str, Any]] = {}
    try:
        floor = max(1, int(await connection.fetchval(sql.DASH_MAX_JOB_ID)) + 1 - SEARCH_WINDOW)
        for name, (statement, template) in PLANS.items():
            args = [floor if arg == WINDOW else arg for arg in template]
            raw = await connection.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", *args)
            plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]
            out[name] = {"plan": plan_line(plan), "ms": round(plan["Execution Time"], 3)}
    finally:
        await connection.close()
    return out


async def time_routes(url: str, requests: int, job_id: int) -> dict[str, dict[str, Any]]:
    os.environ["RUNNER_DATABASE_URL"] = url
    os.environ.setdefault("RUNNER_HOME", str(SCRATCH / "runner-home"))
    app = await App.open(load_settings())
    client: TestClient[Any, Any] = TestClient(TestServer(build(app, Auth())))
    await client.start_server()
    out: dict[str, dict[str, Any]] = {}
    try:
        for route in ROUTES:
            path = route.replace("{id}", str(job_id))
            times = []
            for i in range(requests + 2):
                started = time.perf_counter()
                response = await client.get(path)
                await response.read()
                elapsed = (time.perf_counter() - started) * 1000
                if response.status != 200:
                    raise RuntimeError(f"{path}: HTTP {response.status}")
                if i >= 2:
                    times.append(elapsed)
            out[route] = {"median_ms": round(median(times), 1), "p95_ms": round(percentile(times, 95), 1)}
            log(f"  {route}: {out[route]['median_ms']} ms median")
    finally:
        await client.close()
        await app.close()
    return out


def report(config: dict[str, Any], routes: dict[str, dict[str, Any]], plan: dict[str, dict[str, Any]],
           command: str) -> str:
    lines = [
        f"# Dashboard page times at {config['jobs']:,} jobs",
        "",
        f"`{command}` — commit {config['commit']}, {config['machine']['nproc']} CPUs, PostgreSQL "
        f"{config['server_version']} on the same host. {config['jobs']:,} finished jobs (7 days, 1% failed, "
        "0.4% cancelled), 5,000 pending, 100 running, 4 workers; ANALYZE after the fill. Round trip on "
        f"localhost of {config['requests']} requests per route after two warm-ups.",
        "",
        "| route | median ms | p95 ms |",
        "|---|---:|---:|",
    ]
    lines += [f"| `{route}` | {row['median_ms']:.1f} | {row['p95_ms']:.1f} |" for route, row in routes.items()]
    overview, listing = routes["/"]["median_ms"], routes["/jobs"]["median_ms"]
    met = overview <= TARGET_MS and listing <= TARGET_MS
    lines += [
        "",
        f"- Overview {overview:.1f} ms, job list {listing:.1f} ms (median; target <= {TARGET_MS:.0f} ms each): "
        f"{'met' if met else 'NOT met'}.",
        "",
        "## Plans",
        "",
        "| statement | plan on runner_jobs | ms |",
        "|---|---|---:|",
    ]
    lines += [f"| {name} | {row['plan']} | {row['ms']:.3f} |" for name, row in plan.items()]
    lines.append("")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--name", default="dashboard-1m", help="file stem under --out-dir")
    args = parser.parse_args()
    command = "python bench/dashboard.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if v != parser.get_default(k) and k not in ("out_dir",))
    server = start_server()
    work = SCRATCH / "dashboard"
    work.mkdir(parents=True, exist_ok=True)
    name = fresh_name("dashboard")
    try:
        url = await server.create(name)
        env = base_env(RUNNER_DATABASE_URL=url, RUNNER_HOME=str(SCRATCH / "runner-home"))
        await run([RUNNER_CLI, "migrate"], env, work / "migrate.log")
        log(f"filling {args.jobs:,} jobs")
        fill_s = await fill(url, args.jobs)
        log(f"  {fill_s:.1f} s")
        connection = await asyncpg.connect(url)
        try:
            job_id = int(await connection.fetchval("SELECT id FROM runner_jobs WHERE status = 'failed' LIMIT 1"))
        finally:
            await connection.close()
        plan = await plans(url)
        routes = await time_routes(url, args.requests, job_id)
        config = {"jobs": args.jobs, "requests": args.requests, "fill_s": round(fill_s, 1), "commit": git_commit(),
                  "machine": machine(), **(await server.describe())}
        text = report(config, routes, plan, command)
        write_report(args.out_dir, args.name, text, {"config": config, "routes": routes, "plans": plan})
        print(text)
    finally:
        await server.drop(name)
        server.stop_if_started_here()


if __name__ == "__main__":
    asyncio.run(main())
