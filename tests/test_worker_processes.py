"""Worker processes against a real PostgreSQL: exactly-once across processes, kill -9, pool pressure,
SIGTERM, and LISTEN after a server restart."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import asyncpg

from runner.app import App
from runner.queue import NewJob
from runner.worker import Worker
from tests.conftest import start_worker, wait_exit
from tests.pg import TestServer, holds, wait_until
from tests.stress import log_lines


async def test_four_worker_processes_run_each_of_2000_jobs_exactly_once(
    app: App, runner_env: dict[str, str], tmp_path: Path
) -> None:
    await app.queue.job_enqueue_many([NewJob("record", {}) for _ in range(2000)])
    workers = [start_worker(runner_env, "--drain", log_path=tmp_path / f"w{i}.log",
                            RUNNER_WORKER_ID=f"w{i}", RUNNER_WORKER_REPLICAS="4") for i in range(4)]
    codes = [await wait_exit(w) for w in workers]
    assert codes == [0, 0, 0, 0]
    assert await app.db.fetchval("SELECT count(*) FROM runner_jobs WHERE status = 'succeeded'") == 2000
    assert await app.db.fetchval("SELECT count(*) FROM runner_executions") == 2000
    assert await app.db.fetchval("SELECT count(DISTINCT job_id) FROM runner_executions") == 2000
    per_worker = await app.db.fetch("SELECT worker_id, count(*) FROM runner_executions GROUP BY worker_id")
    assert len(per_worker) >= 2  # the work really was shared


async def test_kill_9_mid_job_is_recovered_by_another_worker(
    app: App, runner_env: dict[str, str], tmp_path: Path
) -> None:
    ids = await app.queue.job_enqueue_many([NewJob("record", {"seconds": 3}) for _ in range(5)])
    victim = start_worker(runner_env, log_path=tmp_path / "victim.log", RUNNER_WORKER_ID="victim")
    await wait_until(lambda: app.db.fetchval(
        "SELECT count(*) = 5 FROM runner_jobs WHERE status = 'running' AND lease_owner = 'victim'"), 30)
    victim.send_signal(signal.SIGKILL)
    await wait_exit(victim)
    rescuer = start_worker(runner_env, "--drain", log_path=tmp_path / "rescuer.log", RUNNER_WORKER_ID="rescuer")
    assert await wait_exit(rescuer) == 0
    rows = await app.db.fetch("SELECT status, recoveries, attempts FROM runner_jobs WHERE id = ANY($1)", ids)
    assert all((r["status"], r["recoveries"]) == ("succeeded", 1) for r in rows)
    executions = await app.db.fetch("SELECT job_id, worker_id FROM runner_executions")
    assert sorted(e["job_id"] for e in executions) == sorted(ids)
    assert {e["worker_id"] for e in executions} == {"rescuer"}


async def test_kill_9_past_the_recovery_cap_ends_failed(
    app: App, runner_env: dict[str, str], tmp_path: Path
) -> None:
    [job_id] = await app.queue.job_enqueue_many([NewJob("record", {"seconds": 60}, max_attempts=10)])
    for round_ in range(2):
        victim = start_worker(runner_env, log_path=tmp_path / f"v{round_}.log", RUNNER_WORKER_ID=f"v{round_}",
                              RUNNER_MAX_RECOVERIES="1")
        await wait_until(lambda r=round_: app.db.fetchval(
            "SELECT lease_owner = $2 FROM runner_jobs WHERE id = $1", job_id, f"v{r}"), 30)
        victim.send_signal(signal.SIGKILL)
        await wait_exit(victim)
    # The next worker's rescuer sees a second lost lease with max_recoveries = 1: failed, with the reason.
    final = start_worker(runner_env, "--drain", log_path=tmp_path / "final.log", RUNNER_MAX_RECOVERIES="1")
    assert await wait_exit(final) == 0
    row = await app.queue.job_get(job_id)
    assert row["status"] == "failed" and row["recoveries"] == 2
    assert "lease of v1 expired" in row["last_error"] and "recovery limit 1 reached" in row["last_error"]


async def test_pool_of_two_runs_200_concurrent_jobs_and_counts_exhaustion_retries(
    app: App, runner_env: dict[str, str], tmp_path: Path
) -> None:
    await app.queue.job_enqueue_many([NewJob("record", {"seconds": 0.2}) for _ in range(200)])
    log_path = tmp_path / "worker.log"
    worker = start_worker(
        runner_env, "--drain", "--concurrency", "200", log_path=log_path, RUNNER_WORKER_ID="tight",
        RUNNER_POOL_MAX_SIZE="2", RUNNER_POOL_MIN_SIZE="1", RUNNER_POOL_ACQUIRE_TIMEOUT="0.05",
        RUNNER_POOL_RETRY_ATTEMPTS="50", RUNNER_POOL_RETRY_MAX_BACKOFF="0.2",
    )
    peak = 0
    while worker.poll() is None:
        peak = max(peak, await app.db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'runner:tight%'"))
        await asyncio.sleep(0.05)
    assert worker.returncode == 0
    assert await app.db.fetchval("SELECT count(*) FROM runner_jobs WHERE status = 'succeeded'") == 200
    assert await app.db.fetchval("SELECT count(DISTINCT job_id) FROM runner_executions") == 200
    assert 1 <= peak <= 3  # the pool of 2, plus the LISTEN connection
    retries = [json.loads(line) for line in log_path.read_text().splitlines()
               if '"pool acquire retry"' in line]
    assert retries, "expected logged exhaustion retries with a pool of 2 and 200 jobs"
    assert all(r["pool"] == "runner" and r["attempt"] >= 1 for r in retries)


async def test_sigterm_releases_leases_without_using_an_attempt(
    app: App, runner_env: dict[str, str], tmp_path: Path
) -> None:
    ids = await app.queue.job_enqueue_many([NewJob("sleep", {"seconds": 60}) for _ in range(3)])
    worker = start_worker(runner_env, log_path=tmp_path / "w.log", RUNNER_SHUTDOWN_GRACE="0.5")
    await wait_until(lambda: app.db.fetchval("SELECT count(*) = 3 FROM runner_jobs WHERE status = 'running'"), 30)
    worker.send_signal(signal.SIGTERM)
    assert await wait_exit(worker, 30) == 0
    rows = await app.db.fetch(
        "SELECT status, attempts, lease_owner FROM runner_jobs WHERE id = ANY($1)", ids)
    assert all((r["status"], r["attempts"], r["lease_owner"]) == ("pending", 0, None) for r in rows)
    assert await app.db.fetchval("SELECT count(*) FROM runner_workers") == 0


async def test_sigterm_lets_running_jobs_finish_within_the_grace(
    app: App, runner_env: dict[str, str], tmp_path: Path
) -> None:
    ids = await app.queue.job_enqueue_many([NewJob("record", {"seconds": 1.0, "log_start": True}) for _ in range(2)])
    log = tmp_path / "w.log"
    worker = start_worker(runner_env, log_path=log, RUNNER_SHUTDOWN_GRACE="20")
    # Both handlers have started (claimed is not enough: a job claimed but not yet started when SIGTERM
    # comes is handed back to pending, by design).
    await wait_until(lambda: holds(len(log_lines(log, "record started")) == 2), 30)
    worker.send_signal(signal.SIGTERM)
    assert await wait_exit(worker, 30) == 0
    statuses = await app.db.fetch("SELECT status FROM runner_jobs WHERE id = ANY($1)", ids)
    assert [r["status"] for r in statuses] == ["succeeded", "succeeded"]


async def test_listen_reconnects_after_a_server_restart(app: App, pg_server: TestServer, settings) -> None:  # type: ignore[no-untyped-def]
    # A poll interval far longer than the test: only NOTIFY can wake the fetcher in time.
    slow_poll = settings.model_copy(update={"poll_interval": 600.0})
    app_w = await App.open(slow_poll)
    worker = Worker(app_w, install_signal_handlers=False)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: holds(worker.listener.connected), 10)
        await app.queue.job_enqueue_many([NewJob("noop", {})])
        await wait_until(lambda: app.db.fetchval("SELECT count(*) = 1 FROM runner_jobs WHERE status='succeeded'"))
        await asyncio.to_thread(pg_server.restart)
        await wait_until(lambda: holds(worker.listener.connects >= 2 and worker.listener.connected), 30)
        # The reconnect's catch-up claim has run (so only NOTIFY can pick up the next job in time).
        await wait_until(lambda: holds(not worker.fetcher.wake.is_set()
                                       and worker.fetcher.last_success >= worker.listener.connected_at), 30)
        await _enqueue_retrying(app, NewJob("noop", {"after": "restart"}))
        await wait_until(lambda: app.db.fetchval(
            "SELECT count(*) = 2 FROM runner_jobs WHERE status = 'succeeded'"), 10)
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
        await app_w.close()


async def _enqueue_retrying(app: App, job: NewJob) -> None:
    for _ in range(50):
        try:
            await app.queue.job_enqueue_many([job])
            return
        except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError):
            await asyncio.sleep(0.2)
    raise AssertionError("could not enqueue after the restart")
