"""Does history slow the hot path? ``python bench/history.py``.

In one run, side by side, on two fresh databases of one server: ``runner worker --drain`` of N no-op jobs
(default 20,000) on an empty table, and the same with H finished rows (default 2,000,000, status
succeeded, finished_at spread over 7 days: a week of retention of a busy deployment) inserted first by one
INSERT ... SELECT generate_series, then ANALYZE. Rounds alternate empty / history. Reports the drain rate
(jobs/s, whole process, start-up included) and its ratio (target >= 80%), the wall time of ``runner status``
on both (target <= 1.5x), and the plan of every hot statement at H rows (EXPLAIN, one line each: the node
reading runner_jobs and its index). Writes bench/results/history.{md,json}.

Options: ``--jobs``, ``--history``, ``--rounds``, ``--out-dir``, ``--name``. The server is
RUNNER_BENCH_DATABASE_URL, or runner's embedded PostgreSQL under RUNNER_BENCH_HOME (default /tmp/runner-bench).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import asyncpg  # noqa: E402

from bench._common import (  # noqa: E402
    RESULTS,
    RUNNER_CLI,
    SCRATCH,
    Proc,
    Server,
    fresh_name,
    git_commit,
    log,
    machine,
    median,
    run,
    runner_env,
    start_server,
    write_report,
)
from runner import queue_sql as sql  # noqa: E402

TEMPLATE = "bench_tpl_history"

INSERT_HISTORY = """
INSERT INTO runner_jobs (kind, queue, payload, status, attempts, run_at, created_at, started_at, finished_at)
SELECT 'noop', 'default', '{}', 'succeeded', 1, f - interval '2 seconds', f - interval '2 seconds',
       f - interval '1 second', f
FROM (SELECT now() - (g * (7 * 86400.0 / $1)) * interval '1 second' AS f FROM generate_series(1, $1) g) s
"""

# The statements a worker runs per claim, completion, heartbeat, rescue, drain check and depth sample, and
# those `runner status` runs, with arguments as the worker passes them.
HOT = {
    "CLAIM": (sql.CLAIM, [["default"], 200, "w", 30.0, ["noop", "sleep"]]),
    "HEARTBEAT": (sql.HEARTBEAT, [[1, 2, 3], [1, 1, 1], 30.0, "w", "h", 1, "default", 10]),
    "COMPLETE": (sql.COMPLETE, [[1, 2, 3], [1, 1, 1], ["succeeded"] * 3, [None] * 3, [0.0] * 3,
                                [None] * 3]),
    "RESCUE_STALE": (sql.RESCUE_STALE, [3, 100]),
    "RELEASE_OWNED_EXCEPT": (sql.RELEASE_OWNED_EXCEPT, ["w", []]),
    "HAS_RUNNABLE_OR_RUNNING": (sql.HAS_RUNNABLE_OR_RUNNING, [["default"], ["noop", "sleep"]]),
    "COUNT_UNFINISHED_BY_STATUS (depth)": (sql.COUNT_UNFINISHED_BY_STATUS, []),
    "COUNT_RECENT_FINISHED_BY_STATUS (depth)": (sql.COUNT_RECENT_FINISHED_BY_STATUS, [10_000]),
    "COUNT_UNFINISHED_BY_QUEUE (status)": (sql.COUNT_UNFINISHED_BY_QUEUE, []),
    "COUNT_RECENT_FINISHED_BY_QUEUE (status)": (sql.COUNT_RECENT_FINISHED_BY_QUEUE, [10_000]),
    "RUNNING_JOBS (status)": (sql.RUNNING_JOBS, [50]),
    "COUNT_BY_STATUS (before: the old depth sampler)": (sql.COUNT_BY_STATUS, []),
}


def env(url: str) -> dict[str, str]:
    return runner_env(url)


def plan_line(plan: dict[str, Any]) -> str:
    """The nodes that read runner_jobs (node type, index), outermost first, and the execution time."""
    found: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        if node.get("Relation Name") == "runner_jobs":
            index = node.get("Index Name")
            found.append(f"{node['Node Type']}" + (f" using {index}" if index else ""))
        for child in node.get("Plans", []):
            walk(child)

    walk(plan["Plan"])
    return "; ".join(dict.fromkeys(found)) or "(no scan of runner_jobs)"


async def explain_all(url: str) -> dict[str, dict[str, Any]]:
    """EXPLAIN ANALYZE of each hot statement in a transaction rolled back (writes change nothing)."""
    connection = await asyncpg.connect(url)
    out: dict[str, dict[str, Any]] = {}
    try:
        for name, (statement, args) in HOT.items():
            transaction = connection.transaction()
            await transaction.start()
            try:
                raw = await connection.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", *args)
            finally:
                await transaction.rollback()
            plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]
            out[name] = {"plan": plan_line(plan), "ms": round(plan["Execution Time"], 3)}
    finally:
        await connection.close()
    return out


async def fill(url: str, history: int) -> float:
    connection = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        if history:
            await connection.execute(INSERT_HISTORY, history)
            await connection.execute("ANALYZE runner_jobs")
        return time.perf_counter() - started
    finally:
        await connection.close()


async def one(server: Server, label: str, jobs: int, history: int, work: Path, explain: bool) -> dict[str, Any]:
    name = fresh_name(f"history_{label}")
    url = await server.create(name, TEMPLATE)
    try:
        fill_s = await fill(url, history)
        jsonl = work / f"noop-{jobs}.jsonl"
        jsonl.write_text("{}\n" * jobs)
        await run([RUNNER_CLI, "enqueue", "noop", "--jsonl", str(jsonl)], env(url), work / f"{label}-enqueue.log")
        plans = await explain_all(url) if explain else {}
        drained = (await Proc([str(RUNNER_CLI), "worker", "--drain"], env(url), work / f"{label}-drain.log")
                   .start().wait(timeout_s=900)).check()
        connection = await asyncpg.connect(url)
        try:
            left = await connection.fetchval("SELECT count(*) FROM runner_jobs WHERE status <> 'succeeded'")
        finally:
            await connection.close()
        status_s = []
        for i in range(3):
            result = await run([RUNNER_CLI, "status", "--json"], env(url), work / f"{label}-status-{i}.log")
            status_s.append(result.wall_s)
        estimated = json.loads(result.output.strip().splitlines()[-1]).get("estimated")
        return {"label": label, "history": history, "jobs": jobs, "fill_s": round(fill_s, 1),
                "drain_s": drained.wall_s, "drain_jobs_per_s": jobs / drained.wall_s, "not_succeeded": left,
                "status_s": median(status_s), "status_runs_s": status_s, "status_estimated": estimated,
                "plans": plans}
    finally:
        await server.drop(name)


def report(config: dict[str, Any], rounds: list[tuple[dict[str, Any], dict[str, Any]]], command: str) -> str:
    drain_ratios = [h["drain_jobs_per_s"] / e["drain_jobs_per_s"] for e, h in rounds]
    status_ratios = [h["status_s"] / e["status_s"] for e, h in rounds]
    lines = [
        "# History: does a week of finished jobs slow the hot path?",
        "",
        f"`{command}` — commit {config['commit']}, {config['machine']['nproc']} CPUs, PostgreSQL "
        f"{config['server_version']} on the same host. {config['jobs']:,} no-op jobs drained by one "
        f"`runner worker --drain` (whole process, start-up included), on an empty table and with "
        f"{config['history']:,} finished rows (succeeded, finished_at over 7 days, one INSERT ... SELECT "
        "generate_series, then ANALYZE) inserted first; rounds alternate.",
        "",
        "| round | drain jobs/s, empty | drain jobs/s, history | ratio | `runner status` s, empty "
        "| `runner status` s, history | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for i, ((e, h), dr, sr) in enumerate(zip(rounds, drain_ratios, status_ratios, strict=True), 1):
        lines.append(f"| {i} | {e['drain_jobs_per_s']:,.0f} | {h['drain_jobs_per_s']:,.0f} | {dr:.0%} "
                     f"| {e['status_s']:.3f} | {h['status_s']:.3f} | {sr:.2f}x |")
    dr, sr = median(drain_ratios), median(status_ratios)
    lines += [
        "",
        f"- Drain with history: **{dr:.0%}** of the empty-table rate (median of rounds; target >= 80%): "
        f"{'met' if dr >= 0.8 else 'NOT met'}.",
        f"- `runner status`: **{sr:.2f}x** its empty-table wall time (median; target <= 1.5x): "
        f"{'met' if sr <= 1.5 else 'NOT met'}. With history its finished counts are estimates "
        f"(`status --json` \"estimated\": {rounds[-1][1]['status_estimated']}).",
        "",
        f"## Plans at {config['history']:,} finished rows + {config['jobs']:,} pending",
        "",
        "EXPLAIN ANALYZE of each statement (writes rolled back), as the worker or `runner status` runs it: the "
        "nodes that read runner_jobs.",
        "",
        "| statement | plan on runner_jobs | ms |",
        "|---|---|---:|",
    ]
    for name, row in rounds[0][1]["plans"].items():
        lines.append(f"| {name} | {row['plan']} | {row['ms']:.3f} |")
    lines.append("")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--history", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--name", default="history", help="file stem under --out-dir")
    args = parser.parse_args()
    command = "python bench/history.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if v != parser.get_default(k) and k not in ("out_dir",))
    server = start_server()
    work = SCRATCH / "history"
    work.mkdir(parents=True, exist_ok=True)
    try:
        url = await server.create(TEMPLATE)
        await run([RUNNER_CLI, "migrate"], env(url), work / "migrate.log")
        rounds = []
        for i in range(args.rounds):
            log(f"round {i + 1}: empty table")
            empty = await one(server, "empty", args.jobs, 0, work, explain=False)
            log(f"round {i + 1}: {args.history:,} finished rows")
            history = await one(server, "history", args.jobs, args.history, work, explain=i == 0)
            log(f"  drain {empty['drain_jobs_per_s']:,.0f} vs {history['drain_jobs_per_s']:,.0f} jobs/s, "
                f"status {empty['status_s']:.3f} vs {history['status_s']:.3f} s")
            rounds.append((empty, history))
        described = await server.describe()
        config = {"jobs": args.jobs, "history": args.history, "rounds": args.rounds, "commit": git_commit(),
                  "machine": machine(), **described}
        text = report(config, rounds, command)
        write_report(args.out_dir, args.name, text, {"config": config, "rounds": rounds})
        print(text)
    finally:
        await server.drop(TEMPLATE)
        server.stop_if_started_here()


if __name__ == "__main__":
    asyncio.run(main())
