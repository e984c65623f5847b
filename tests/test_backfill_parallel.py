"""Parallel backfills: a parent job split into key-range chunks balanced by rows, run as jobs of their own by
any worker; exact under kill -9 of a worker and a restart of the server; cancel and retry reach the chunks."""

from __future__ import annotations

import asyncio
import functools
import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from runner.app import App
from runner.cli import status_snapshot
from runner.jobs.backfill import parallel
from runner.queue import JobFilter, NewJob
from runner.worker import Worker
from tests import test_backfill
from tests.conftest import run_cli, start_worker
from tests.pg import TestServer, wait_until
from tests.test_backfill import digest, execute, make_table
from tests.test_backfill_crash import WORKER_ENV, finished, stop, tail

other_url = test_backfill.other_url  # the fixture: a second database, the connection 'other'


async def enqueue(app: App, payload: dict[str, Any], max_attempts: int = 5) -> int:
    kind = app.registry.get("backfill")
    assert kind.validate is not None
    await kind.validate(payload, app)
    job_id, _ = await app.queue.job_enqueue(NewJob("backfill", payload, max_attempts=max_attempts))
    return job_id


async def drain(app: App) -> None:
    await Worker(app, drain=True, install_signal_handlers=False).run()


async def fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(url)
    try:
        return list(await connection.fetch(sql, *args))
    finally:
        await connection.close()


async def skewed_table(url: str) -> None:
    """4,000 rows whose keys are 3,000 dense ones and 1,000 spread over a billion: ranges cut by key
    value would put nearly every row in the first chunk."""
    await make_table(url, "public.src", 3000)
    await execute(url, "INSERT INTO public.src SELECT 1000000 * g, 1, 'far', now(), 1, NULL, NULL "
                       "FROM generate_series(1, 1000) g")


async def test_chunks_are_balanced_by_rows_and_the_copy_is_exact(app: App, database_url: str,
                                                                   other_url: str) -> None:
    await skewed_table(other_url)
    job_id = await enqueue(app, {"source": "other", "source_table": "public.src", "dest_table": "public.dst",
                                 "create_table": True, "batch_size": 300, "parallel": 4})
    await drain(app)
    job = await app.queue.job_get(job_id)
    assert job["status"] == "succeeded", job["last_error"]
    assert job["progress_done"] == job["progress_total"] == 4000
    result = job["result"]
    assert [c["rows"] for c in result["chunks"]] == [1000, 1000, 1000, 1000]  # exact quantiles below 200,000 rows
    assert (result["rows"], result["inserted"], result["skipped"]) == (4000, 4000, 0)
    chunks = await app.queue.job_children(job_id)
    assert [c["kind"] for c in chunks] == ["backfill_chunk"] * 4 and all(c["status"] == "succeeded" for c in chunks)
    # consecutive ranges, open at both ends: every key is in exactly one
    bounds = [(c["payload"]["chunk"]["after"], c["payload"]["chunk"]["upto"]) for c in chunks]
    assert bounds[0][0] is None and bounds[-1][1] is None
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(3))
    assert await digest(other_url, "public.src") == await digest(database_url, "public.dst")


async def test_a_sampled_split_of_a_large_table_stays_balanced(
        app: App, database_url: str, other_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Sampling starts above 200,000 rows; here above 10,000, from a ~15% block sample of 100,000 rows.
    monkeypatch.setattr(parallel, "SAMPLE_ABOVE_ROWS", 10_000)
    monkeypatch.setattr(parallel, "SAMPLE_ROWS", 15_000)
    await execute(other_url, "CREATE TABLE public.big (id bigint PRIMARY KEY, v int)")
    await execute(other_url,  # skewed: the keys are squares
                  "INSERT INTO public.big SELECT g::bigint * g, g FROM generate_series(1, 100000) g")
    job_id = await enqueue(app, {"source": "other", "source_table": "public.big", "dest_table": "public.big",
                                 "create_table": True, "batch_size": 5000, "parallel": 4})
    await drain(app)
    job = await app.queue.job_get(job_id)
    assert job["status"] == "succeeded", job["last_error"]
    rows = [c["rows"] for c in job["result"]["chunks"]]
    assert sum(rows) == 100_000 and all(20_000 <= r <= 30_000 for r in rows), rows  # 25,000 each, within 20%
    assert await digest(other_url, "public.big") == await digest(database_url, "public.big")


@pytest.mark.parametrize("how", ["by id", "by filter"])
async def test_cancelling_the_parent_cancels_its_chunks(app: App, database_url: str, other_url: str,
                                                        how: str) -> None:
    await make_table(other_url, "public.src", 2000)
    job_id = await enqueue(app, {"source": "other", "source_table": "public.src", "dest_table": "public.dst",
                                 "create_table": True, "batch_size": 10, "parallel": 3,
                                 "max_rows_per_second": 200})  # slow: still running when cancelled
    worker = Worker(app, install_signal_handlers=False)
    running = asyncio.create_task(worker.run())
    try:
        async def chunks_moving() -> bool:
            chunks = await app.queue.job_children(job_id)
            return len(chunks) == 3 and all(c["progress_done"] > 0 for c in chunks)

        await wait_until(chunks_moving, timeout_s=60)

        async def parent_in_status() -> dict[str, Any] | None:  # its progress is its chunks' sum
            running = (await status_snapshot(app))["running"]
            parent = next((j for j in running if j["id"] == job_id and j["progress_done"] > 0), None)
            return parent if parent is not None and parent["rate_per_s"] else None

        parent = await wait_until(parent_in_status, timeout_s=30)
        assert parent["progress_total"] == 2000 and parent["eta_s"] is not None
        if how == "by id":
            assert await app.cancel(job_id) == "running"
        else:  # the parent alone matches: its own handler cancels its chunks
            assert await app.queue.job_cancel_where(JobFilter((), ("backfill",), ())) == 1

        async def all_cancelled() -> bool:
            jobs = [await app.queue.job_get(job_id), *await app.queue.job_children(job_id)]
            return all(j["status"] == "cancelled" for j in jobs)

        await wait_until(all_cancelled, timeout_s=30)
    finally:
        worker.request_stop()
        await running
    copied = (await fetch(database_url, "SELECT count(*) AS n FROM public.dst"))[0]["n"]
    assert 0 < copied < 2000


async def test_a_failed_chunk_fails_the_parent_and_retry_reruns_only_it(
        app: App, database_url: str, other_url: str) -> None:
    await make_table(other_url, "public.src", 3000)
    # The destination refuses one row (id 2500, in the last chunk): a data error, which fails that chunk.
    await execute(database_url, f"CREATE TABLE public.dst ({test_backfill.COLUMNS_DDL}, CHECK (id <> 2500))")
    job_id = await enqueue(app, {"source": "other", "source_table": "public.src", "dest_table": "public.dst",
                                 "batch_size": 100, "parallel": 3})
    await drain(app)
    job = await app.queue.job_get(job_id)
    assert job["status"] == "failed"
    assert job["attempts"] == 1  # JobFailed: no retry of its own
    assert "1 of 3 chunks did not succeed: chunk 3" in job["last_error"] and "id=2500" in job["last_error"]
    before = {c["id"]: c["status"] for c in await app.queue.job_children(job_id)}
    assert sorted(before.values()) == ["failed", "succeeded", "succeeded"]

    await execute(database_url, "ALTER TABLE public.dst DROP CONSTRAINT dst_id_check")
    await app.retry(job_id)
    statuses = {c["id"]: c["status"] for c in await app.queue.job_children(job_id)}
    assert sorted(statuses.values()) == ["pending", "succeeded", "succeeded"]  # the succeeded ones keep their work
    await drain(app)
    job = await app.queue.job_get(job_id)
    assert job["status"] == "succeeded", job["last_error"]
    assert len(await app.queue.job_children(job_id)) == 3  # the resumed parent made no new chunks
    assert await digest(other_url, "public.src") == await digest(database_url, "public.dst")


# --- real worker processes ---------------------------------------------------------------------------------
ROWS = 40_000


async def owners_of_running_chunks(url: str, parent: int) -> set[str]:
    rows = await fetch(url, "SELECT lease_owner FROM runner_jobs WHERE parent_id = $1 AND status = 'running' "
                            "AND progress_done > 0", parent)
    return {r["lease_owner"] for r in rows}


async def test_parallel_4_on_2_worker_processes_survives_kill_9_and_a_server_restart(
        app: App, runner_env: dict[str, str], database_url: str, other_url: str, pg_server: TestServer,
        tmp_path: Path) -> None:
    if pg_server.embedded is None:
        pytest.fail("this test restarts the embedded test server; unset RUNNER_TEST_DATABASE_URL")
    await make_table(other_url, "public.src", ROWS)
    job_id = await enqueue(app, {"source": "other", "source_table": "public.src", "dest_table": "public.dst",
                                 "create_table": True, "batch_size": 100, "parallel": 4,
                                 "max_rows_per_second": 1000}, max_attempts=20)  # each chunk: ~10 s
    await app.close()  # its pooled connections would die with the server anyway
    env = {**WORKER_ENV, "RUNNER_BACKFILL_CHUNKS_PER_WORKER": "2"}
    logs = [tmp_path / f"worker-{n}.log" for n in range(3)]
    workers = [start_worker(runner_env, log_path=logs[n], **env) for n in range(2)]
    try:
        # two chunks on each worker: the cap sends the third and fourth to the other one
        two_each = functools.partial(owners_of_running_chunks, database_url, job_id)
        await wait_until(lambda: _has(two_each, 2), timeout_s=60, interval_s=0.05)
        workers[0].kill()  # mid-chunk: its chunks (and maybe the parent) are rescued after the lease
        workers[0].wait()
        workers.append(start_worker(runner_env, log_path=logs[2], **env))
        await asyncio.to_thread(pg_server.restart)
        rows = await fetch(database_url, "SELECT status FROM runner_jobs WHERE id = $1", job_id)
        assert rows[0]["status"] in ("running", "pending"), "the restart must come mid-run"
        await wait_until(functools.partial(finished, database_url, job_id), timeout_s=180, interval_s=0.2)
    finally:
        for worker in workers[1:]:
            assert stop(worker) == 0, tail(logs[workers.index(worker)])
    job = (await fetch(database_url, "SELECT status, last_error, progress_done, progress_total, result::text "
                                     "FROM runner_jobs WHERE id = $1", job_id))[0]
    assert job["status"] == "succeeded", job["last_error"]
    assert job["progress_done"] == job["progress_total"] == ROWS
    result = json.loads(job["result"])
    assert len(result["chunks"]) == 4 and result["rows"] == ROWS
    assert sum(c["recoveries"] for c in result["chunks"]) >= 1  # the killed worker's chunks were rescued
    assert await digest(other_url, "public.src") == await digest(database_url, "public.dst")


async def _has(owners: Any, n: int) -> bool:
    return len(await owners()) >= n


async def test_the_cli_copies_in_parallel_waits_and_shows_the_chunks(
        app: App, runner_env: dict[str, str], database_url: str, other_url: str, tmp_path: Path) -> None:
    await make_table(other_url, "public.src", 3000)
    log = tmp_path / "worker.log"
    worker = start_worker(runner_env, log_path=log, **WORKER_ENV)
    try:
        copied = await asyncio.to_thread(run_cli, runner_env, "backfill", "public.src", "public.dst", "--source",
                                         "other", "--create-table", "--parallel", "3", "--batch-size", "200",
                                         "--wait", "--verify")
    finally:
        assert stop(worker) == 0, tail(log)
    assert copied.returncode == 0, copied.stderr
    job_id = int(copied.stdout.split()[0])
    assert f"job {job_id} succeeded: 3,000 rows in 3 chunks (3,000 inserted, 0 updated, 0 skipped)" in copied.stderr
    assert "equal:" in copied.stdout  # --verify after the copy
    shown = await asyncio.to_thread(run_cli, runner_env, "show", str(job_id), "--json")
    assert shown.returncode == 0, shown.stderr
    children = json.loads(shown.stdout)["children"]
    assert [c["status"] for c in children] == ["succeeded"] * 3
    assert [c["chunk"]["index"] for c in children] == [1, 2, 3]
    table = await asyncio.to_thread(run_cli, runner_env, "show", str(job_id), COLUMNS="200")
    assert "3 jobs made by this one" in table.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--parallel", "0"], "--parallel must be 1 to 64"),
    (["--parallel", "2", "--since-column", "created_at"], "parallel and since_column do not go together"),
    (["--batch-bytes", "10"], "batch_bytes must be an integer from 65,536"),
])
async def test_bad_parallel_options_are_one_line_and_exit_2(
        runner_env: dict[str, str], other_url: str, args: list[str], message: str) -> None:
    result = await asyncio.to_thread(run_cli, runner_env, "backfill", "public.src", "public.dst", "--source",
                                     "other", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
