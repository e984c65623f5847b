"""runner against pgqueuer 1.6 and procrastinate 3.10 on one PostgreSQL: ``python bench/queue.py``.

Each system runs on its own fresh database (cloned from a per-system template with its schema), in
alternating order, ROUNDS rounds; the median of the rounds is reported. Every worker is a separate
process, timed whole (from just before fork until it is reaped) with its peak RSS and CPU time from
wait4. runner runs from the runner venv exactly as shipped (``runner enqueue`` / ``runner worker
--drain``, default settings); the competitors run from bench/.venv-competitors.

- P1: drain N no-op jobs with one worker process (jobs/s, whole process); the enqueue rate is N over
  the whole ``enqueue`` process (bulk: runner ``enqueue --jsonl``, pgqueuer ``Queries.enqueue`` with
  lists, procrastinate ``batch_defer_async``), each 1,000 jobs per statement.
- P2: enqueue -> handler start latency at a steady RATE jobs/s for DURATION s, one job per enqueue
  call from a separate producer process; the handler records time.time() at its start against the
  time.time() the producer took just before its enqueue call (same host clock).
- P3: peak server connections (pg_stat_activity, client backends on the system's database; for
  runner also by application_name ``runner:<worker id>``) with pool max 10 and 200 concurrent
  ``sleep`` jobs.
- P7: peak RSS of the worker with 1,000 concurrent ``sleep`` jobs.

Options: ``--quick`` (one round, small counts: a smoke run), ``--rounds``, ``--jobs``, ``--systems``,
``--phases``. The server is RUNNER_BENCH_DATABASE_URL, or runner's embedded PostgreSQL under
RUNNER_BENCH_HOME (default /tmp/runner-bench).
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named queue.py: drop its folder from sys.path so `import queue` finds the standard library.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

from bench._common import (  # noqa: E402
    COMPETITOR_PY,
    RESULTS,
    RUNNER_CLI,
    RUNNER_PY,
    SCRATCH,
    WORKERS,
    ConnectionSampler,
    Proc,
    ProcResult,
    Server,
    base_env,
    cpu_busy_s,
    ensure_competitor_venv,
    fetchval,
    fresh_name,
    git_commit,
    log,
    log_event_times,
    machine,
    median,
    package_versions,
    percentile,
    run,
    server_cpu_s,
    start_server,
    wait_for_connection,
    wait_for_quiet,
)

SYSTEMS = ("runner", "pgqueuer", "procrastinate")
PHASES = ("p1", "p2", "p3", "p7")


@dataclass(frozen=True)
class Config:
    rounds: int = 3
    p1_jobs: int = 20_000
    p2_rate: float = 200.0
    p2_duration: float = 20.0
    p3_concurrency: int = 200
    p3_pool_max: int = 10
    p3_jobs: int = 600
    p7_concurrency: int = 1000
    p7_jobs: int = 2000
    sleep_s: float = 2.0
    competitor_concurrency: int = 10  # procrastinate's concurrency in P1 and P2 (the setting)

    @classmethod
    def quick(cls) -> Config:
        return cls(rounds=1, p1_jobs=2000, p2_duration=5.0, p3_jobs=400, p7_jobs=1000, sleep_s=1.0)


# --- the systems ------------------------------------------------------------------------------------
class System:
    name = ""
    template = ""
    app_prefix: str | None = None
    remaining_sql = ""
    succeeded_sql = ""
    running_sql = ""

    def env(self, url: str, **extra: str) -> dict[str, str]:
        return base_env(**extra)

    async def prepare_template(self, server: Server) -> None:
        raise NotImplementedError

    def enqueue_argv(self, url: str, kind: str, count: int, seconds: float, work: Path) -> list[str]:
        raise NotImplementedError

    def drain_argv(self, url: str) -> list[str]:
        raise NotImplementedError

    def latency_worker_argv(self, url: str, out: Path) -> list[str]:
        raise NotImplementedError

    def producer_argv(self, url: str, rate: float, duration: float) -> list[str]:
        raise NotImplementedError

    def sleep_worker(self, url: str, concurrency: int, pool_max: int | None) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def worker_env(self, url: str) -> dict[str, str]:
        return self.env(url)


class Runner(System):
    name = "runner"
    remaining_sql = "SELECT count(*) FROM runner_jobs WHERE status IN ('pending', 'running')"
    succeeded_sql = "SELECT count(*) FROM runner_jobs WHERE status = 'succeeded'"
    running_sql = "SELECT count(*) FROM runner_jobs WHERE status = 'running'"

    def __init__(self, consensus: bool = False) -> None:
        self.template = "bench_tpl_runner"
        self.worker_id = ""
        self.consensus = consensus

    def env(self, url: str, **extra: str) -> dict[str, str]:
        # The consensus loops are a separate feature with no counterpart in pgqueuer or procrastinate; with
        # RUNNER_CHAIN_URL unset they would start an in-process dev chain in every worker. Off unless
        # --runner-consensus. Every queue setting (heartbeats, fencing, cancellation checks) stays default.
        if not self.consensus:
            extra = {"RUNNER_CONSENSUS_ENABLED": "false", **extra}
        return base_env(RUNNER_DATABASE_URL=url, RUNNER_HOME=str(SCRATCH / "runner-home"), RUNNER_HTTP_PORT="0",
                        **extra)

    def worker_env(self, url: str, **extra: str) -> dict[str, str]:
        # A known worker id, so its connections can be found by application_name (runner:<id>[:listen]).
        self.worker_id = f"bench-{uuid.uuid4().hex[:8]}"
        self.app_prefix = f"runner:{self.worker_id}"
        return self.env(url, RUNNER_WORKER_ID=self.worker_id, **extra)

    async def prepare_template(self, server: Server) -> None:
        url = await server.create(self.template)
        await run([RUNNER_CLI, "migrate"], self.env(url), SCRATCH / "logs" / "runner-migrate.log")

    def enqueue_argv(self, url: str, kind: str, count: int, seconds: float, work: Path) -> list[str]:
        line = json.dumps({"seconds": seconds} if kind == "sleep" else {})
        path = work / f"runner-{kind}-{count}.jsonl"
        path.write_text((line + "\n") * count)
        return [str(RUNNER_CLI), "enqueue", kind, "--jsonl", str(path)]

    def drain_argv(self, url: str) -> list[str]:
        return [str(RUNNER_CLI), "worker", "--drain"]

    def latency_worker_argv(self, url: str, out: Path) -> list[str]:
        return [str(RUNNER_PY), str(WORKERS / "runner_bench.py"), "worker", "--latency-out", str(out)]

    def producer_argv(self, url: str, rate: float, duration: float) -> list[str]:
        return [str(RUNNER_PY), str(WORKERS / "runner_bench.py"), "produce", "--rate", str(rate),
                "--duration", str(duration)]

    def sleep_worker(self, url: str, concurrency: int, pool_max: int | None) -> tuple[list[str], dict[str, str]]:
        extra = {"RUNNER_CONCURRENCY": str(concurrency)}
        if pool_max is not None:
            extra["RUNNER_POOL_MAX_SIZE"] = str(pool_max)
        return self.drain_argv(url), self.worker_env(url, **extra)


class Competitor(System):
    script = ""

    def __init__(self) -> None:
        self.template = f"bench_tpl_{self.name}"

    def _argv(self, command: str, url: str, *rest: object) -> list[str]:
        return [str(COMPETITOR_PY), str(WORKERS / self.script), command, "--dsn", url, *map(str, rest)]

    async def prepare_template(self, server: Server) -> None:
        url = await server.create(self.template)
        await run(self._argv("install", url), self.env(url), SCRATCH / "logs" / f"{self.name}-install.log")

    def enqueue_argv(self, url: str, kind: str, count: int, seconds: float, work: Path) -> list[str]:
        return self._argv("enqueue", url, "--kind", kind, "--count", count, "--seconds", seconds)

    def producer_argv(self, url: str, rate: float, duration: float) -> list[str]:
        return self._argv("produce", url, "--rate", rate, "--duration", duration)


class PgQueuer(Competitor):
    name = "pgqueuer"
    script = "pgq_bench.py"
    app_prefix = "pgqueuer-bench"
    # pgqueuer deletes a job when it finishes and logs it to pgqueuer_log.
    remaining_sql = "SELECT count(*) FROM pgqueuer"
    succeeded_sql = "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'"
    running_sql = "SELECT count(*) FROM pgqueuer WHERE status = 'picked'"

    def drain_argv(self, url: str) -> list[str]:
        return self._argv("worker", url, "--drain")  # pgq run's defaults: batch 10, no concurrency cap

    def latency_worker_argv(self, url: str, out: Path) -> list[str]:
        return self._argv("worker", url, "--latency-out", out)

    def sleep_worker(self, url: str, concurrency: int, pool_max: int | None) -> tuple[list[str], dict[str, str]]:
        # pgqueuer uses one connection (AsyncpgDriver); it has no pool to size.
        return self._argv("worker", url, "--drain", "--max-concurrent", concurrency), self.env(url)


class Procrastinate(Competitor):
    name = "procrastinate"
    script = "procrastinate_bench.py"
    app_prefix = "procrastinate-bench"
    remaining_sql = "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
    succeeded_sql = "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"
    running_sql = "SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'"

    def __init__(self, concurrency: int) -> None:
        super().__init__()
        self.concurrency = concurrency

    def drain_argv(self, url: str) -> list[str]:
        return self._argv("worker", url, "--drain", "--concurrency", self.concurrency)

    def latency_worker_argv(self, url: str, out: Path) -> list[str]:
        return self._argv("worker", url, "--concurrency", self.concurrency, "--latency-out", out)

    def sleep_worker(self, url: str, concurrency: int, pool_max: int | None) -> tuple[list[str], dict[str, str]]:
        rest: list[object] = ["--drain", "--concurrency", concurrency]
        if pool_max is not None:
            rest += ["--pool-max", pool_max]
        return self._argv("worker", url, *rest), self.env(url)


# --- the phases -------------------------------------------------------------------------------------
class Bench:
    def __init__(self, server: Server, config: Config, systems: list[System]) -> None:
        self.server = server
        self.config = config
        self.systems = systems
        self.work = SCRATCH / "work"
        self.logs = SCRATCH / "logs"
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)

    def log_path(self, system: System, phase: str, round_: int, what: str) -> Path:
        return self.logs / f"{system.name}-{phase}-r{round_}-{what}.log"

    async def fresh(self, system: System, phase: str) -> tuple[str, str]:
        name = fresh_name(f"{system.name}_{phase}")
        return name, await self.server.create(name, system.template)

    async def enqueue(self, system: System, url: str, kind: str, count: int, seconds: float,
                      log_path: Path) -> ProcResult:
        argv = system.enqueue_argv(url, kind, count, seconds, self.work)
        return await run(argv, system.env(url), log_path, timeout_s=600)

    async def p1(self, system: System, round_: int) -> dict[str, Any]:
        n = self.config.p1_jobs
        name, url = await self.fresh(system, "p1")
        try:
            enq = await self.enqueue(system, url, "noop", n, 0.0, self.log_path(system, "p1", round_, "enqueue"))
            busy0, server0 = cpu_busy_s(), server_cpu_s(self.server)
            proc = Proc(system.drain_argv(url), system.worker_env(url), self.log_path(system, "p1", round_, "drain"))
            drained = (await proc.start().wait(timeout_s=1800)).check()
            busy = cpu_busy_s() - busy0
            await asyncio.sleep(0.2)  # let the postmaster reap the worker's backends (their CPU moves to it)
            server1 = server_cpu_s(self.server)
            server_s = server1 - server0 if server0 is not None and server1 is not None else None
            succeeded = await fetchval(url, system.succeeded_sql)
            remaining = await fetchval(url, system.remaining_sql)
        finally:
            await self.server.drop(name)
        if succeeded != n or remaining != 0:
            raise RuntimeError(f"{system.name} P1: {succeeded} of {n} succeeded, {remaining} left")
        phases: dict[str, float] = {}
        if system.name == "runner":  # where the whole-process time goes: start-up, the drain loop, shutdown
            times = log_event_times(drained.output, "worker starting", "stopping: no new claims")
            if len(times) == 2:
                loop_s = times["stopping: no new claims"] - times["worker starting"]
                phases = {"startup_s": times["worker starting"] - proc.started_wall, "loop_s": loop_s,
                          "loop_jobs_per_s": n / loop_s if loop_s > 0 else None,
                          "shutdown_s": proc.started_wall + drained.wall_s - times["stopping: no new claims"]}
        return {**phases,
            "jobs": n,
            "drain_s": drained.wall_s,
            "drain_jobs_per_s": n / drained.wall_s,
            "enqueue_s": enq.wall_s,
            "enqueue_jobs_per_s": n / enq.wall_s,
            "enqueue_call_s": enq.last_json().get("enqueue_s"),
            "worker_cpu_s": drained.user_s + drained.sys_s,
            "worker_cpu_ms_per_job": 1000 * (drained.user_s + drained.sys_s) / n,
            "server_cpu_s": server_s,
            "server_cpu_ms_per_job": 1000 * server_s / n if server_s is not None else None,
            "machine_busy_cpu_s": busy,
            "worker_maxrss_mib": drained.maxrss_mib,
        }

    async def p2(self, system: System, round_: int) -> dict[str, Any]:
        cfg = self.config
        name, url = await self.fresh(system, "p2")
        out = self.work / f"{system.name}-latency-r{round_}.json"
        out.unlink(missing_ok=True)
        worker = Proc(system.latency_worker_argv(url, out), system.worker_env(url),
                      self.log_path(system, "p2", round_, "worker")).start()
        db_latencies: list[float] = []
        try:
            await wait_for_connection(self.server, name)
            await asyncio.sleep(1.5)  # let the worker finish starting (pool, LISTEN) before the clock runs
            produced = await run(system.producer_argv(url, cfg.p2_rate, cfg.p2_duration), system.env(url),
                                 self.log_path(system, "p2", round_, "producer"), timeout_s=cfg.p2_duration + 120)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and worker.running():
                if not await fetchval(url, system.remaining_sql):
                    break
                await asyncio.sleep(0.1)
            if not worker.running():
                (await worker.wait(timeout_s=5)).check()
                raise RuntimeError(f"{system.name} P2: the worker exited before it was stopped")
            worker.signal(signal.SIGTERM)
            await worker.wait(timeout_s=60)
            if system.name == "runner":
                rows = await fetchval(url, "SELECT array_agg(extract(epoch FROM started_at - created_at) * 1000) "
                                           "FROM runner_jobs WHERE kind = 'bench_latency'")
                db_latencies = [float(x) for x in rows or [] if x is not None]
        finally:
            worker.signal(signal.SIGKILL)
            await self.server.drop(name)
        latencies_ms = [x * 1000 for x in json.loads(out.read_text())]
        expected = produced.last_json().get("produced")
        if len(latencies_ms) != expected:
            raise RuntimeError(f"{system.name} P2: {len(latencies_ms)} handler starts for {expected} jobs")
        result = {
            "jobs": len(latencies_ms),
            "rate": cfg.p2_rate,
            "producer_elapsed_s": produced.last_json().get("elapsed_s"),
            "achieved_rate": len(latencies_ms) / (produced.last_json().get("elapsed_s") or math.inf),
            **{f"p{q}_ms": percentile(latencies_ms, q) for q in (50, 95, 99)},
            "max_ms": max(latencies_ms),
            "mean_ms": sum(latencies_ms) / len(latencies_ms),
        }
        if db_latencies:
            result["db_started_minus_created"] = {f"p{q}_ms": percentile(db_latencies, q) for q in (50, 95, 99)}
        return result

    async def sleep_phase(self, system: System, phase: str, round_: int, jobs: int, concurrency: int,
                          pool_max: int | None) -> dict[str, Any]:
        name, url = await self.fresh(system, phase)
        try:
            await self.enqueue(system, url, "sleep", jobs, self.config.sleep_s,
                               self.log_path(system, phase, round_, "enqueue"))
            argv, env = system.sleep_worker(url, concurrency, pool_max)
            async with ConnectionSampler(self.server, name, system.app_prefix, running_sql=system.running_sql,
                                         database_url=url) as sampler:
                proc = Proc(argv, env, self.log_path(system, phase, round_, "worker")).start()
                result = (await proc.wait(timeout_s=600)).check()
            succeeded = await fetchval(url, system.succeeded_sql)
        finally:
            await self.server.drop(name)
        if succeeded != jobs:
            raise RuntimeError(f"{system.name} {phase}: {succeeded} of {jobs} sleep jobs succeeded")
        loaded = sampler.values_while_running()
        return {
            "jobs": jobs,
            "concurrency": concurrency,
            "pool_max": pool_max,
            # rows in 'running' as PostgreSQL sees them: for a moment after a wave of jobs ends this counts
            # the finished ones not yet flushed by the completer as well as the next wave just claimed
            "peak_running_jobs": sampler.peak_running(),
            "peak_connections": sampler.peak(),
            "peak_connections_by_app": sampler.peak(by_app=True) if system.app_prefix else None,
            "connections_while_running": {"min": min(loaded, default=0), "max": max(loaded, default=0),
                                          "samples": len(loaded)},
            "worker_maxrss_mib": result.maxrss_mib,
            "wall_s": result.wall_s,
        }

    async def p3(self, system: System, round_: int) -> dict[str, Any]:
        cfg = self.config
        return await self.sleep_phase(system, "p3", round_, cfg.p3_jobs, cfg.p3_concurrency, cfg.p3_pool_max)

    async def p7(self, system: System, round_: int) -> dict[str, Any]:
        cfg = self.config
        return await self.sleep_phase(system, "p7", round_, cfg.p7_jobs, cfg.p7_concurrency, None)


# --- summary ----------------------------------------------------------------------------------------
MEDIAN_KEYS = {
    "p1": ("drain_jobs_per_s", "enqueue_jobs_per_s", "drain_s", "worker_cpu_s", "worker_cpu_ms_per_job",
           "server_cpu_s", "server_cpu_ms_per_job", "machine_busy_cpu_s",
           "worker_maxrss_mib", "startup_s", "loop_s", "loop_jobs_per_s", "shutdown_s"),
    "p2": ("p50_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms"),
    "p3": ("peak_connections", "peak_connections_by_app", "peak_running_jobs", "worker_maxrss_mib"),
    "p7": ("worker_maxrss_mib", "peak_running_jobs", "peak_connections"),
}


def summarise(rounds: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, dict[str, float]]]:
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for system, phases in rounds.items():
        for phase, results in phases.items():
            medians: dict[str, float] = {}
            for key in MEDIAN_KEYS[phase]:
                values = [r[key] for r in results if r.get(key) is not None]
                if values:
                    medians[key] = median(values)
            if phase == "p3":
                medians["max_connections_any_round"] = max(r["peak_connections"] for r in results)
            summary.setdefault(system, {})[phase] = medians
    return summary


def paired_p1_ratios(rounds: dict[str, dict[str, list[dict[str, Any]]]]) -> list[float]:
    """runner / pgqueuer P1 drain rate within each round (same minutes, same machine load)."""
    ours, theirs = rounds.get("runner", {}).get("p1", []), rounds.get("pgqueuer", {}).get("p1", [])
    return [a["drain_jobs_per_s"] / b["drain_jobs_per_s"] for a, b in zip(ours, theirs, strict=False)]


def targets(summary: dict[str, dict[str, dict[str, float]]], config: Config,
            paired: list[float]) -> list[dict[str, Any]]:
    runner = summary.get("runner", {})
    checks: list[dict[str, Any]] = []
    if "p1" in runner and "p1" in summary.get("pgqueuer", {}):
        ratio = runner["p1"]["drain_jobs_per_s"] / summary["pgqueuer"]["p1"]["drain_jobs_per_s"]
        within = ", ".join(f"{r:.2f}x" for r in paired)
        checks.append({"target": "P1 drain >= 2x pgqueuer", "value": f"{ratio:.2f}x (medians); per round {within}",
                       "met": ratio >= 2 and median(paired) >= 2})
    if "p2" in runner:
        p50, p99 = runner["p2"]["p50_ms"], runner["p2"]["p99_ms"]
        checks.append({"target": "P2 p50 <= 5 ms", "value": f"{p50:.1f} ms", "met": p50 <= 5})
        checks.append({"target": "P2 p99 <= 25 ms", "value": f"{p99:.1f} ms", "met": p99 <= 25})
    if "p3" in runner:
        peak = runner["p3"]["max_connections_any_round"]
        limit = config.p3_pool_max + 1
        checks.append({"target": f"P3 connections <= pool max + 1 listener = {limit}, flat",
                       "value": f"peak {peak:.0f}", "met": peak <= limit})
    if "p7" in runner:
        rss = runner["p7"]["worker_maxrss_mib"]
        checks.append({"target": "P7 peak RSS <= 150 MiB", "value": f"{rss:.0f} MiB", "met": rss <= 150})
    return checks


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    summary, config = report["summary"], report["config"]
    lines = [
        f"Median of {config['rounds']} rounds; {report['started_at']}; runner {report['runner_commit']}.",
        "",
        f"| system | P1 drain jobs/s ({config['p1_jobs']:,} no-op, 1 process) | P1 enqueue jobs/s "
        f"| P2 p50 / p95 / p99 ms ({config['p2_rate']:g}/s for {config['p2_duration']:g} s) "
        f"| P3 peak connections (pool max {config['p3_pool_max']}, {config['p3_concurrency']} sleeping) "
        f"| P7 peak RSS MiB ({config['p7_concurrency']:,} sleeping) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for system in report["systems"]:
        s = summary.get(system, {})
        p1, p2, p3, p7 = (s.get(k, {}) for k in ("p1", "p2", "p3", "p7"))
        latency = (f"{fmt(p2.get('p50_ms'), 1)} / {fmt(p2.get('p95_ms'), 1)} / {fmt(p2.get('p99_ms'), 1)}"
                   if p2 else "-")
        lines.append(f"| {system} | {fmt(p1.get('drain_jobs_per_s'))} | {fmt(p1.get('enqueue_jobs_per_s'))} "
                     f"| {latency} | {fmt(p3.get('max_connections_any_round'))} "
                     f"| {fmt(p7.get('worker_maxrss_mib'))} |")
    if report["targets"]:
        lines += ["", "| runner target | measured | met |", "| --- | --- | --- |"]
        lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |" for t in report["targets"]]
    m, pg = report["machine"], report["server"]
    lines += [
        "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, Python {m['python']}, "
        f"PostgreSQL {pg['server_version']} ({'embedded, ' if pg['embedded'] else ''}same host, "
        f"max_connections {pg['max_connections']}, shared_buffers {pg['shared_buffers']}, "
        f"synchronous_commit {pg['synchronous_commit']}). Whole run: {report['elapsed_s'] / 60:.1f} min.",
        "",
        "runner: `runner enqueue --jsonl` / `runner worker --drain` with default settings (heartbeats, fencing, "
        "cancellation checks on)"
        + ("." if config.get("runner_consensus") else "; consensus loops off (`RUNNER_CONSENSUS_ENABLED=false`)."),
        f"pgqueuer: `pgqueuer.run(factory, mode=drain)` on uvloop, as `pgq run` does (batch 10); "
        f"procrastinate: `run_worker_async(concurrency={config['competitor_concurrency']}, wait=False)`. "
        "P3/P7 set each system's concurrency to the number of sleeping jobs.",
    ]
    busy = report.get("background_busy_cores_max", 0.0)
    if busy > 0.3:
        lines += ["", f"Warning: other processes kept up to {busy:.1f} of {m['nproc']} cores busy just before some "
                      "measurements (sampled for 0.5 s before each); figures from a quiet machine may differ."]
    lines += ["", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------------------------------
async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    config = Config.quick() if args.quick else Config()
    overrides = {k: v for k, v in {"rounds": args.rounds, "p1_jobs": args.jobs}.items() if v is not None}
    config = Config(**{**config.__dict__, **overrides})
    names = [s for s in args.systems.split(",") if s]
    phases = [p for p in args.phases.split(",") if p]
    factories = {"runner": lambda: Runner(args.runner_consensus), "pgqueuer": PgQueuer,
                 "procrastinate": lambda: Procrastinate(config.competitor_concurrency)}
    systems: list[System] = [factories[n]() for n in names]

    ensure_competitor_venv()
    started = time.time()
    server = start_server()
    try:
        bench = Bench(server, config, systems)
        for system in systems:
            await system.prepare_template(server)
        rounds: dict[str, dict[str, list[dict[str, Any]]]] = {s.name: {p: [] for p in phases} for s in systems}
        for round_ in range(config.rounds):
            order = systems if round_ % 2 == 0 else list(reversed(systems))
            for phase in phases:
                for system in order:
                    background = await wait_for_quiet(args.quiet_cores, args.quiet_wait)
                    log(f"round {round_ + 1}/{config.rounds} {phase} {system.name} "
                        f"(background load {background:.2f} cores)")
                    result = await getattr(bench, phase)(system, round_)
                    result["background_busy_cores"] = background
                    rounds[system.name][phase].append(result)
                    log(f"  {json.dumps(result, default=str)}")
        for system in systems:
            await server.drop(system.template)
        summary = summarise(rounds)
        report = {
            "started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
            "elapsed_s": time.time() - started,
            "command": "python bench/queue.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
            "config": {**config.__dict__, "runner_consensus": args.runner_consensus},
            "systems": names,
            "phases": phases,
            "machine": machine(),
            "server": await server.describe(),
            "versions": package_versions(),
            "runner_commit": git_commit(),
            "summary": summary,
            "targets": targets(summary, config, paired_p1_ratios(rounds)),
            "p1_ratio_per_round": paired_p1_ratios(rounds),
            "background_busy_cores_max": max(r["background_busy_cores"] for phases_ in rounds.values()
                                             for results in phases_.values() for r in results),
            "rounds": rounds,
        }
    finally:
        server.stop_if_started_here()
    return report


def write_outputs(report: dict[str, Any], out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / name
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    chart = subprocess.run([str(COMPETITOR_PY), str(_BENCH / "chart.py"), str(stem.with_suffix(".json")),
                            str(stem.with_suffix(".png"))], capture_output=True, text=True)
    if chart.returncode != 0:
        log(f"chart failed: {chart.stderr.strip()[-500:]}")
    print(markdown(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round, small counts (a smoke run)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--jobs", type=int, help="P1 job count (default 20,000)")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--name", default="queue", help="file stem under --out-dir")
    parser.add_argument("--runner-consensus", action="store_true",
                        help="leave runner's consensus loops on (an in-process dev chain per worker without "
                             "RUNNER_CHAIN_URL); off by default: the competitors have no such feature")
    parser.add_argument("--quiet-cores", type=float, default=0.5,
                        help="before each measurement, wait until other processes use fewer cores than this")
    parser.add_argument("--quiet-wait", type=float, default=90.0, help="...but at most this many seconds")
    args = parser.parse_args()
    unknown = [s for s in args.systems.split(",") if s and s not in SYSTEMS]
    unknown += [p for p in args.phases.split(",") if p and p not in PHASES]
    if unknown:
        print(f"error: unknown system or phase: {', '.join(unknown)}", file=sys.stderr)
        raise SystemExit(2)
    report = asyncio.run(main_async(args))
    write_outputs(report, Path(args.out_dir), args.name)


if __name__ == "__main__":
    main()
