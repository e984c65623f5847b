"""Backfill under failure, with real worker processes: kill -9 mid-run, cancel mid-run, and a restart of
the database server mid-run. Every run must end exact: no row lost or duplicated, done == total."""

from __future__ import annotations

import asyncio
import functools
import random
import signal
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from runner.app import App
from runner.queue import NewJob
from tests import test_backfill
from tests.conftest import start_worker
from tests.pg import TestServer, wait_until
from tests.test_backfill import digest, make_table, route_urls

other_url = test_backfill.other_url  # the fixture: a second database, the connection 'other'

ROWS = 60_000
BATCH = 100
# A cap on each copy's rate, so that a fast machine cannot finish a job between "progressed" and the kill,
# the cancel or the restart (at least 6 s of copying per job; each kill lets it run tenths of a second). A slow
# machine never reaches the cap, and the kills still land inside batches most of the time.
RATE = 10_000
KILLS = 5
# Each kill is a rescue and an attempt: allow more than the defaults (3 recoveries, 5 attempts). The
# consensus loops have nothing to do here.
WORKER_ENV = {"RUNNER_MAX_RECOVERIES": "50", "RUNNER_CONSENSUS_ENABLED": "false"}


async def job_row(url: str, job_id: int) -> dict[str, Any]:
    connection = await asyncpg.connect(url)
    try:
        row = await connection.fetchrow("SELECT status, progress_done, progress_total, checkpoint, last_error "
                                        "FROM runner_jobs WHERE id = $1", job_id)
    finally:
        await connection.close()
    assert row is not None
    return dict(row)


async def count(url: str, table: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        return int(await connection.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await connection.close()


async def enqueue(app: App, payload: dict[str, Any], max_attempts: int = 50) -> int:
    kind = app.registry.get("backfill")
    assert kind.validate is not None
    await kind.validate(payload, app)
    job_id, _ = await app.queue.job_enqueue(NewJob("backfill", payload, max_attempts=max_attempts))
    return job_id


def stop(worker: subprocess.Popen[str]) -> int:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
    return worker.wait(timeout=30)


def tail(log_path: Path) -> str:
    return log_path.read_text()[-4000:] if log_path.exists() else ""


async def test_kill_9_at_random_points_then_a_new_worker_finishes_exactly(
        app: App, runner_env: dict[str, str], database_url: str, other_url: str, tmp_path: Path) -> None:
    """Two jobs at once: into the runner's database (batch and checkpoint atomic) and out of it (batches
    idempotent by key). Each kill comes at a random moment after the new worker moved both jobs on."""
    routes = ["into_runner", "out_of_runner"]
    jobs: dict[str, int] = {}
    for route in routes:
        source, source_url, dest, _ = route_urls(route, database_url, other_url)
        await make_table(source_url, "src", ROWS)
        jobs[route] = await enqueue(app, {"source": source, "source_table": "src", "dest": dest,
                                          "dest_table": "dst", "create_table": True, "batch_size": BATCH,
                                          "max_rows_per_second": RATE})
    rng = random.Random()
    for kill in range(KILLS):
        before = {route: (await job_row(database_url, job_id))["progress_done"] for route, job_id in jobs.items()}
        worker = start_worker(runner_env, log_path=tmp_path / f"worker-{kill}.log", **WORKER_ENV)
        try:
            for route, job_id in jobs.items():
                await wait_until(functools.partial(progressed, database_url, job_id, before[route]), timeout_s=60,
                                 interval_s=0.01)
            await asyncio.sleep(rng.uniform(0, 0.2))
            for job_id in jobs.values():
                row = await job_row(database_url, job_id)
                assert row["status"] == "running", f"kill {kill}: the copy must still be running to be killed mid-run"
        finally:
            worker.kill()
            worker.wait()
        for route, job_id in jobs.items():
            _, _, dest, dest_url = route_urls(route, database_url, other_url)
            await check_after_kill(database_url, dest_url, job_id, atomic=dest == "default")

    log_path = tmp_path / "worker-last.log"
    worker = start_worker(runner_env, log_path=log_path, **WORKER_ENV)
    try:
        for job_id in jobs.values():
            await wait_until(functools.partial(finished, database_url, job_id), timeout_s=120, interval_s=0.05)
    finally:
        assert stop(worker) == 0, tail(log_path)
    for route, job_id in jobs.items():
        _, source_url, _, dest_url = route_urls(route, database_url, other_url)
        row = await job_row(database_url, job_id)
        assert row["status"] == "succeeded", row["last_error"]
        assert row["progress_done"] == row["progress_total"] == ROWS
        assert await digest(dest_url, "dst") == await digest(source_url, "src")


async def progressed(url: str, job_id: int, before: int) -> bool:
    """The job moved past ``before`` (or finished: the caller then sees it was not mid-run)."""
    row = await job_row(url, job_id)
    return row["status"] in ("succeeded", "failed", "cancelled") or (
        row["status"] == "running" and row["progress_done"] > before)


async def finished(url: str, job_id: int) -> bool:
    return (await job_row(url, job_id))["status"] in ("succeeded", "failed", "cancelled")


async def check_after_kill(runner_url: str, dest_url: str, job_id: int, atomic: bool) -> None:
    """What a kill leaves: with the destination in the runner's database, exactly the checkpointed rows;
    elsewhere at most one batch past the checkpoint (committed, not yet checkpointed; replayed by key)."""
    if atomic:
        # One snapshot: a COMMIT the killed worker had sent can still land on the server after the kill,
        # between two separate reads; read in one statement, both sides are the same transaction's.
        connection = await asyncpg.connect(runner_url)
        try:
            both = await connection.fetchrow(
                "SELECT progress_done, (SELECT count(*) FROM dst) AS rows FROM runner_jobs WHERE id = $1", job_id)
        finally:
            await connection.close()
        assert both["rows"] == both["progress_done"]
        return
    row = await job_row(runner_url, job_id)
    rows = await count(dest_url, "dst")
    assert row["progress_done"] <= rows <= row["progress_done"] + BATCH


async def test_cancel_mid_run_ends_cancelled_and_writes_no_batch_after(
        app: App, runner_env: dict[str, str], database_url: str, other_url: str, tmp_path: Path) -> None:
    await make_table(other_url, "src", ROWS)
    job_id = await enqueue(app, {"source": "other", "source_table": "src", "dest_table": "dst",
                                 "create_table": True, "batch_size": BATCH, "max_rows_per_second": RATE})
    log_path = tmp_path / "worker.log"
    worker = start_worker(runner_env, log_path=log_path, **WORKER_ENV)
    try:
        await wait_until(lambda: progressed(database_url, job_id, 0), timeout_s=60, interval_s=0.01)
        await app.queue.job_request_cancel(job_id)
        await wait_until(lambda: finished(database_url, job_id), timeout_s=10, interval_s=0.02)
        row = await job_row(database_url, job_id)
        rows_at_cancel = await count(database_url, "dst")
        await asyncio.sleep(1.5)
        assert await count(database_url, "dst") == rows_at_cancel
        assert worker.poll() is None, tail(log_path)
    finally:
        code = stop(worker)
    assert code == 0, tail(log_path)
    assert row["status"] == "cancelled"
    assert 0 < row["progress_done"] < ROWS
    assert rows_at_cancel == row["progress_done"]  # every committed batch is checkpointed, and no other


async def test_server_restart_mid_run_the_worker_survives_and_finishes_exactly(
        app: App, runner_env: dict[str, str], database_url: str, other_url: str, pg_server: TestServer,
        tmp_path: Path) -> None:
    if pg_server.embedded is None:
        pytest.fail("this test restarts the embedded test server; unset RUNNER_TEST_DATABASE_URL")
    await make_table(other_url, "src", ROWS)
    job_id = await enqueue(app, {"source": "other", "source_table": "src", "dest_table": "dst",
                                 "create_table": True, "batch_size": BATCH, "max_rows_per_second": RATE},
                           max_attempts=5)
    await app.close()  # its pooled connections would die with the server anyway
    worker = start_worker(runner_env, "--drain", log_path=tmp_path / "worker.log", **WORKER_ENV)
    try:
        await wait_until(lambda: progressed(database_url, job_id, 0), timeout_s=60, interval_s=0.01)
        await asyncio.to_thread(pg_server.restart)
        row = await job_row(database_url, job_id)
        # mid-run: still running, or already back to pending for a retry after the restart broke the attempt
        assert row["status"] in ("running", "pending") and row["progress_done"] < ROWS, "restart must hit mid-run"
        await wait_until(lambda: finished(database_url, job_id), timeout_s=120, interval_s=0.1)
        assert worker.wait(timeout=60) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        stop(worker)
    row = await job_row(database_url, job_id)
    assert row["status"] == "succeeded", row["last_error"]
    assert row["progress_done"] == row["progress_total"] == ROWS
    assert await digest(database_url, "dst") == await digest(other_url, "src")
