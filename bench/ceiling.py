"""The SQL ceiling of runner's own CLAIM and COMPLETE, beside runner's drain: ``python bench/ceiling.py``.

Per round, on fresh databases cloned from one migrated template, each with the same N pre-enqueued no-op
jobs (runner's ENQUEUE, in batches):

- **ceiling**: runner.queue_sql.CLAIM and COMPLETE with the parameters the worker passes (queues
  ``['default']``, limit ``min(free, claim_batch_size=200)`` with ``concurrency=200`` slots, lease 30 s,
  the registry's kinds; COMPLETE with up to 1,000 outcomes ``succeeded`` / result ``null``), driven by two
  asyncpg connections in a tight loop: one claims, one completes what was claimed. No handler, no
  heartbeat, no logging, no flush delay.
- **runner**: ``runner worker --drain`` as shipped (consensus loops off, as in bench/queue.py), timed as
  a whole process, and its loop alone: first ``started_at`` to last ``finished_at`` in the table.

- **uncapped ceiling** (information): the same two connections without the 200-slot cap, so CLAIM runs
  back to back while COMPLETE writes the previous batches (what two connections can do at most).

The ceiling is timed the same two ways (client clock, and first started_at to last finished_at), so the
loop ratio compares like with like. Rounds alternate the order; medians are reported.

Runs its own embedded PostgreSQL in RUNNER_BENCH_HOME/ceiling (default /tmp/runner-bench/ceiling), or on
RUNNER_BENCH_DATABASE_URL. Writes bench/results/ceiling.md (raw figures: RUNNER_BENCH_HOME/scratch/work/ceiling.json).
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import os  # noqa: E402
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
    cpu_busy_s,
    fresh_name,
    git_commit,
    log,
    log_event_times,
    machine,
    median,
    run,
    runner_env,
    server_cpu_s,
    start_server,
    wait_for_quiet,
    write_report,
)
from runner import queue_sql as sql  # noqa: E402
from runner.embedded import EmbeddedPostgres  # noqa: E402
from runner.loops.completer import MAX_BATCH  # noqa: E402

TEMPLATE = "bench_ceiling_tpl"
QUEUES = ["default"]
CONCURRENCY = 200  # Settings.concurrency default
CLAIM_BATCH = 200  # Settings.claim_batch_size default
LEASE_S = 30.0  # Settings.lease_timeout default
ENQUEUE_BATCH = 5_000


def own_server() -> Server:
    if os.environ.get("RUNNER_BENCH_DATABASE_URL"):
        return start_server()
    embedded = EmbeddedPostgres(DEFAULT_HOME / "ceiling")
    was_running = embedded.is_running() if (embedded.data_dir / "PG_VERSION").exists() else False
    embedded.ensure_started()
    return Server(embedded.url("postgres"), embedded, started_here=not was_running)


def env(url: str, **extra: str) -> dict[str, str]:
    return runner_env(url, **extra)


def worker_kinds() -> list[str]:
    """The kinds a default `runner worker` claims (Fetcher passes sorted(registry.kinds))."""
    from runner.plugins import build_registry, load_plugins

    return sorted(build_registry(load_plugins()).kinds)


async def enqueue(url: str, n: int) -> float:
    """N no-op jobs through runner's ENQUEUE, ENQUEUE_BATCH per statement (as `runner enqueue` does)."""
    connection = await asyncpg.connect(url)
    started = time.perf_counter()
    try:
        for offset in range(0, n, ENQUEUE_BATCH):
            k = min(ENQUEUE_BATCH, n - offset)
            await connection.fetch(sql.ENQUEUE, ["noop"] * k, QUEUES * k, ["{}"] * k, [0] * k, [0.0] * k,
                                   [5] * k, [None] * k)
    finally:
        await connection.close()
    return time.perf_counter() - started


async def table_window(url: str) -> dict[str, Any]:
    connection = await asyncpg.connect(url)
    try:
        row = await connection.fetchrow(
            """SELECT count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
                      count(*) FILTER (WHERE status IN ('pending', 'running')) AS remaining,
                      extract(epoch FROM max(finished_at) - min(started_at)) AS loop_s
               FROM runner_jobs""")
    finally:
        await connection.close()
    assert row is not None
    return dict(row)


async def ceiling(url: str, n: int, kinds: list[str], capped: bool = True) -> dict[str, Any]:
    claimer = await asyncpg.connect(url)
    completer = await asyncpg.connect(url)
    claimed: asyncio.Queue[list[tuple[int, int]]] = asyncio.Queue()
    outstanding = 0
    slot_freed = asyncio.Event()
    done = 0
    claims = completes = 0

    async def claim_loop() -> None:
        nonlocal outstanding, claims
        while True:
            room = CONCURRENCY - outstanding if capped else CLAIM_BATCH
            if room <= 0:
                slot_freed.clear()
                await slot_freed.wait()
                continue
            rows = await claimer.fetch(sql.CLAIM, QUEUES, min(room, CLAIM_BATCH), "bench-ceiling", LEASE_S, kinds)
            claims += 1
            if not rows:
                if done + outstanding >= n:
                    return
                await asyncio.sleep(0)
                continue
            outstanding += len(rows)
            claimed.put_nowait([(r[0], r[7]) for r in rows])  # (id, lease_epoch)

    async def complete_loop() -> None:
        nonlocal outstanding, done, completes
        while done < n:
            batch = await claimed.get()
            while not claimed.empty() and len(batch) < MAX_BATCH:
                batch += claimed.get_nowait()
            k = len(batch)
            rows = await completer.fetch(sql.COMPLETE, [b[0] for b in batch], [b[1] for b in batch],
                                         ["succeeded"] * k, [None] * k, [0.0] * k, ["null"] * k)
            completes += 1
            if len(rows) != k or any(r["busy"] for r in rows):
                raise RuntimeError(f"COMPLETE wrote {len(rows)} of {k}")
            outstanding -= k
            done += k
            slot_freed.set()

    started = time.perf_counter()
    try:
        await asyncio.gather(claim_loop(), complete_loop())
    finally:
        await claimer.close()
        await completer.close()
    wall = time.perf_counter() - started
    return {"client_s": wall, "claims": claims, "completes": completes}


async def measure_ceiling(server: Server, n: int, kinds: list[str], capped: bool = True) -> dict[str, Any]:
    name = fresh_name("ceiling")
    url = await server.create(name, TEMPLATE)
    try:
        enqueue_s = await enqueue(url, n)
        server0 = server_cpu_s(server)
        busy0 = cpu_busy_s()
        result = await ceiling(url, n, kinds, capped)
        busy = cpu_busy_s() - busy0
        server1 = server_cpu_s(server)
        window = await table_window(url)
    finally:
        await server.drop(name)
    if window["succeeded"] != n or window["remaining"]:
        raise RuntimeError(f"ceiling: {window['succeeded']} of {n} succeeded")
    loop_s = float(window["loop_s"])
    return {"jobs": n, "enqueue_s": enqueue_s, **result, "loop_s": loop_s,
            "client_jobs_per_s": n / result["client_s"], "loop_jobs_per_s": n / loop_s,
            "server_cpu_s": (server1 - server0) if server0 is not None and server1 is not None else None,
            "machine_busy_cpu_s": busy}


async def measure_runner(server: Server, n: int, round_: int) -> dict[str, Any]:
    name = fresh_name("ceiling_runner")
    url = await server.create(name, TEMPLATE)
    try:
        enqueue_s = await enqueue(url, n)
        busy0, server0 = cpu_busy_s(), server_cpu_s(server)
        proc = Proc([RUNNER_CLI, "worker", "--drain"], env(url, RUNNER_WORKER_ID=f"bench-ceiling-{round_}"),
                    SCRATCH / "logs" / f"ceiling-runner-r{round_}.log")
        result = (await proc.start().wait(timeout_s=1800)).check()
        busy = cpu_busy_s() - busy0
        await asyncio.sleep(0.2)
        server1 = server_cpu_s(server)
        window = await table_window(url)
    finally:
        await server.drop(name)
    if window["succeeded"] != n or window["remaining"]:
        raise RuntimeError(f"runner: {window['succeeded']} of {n} succeeded")
    loop_s = float(window["loop_s"])
    times = log_event_times(result.output, "worker starting", "stopping: no new claims")
    startup_s = times["worker starting"] - proc.started_wall if "worker starting" in times else None
    # bench/queue.py's loop: the log's "worker starting" to "stopping: no new claims" (pool open included)
    log_loop_s = (times["stopping: no new claims"] - times["worker starting"]) if len(times) == 2 else None
    return {"jobs": n, "enqueue_s": enqueue_s, "wall_s": result.wall_s, "loop_s": loop_s,
            "whole_jobs_per_s": n / result.wall_s, "loop_jobs_per_s": n / loop_s, "startup_s": startup_s,
            "log_loop_jobs_per_s": n / log_loop_s if log_loop_s else None,
            "worker_cpu_s": result.user_s + result.sys_s,
            "server_cpu_s": (server1 - server0) if server0 is not None and server1 is not None else None,
            "machine_busy_cpu_s": busy, "maxrss_mib": result.maxrss_mib}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    server = own_server()
    started = time.time()
    kinds = worker_kinds()
    rounds: list[dict[str, Any]] = []
    try:
        url = await server.create(TEMPLATE)
        await run([RUNNER_CLI, "migrate"], env(url), SCRATCH / "logs" / "ceiling-migrate.log")
        described = await server.describe()
        for round_ in range(args.rounds):
            entry: dict[str, Any] = {}
            order = ["ceiling", "runner", "uncapped"] if round_ % 2 == 0 else ["runner", "ceiling", "uncapped"]
            for what in order:
                entry[f"{what}_background_cores"] = await wait_for_quiet(args.quiet_cores, args.quiet_wait)
                if what == "ceiling":
                    entry["ceiling"] = await measure_ceiling(server, args.jobs, kinds)
                elif what == "uncapped":
                    entry["uncapped"] = await measure_ceiling(server, args.jobs, kinds, capped=False)
                else:
                    entry["runner"] = await measure_runner(server, args.jobs, round_)
            c, r = entry["ceiling"], entry["runner"]
            entry["loop_vs_ceiling"] = r["loop_jobs_per_s"] / c["loop_jobs_per_s"]
            entry["whole_vs_ceiling"] = r["whole_jobs_per_s"] / c["loop_jobs_per_s"]
            entry["loop_vs_uncapped"] = r["loop_jobs_per_s"] / entry["uncapped"]["loop_jobs_per_s"]
            log(f"round {round_ + 1}: ceiling {c['loop_jobs_per_s']:,.0f} jobs/s "
                f"(client {c['client_jobs_per_s']:,.0f}); "
                f"runner loop {r['loop_jobs_per_s']:,.0f} ({100 * entry['loop_vs_ceiling']:.0f}%), "
                f"whole process {r['whole_jobs_per_s']:,.0f} ({100 * entry['whole_vs_ceiling']:.0f}%)")
            rounds.append(entry)
        await server.drop(TEMPLATE)
    finally:
        server.stop_if_started_here()
    return {"started": started, "commit": git_commit(), "machine": machine(), "server": described,
            "jobs": args.jobs, "kinds": kinds, "rounds": rounds,
            "elapsed_s": time.time() - started}


def report(data: dict[str, Any]) -> list[str]:
    rounds = data["rounds"]

    def med(path: tuple[str, str]) -> float:
        return median([r[path[0]][path[1]] for r in rounds])

    ceiling_loop, ceiling_client = med(("ceiling", "loop_jobs_per_s")), med(("ceiling", "client_jobs_per_s"))
    runner_loop, runner_whole = med(("runner", "loop_jobs_per_s")), med(("runner", "whole_jobs_per_s"))
    uncapped = med(("uncapped", "loop_jobs_per_s"))
    log_loop = median([r["runner"]["log_loop_jobs_per_s"] or float("nan") for r in rounds])
    loop_ratio = median([r["loop_vs_ceiling"] for r in rounds])
    whole_ratio = median([r["whole_vs_ceiling"] for r in rounds])
    uncapped_ratio = median([r["loop_vs_uncapped"] for r in rounds])
    m, s = data["machine"], data["server"]
    lines = [
        f"# SQL ceiling vs runner's drain, {data['jobs']:,} no-op jobs",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(data['started']))}, runner {data['commit']}; "
        f"command: `python bench/ceiling.py --jobs {data['jobs']} --rounds {len(rounds)}` "
        f"({data['elapsed_s'] / 60:.1f} min); {m['nproc']} cores ({m['cpu']}), Python {m['python']}, "
        f"PostgreSQL {s['server_version']} (embedded: {s['embedded']}, synchronous_commit = "
        f"{s['synchronous_commit']}), same host.",
        "",
        "Ceiling: runner.queue_sql.CLAIM (limit min(free of 200, 200), lease 30 s, kinds "
        f"{data['kinds']}) and COMPLETE (≤ {MAX_BATCH} outcomes per statement) on two asyncpg connections, "
        "no handler, heartbeat, logging or flush delay. Loop = first `started_at` to last `finished_at` in "
        "the table (the same window for both). Medians of the rounds; each round alternates the order.",
        "",
        "| | jobs/s (median) | vs ceiling (200 slots) | vs uncapped ceiling |",
        "| --- | ---: | ---: | ---: |",
        f"| SQL ceiling, 200 slots as the worker (table window) | {ceiling_loop:,.0f} | 100% | |",
        f"| SQL ceiling, 200 slots, client clock (first CLAIM sent to last COMPLETE back) "
        f"| {ceiling_client:,.0f} | | |",
        f"| SQL ceiling without the slot cap (CLAIM back to back, COMPLETE alongside) | {uncapped:,.0f} "
        f"| {100 * uncapped / ceiling_loop:.0f}% | 100% |",
        f"| runner worker --drain, loop (table window) | {runner_loop:,.0f} | **{100 * loop_ratio:.0f}%** "
        f"(target ≥ 70%: {'met' if loop_ratio >= 0.7 else 'not met'}) | **{100 * uncapped_ratio:.0f}%** "
        f"({'met' if uncapped_ratio >= 0.7 else 'not met'}) |",
        f"| runner worker --drain, loop as bench/queue.py times it (log: worker starting to stopping) "
        f"| {log_loop:,.0f} | {100 * log_loop / ceiling_loop:.0f}% | {100 * log_loop / uncapped:.0f}% |",
        f"| runner worker --drain, whole process | {runner_whole:,.0f} | {100 * whole_ratio:.0f}% (information) "
        f"| {100 * runner_whole / uncapped:.0f}% |",
        "",
        "| round | ceiling loop | uncapped | ceiling client | runner loop | runner whole | runner start-up s "
        "| loop/ceiling | whole/ceiling | ceiling server CPU s | runner worker CPU s | runner server CPU s "
        "| background cores (ceiling / runner / uncapped) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, r in enumerate(rounds, 1):
        c, w = r["ceiling"], r["runner"]
        lines.append(
            f"| {i} | {c['loop_jobs_per_s']:,.0f} | {r['uncapped']['loop_jobs_per_s']:,.0f} "
            f"| {c['client_jobs_per_s']:,.0f} | {w['loop_jobs_per_s']:,.0f} "
            f"| {w['whole_jobs_per_s']:,.0f} | {w['startup_s'] or float('nan'):.2f} "
            f"| {100 * r['loop_vs_ceiling']:.0f}% "
            f"| {100 * r['whole_vs_ceiling']:.0f}% | {c['server_cpu_s'] or float('nan'):.2f} | {w['worker_cpu_s']:.2f} "
            f"| {w['server_cpu_s'] or float('nan'):.2f} "
            f"| {r['ceiling_background_cores']:.2f} / {r['runner_background_cores']:.2f} "
            f"/ {r['uncapped_background_cores']:.2f} |")
    lines += ["", f"Statements in round 1: ceiling {rounds[0]['ceiling']['claims']:,} CLAIMs and "
              f"{rounds[0]['ceiling']['completes']:,} COMPLETEs; uncapped {rounds[0]['uncapped']['claims']:,} and "
              f"{rounds[0]['uncapped']['completes']:,}.", "",
              "With 200 slots the ceiling claims 200, waits for their COMPLETE, claims again: claim and "
              "complete alternate, so it is not an upper bound (runner's completer flushes partial batches "
              "every 5 ms and frees slots sooner, and can beat it in a round). The uncapped ceiling overlaps "
              "them: it is what two connections can do at most with these statements.", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--quiet-cores", type=float, default=0.5)
    parser.add_argument("--quiet-wait", type=float, default=30.0)
    args = parser.parse_args()
    data = asyncio.run(main_async(args))
    lines = report(data)
    write_report(args.out_dir, "ceiling", "\n".join(lines), data, raw_only=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
