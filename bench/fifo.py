"""What does the keyed FIFO lock (``fifo_key``) cost? ``python bench/fifo.py``.

In one run, side by side, rounds alternating, each case on a fresh database of one server:

- drain: ``runner worker --drain`` (default settings, whole process, start-up included) of N no-op jobs
  (default 20,000) without keys, then the same N spread over K keys (default 200; ``fifo_key`` =
  ``k<i mod K>``): at most K run at once, one per key. Reports jobs/s and the keyed/plain ratio.
- claim: the claim statement itself (EXPLAIN ANALYZE, rolled back; median of 20) taking 200 of N pending
  unkeyed jobs, without and with B (default 10,000) keyed jobs of one key ahead of them in claim order
  (higher priority) whose head is running elsewhere, or waits out a retry's backoff, so every claim walks
  past all B: the worst case, a backlog stuck behind one key. Reports milliseconds per claim and their ratio.

Writes bench/results/fifo.{md,json}. The server is RUNNER_BENCH_DATABASE_URL, or runner's embedded
PostgreSQL under RUNNER_BENCH_HOME (default /tmp/runner-bench).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
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

TEMPLATE = "bench_tpl_fifo"
# $1 jobs; $2 keys (0: none). Inserted in one statement: enqueueing is not what is measured here.
INSERT_PENDING = """
INSERT INTO runner_jobs (kind, queue, payload, priority, fifo_key)
SELECT 'noop', 'default', '{}', $3, CASE WHEN $2 > 0 THEN 'k' || (g % $2) END FROM generate_series(1, $1) g
"""
# The stuck key's head: running under a lease nobody lets go of during the run, or waiting out a retry's
# backoff (pending, run_at a day away).
STUCK_HEADS = {
    "running": """
INSERT INTO runner_jobs (kind, queue, payload, priority, fifo_key, status, lease_owner, lease_expires_at,
                         lease_epoch, started_at)
VALUES ('noop', 'default', '{}', 1, 'k0', 'running', 'elsewhere', now() + interval '1 day', 1, now())
""",
    "backoff": """
INSERT INTO runner_jobs (kind, queue, payload, priority, fifo_key, run_at, attempts)
VALUES ('noop', 'default', '{}', 1, 'k0', now() + interval '1 day', 1)
""",
}
CLAIM_ARGS = [["default"], 200, "w", 30.0, ["noop"]]


def env(url: str) -> dict[str, str]:
    return runner_env(url)


async def execute(url: str, *statements: tuple[str, list[Any]]) -> None:
    connection = await asyncpg.connect(url)
    try:
        for statement, args in statements:
            await connection.execute(statement, *args)
        await connection.execute("ANALYZE runner_jobs")
    finally:
        await connection.close()


async def drain(server: Server, label: str, jobs: int, keys: int, work: Path) -> dict[str, Any]:
    name = fresh_name(f"fifo_{label}")
    url = await server.create(name, TEMPLATE)
    try:
        await execute(url, (INSERT_PENDING, [jobs, keys, 0]))
        done = (await Proc([str(RUNNER_CLI), "worker", "--drain"], env(url), work / f"{label}-drain.log")
                .start().wait(timeout_s=900)).check()
        connection = await asyncpg.connect(url)
        try:
            left = await connection.fetchval("SELECT count(*) FROM runner_jobs WHERE status <> 'succeeded'")
        finally:
            await connection.close()
        return {"label": label, "jobs": jobs, "keys": keys, "drain_s": done.wall_s,
                "jobs_per_s": jobs / done.wall_s, "not_succeeded": left}
    finally:
        await server.drop(name)


async def claim_ms(server: Server, label: str, jobs: int, blocked: int, head: str = "running",
                   samples: int = 20) -> dict[str, Any]:
    name = fresh_name(f"fifo_{label}")
    url = await server.create(name, TEMPLATE)
    try:
        statements = [(INSERT_PENDING, [jobs, 0, 0])]
        if blocked:
            statements += [(STUCK_HEADS[head], []), (INSERT_PENDING, [blocked, 1, 1])]
        await execute(url, *statements)
        connection = await asyncpg.connect(url)
        times, claimed = [], 0
        try:
            for _ in range(samples):
                transaction = connection.transaction()
                await transaction.start()
                try:
                    raw = await connection.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql.CLAIM}", *CLAIM_ARGS)
                    claimed = await connection.fetchval(
                        "SELECT count(*) FROM runner_jobs WHERE status = 'running' AND lease_owner = 'w'")
                finally:
                    await transaction.rollback()
                plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]
                times.append(plan["Execution Time"])
        finally:
            await connection.close()
        return {"label": label, "pending": jobs, "blocked": blocked, "head": head, "claimed": claimed,
                "ms": median(times),
                "samples_ms": times}
    finally:
        await server.drop(name)


def report(config: dict[str, Any], rounds: list[dict[str, Any]], command: str) -> str:
    drain_ratios = [r["keyed"]["jobs_per_s"] / r["plain"]["jobs_per_s"] for r in rounds]
    claim_ratios = [r["claim_blocked"]["ms"] / r["claim_plain"]["ms"] for r in rounds]
    backoff_ratios = [r["claim_backoff"]["ms"] / r["claim_plain"]["ms"] for r in rounds]
    lines = [
        "# The keyed FIFO lock: what it costs",
        "",
        f"`{command}` — commit {config['commit']}, {config['machine']['nproc']} CPUs, PostgreSQL "
        f"{config['server_version']} on the same host; rounds alternate, each case on a fresh database.",
        "",
        f"Drain: {config['jobs']:,} no-op jobs, one `runner worker --drain` (default settings, whole process), "
        f"without keys and spread over {config['keys']} keys. Claim: EXPLAIN ANALYZE of the claim (200 of "
        f"{config['jobs']:,} pending, median of 20, rolled back) without and with {config['blocked']:,} keyed "
        "jobs of one key ahead of them in claim order whose head runs elsewhere, or waits out a retry's backoff.",
        "",
        "| round | drain jobs/s, no keys | drain jobs/s, keyed | ratio | claim ms, no keys "
        "| claim ms, behind a running head | ratio | claim ms, behind a head in backoff | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, (r, dr, cr, br) in enumerate(zip(rounds, drain_ratios, claim_ratios, backoff_ratios, strict=True), 1):
        lines.append(f"| {i} | {r['plain']['jobs_per_s']:,.0f} | {r['keyed']['jobs_per_s']:,.0f} | {dr:.0%} "
                     f"| {r['claim_plain']['ms']:.2f} | {r['claim_blocked']['ms']:.2f} | {cr:.1f}x "
                     f"| {r['claim_backoff']['ms']:.2f} | {br:.1f}x |")
    lines += [
        "",
        f"- Keyed drain: **{median(drain_ratios):.0%}** of the unkeyed rate (median of rounds).",
        f"- A claim walking past {config['blocked']:,} blocked keyed jobs: **{median(claim_ratios):.1f}x** the "
        f"unkeyed claim (median), {median([r['claim_blocked']['ms'] for r in rounds]):.1f} ms; it still took "
        f"{rounds[-1]['claim_blocked']['claimed']} jobs. Behind a head in backoff: **{median(backoff_ratios):.1f}x**, "
        f"{median([r['claim_backoff']['ms'] for r in rounds]):.1f} ms (each blocked row then looks up its key's "
        "first pending id).",
        "",
    ]
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--blocked", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--name", default="fifo", help="file stem under --out-dir")
    args = parser.parse_args()
    command = "python bench/fifo.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if v != parser.get_default(k) and k not in ("out_dir",))
    server = start_server()
    work = SCRATCH / "fifo"
    work.mkdir(parents=True, exist_ok=True)
    try:
        url = await server.create(TEMPLATE)
        await run([str(RUNNER_CLI), "migrate"], env(url), work / "migrate.log")
        rounds = []
        for i in range(args.rounds):
            one = {"plain": await drain(server, "plain", args.jobs, 0, work),
                   "keyed": await drain(server, "keyed", args.jobs, args.keys, work),
                   "claim_plain": await claim_ms(server, "claim_plain", args.jobs, 0),
                   "claim_blocked": await claim_ms(server, "claim_blocked", args.jobs, args.blocked),
                   "claim_backoff": await claim_ms(server, "claim_backoff", args.jobs, args.blocked, "backoff")}
            log(f"round {i + 1}: drain {one['plain']['jobs_per_s']:,.0f} vs {one['keyed']['jobs_per_s']:,.0f} "
                f"jobs/s; claim {one['claim_plain']['ms']:.2f} vs {one['claim_blocked']['ms']:.2f} "
                f"/ {one['claim_backoff']['ms']:.2f} ms")
            rounds.append(one)
        config = {"jobs": args.jobs, "keys": args.keys, "blocked": args.blocked, "rounds": args.rounds,
                  "commit": git_commit(), "machine": machine(), **(await server.describe())}
        text = report(config, rounds, command)
        write_report(args.out_dir, args.name, text, {"config": config, "rounds": rounds})
        print(text)
    finally:
        await server.drop(TEMPLATE)
        server.stop_if_started_here()


if __name__ == "__main__":
    asyncio.run(main())
