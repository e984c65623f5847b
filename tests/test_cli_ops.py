"""Operations from the CLI: list with filters and keyset paging, bulk cancel/retry/purge by filter, status by
queue with delayed jobs, and `enqueue --wait` reporting a failure or the lack of a live worker."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from runner.app import App
from runner.errors import UsageError
from runner.queue import JobFilter, NewJob
from tests.conftest import ROOT, cli_env, run_cli, start_worker, wait_exit
from tests.test_cli import one_error_line


async def enqueue(app: App, kind: str, n: int = 1, queue: str = "default", delay_s: float = 0.0) -> list[int]:
    payload = {"seconds": 60} if kind == "sleep" else {}
    return await app.queue.job_enqueue_many([NewJob(kind, payload, queue, delay_s=delay_s) for _ in range(n)])


async def set_status(conn: asyncpg.Connection, ids: list[int], status: str) -> None:
    """Put jobs in a state as a worker would leave them (running: leased; finished: finished_at set)."""
    if status == "running":
        await conn.execute(
            """UPDATE runner_jobs SET status = 'running', lease_owner = 'w-test', lease_epoch = lease_epoch + 1,
                      lease_expires_at = now() + interval '1 hour', started_at = now() WHERE id = ANY($1)""", ids)
    else:
        await conn.execute(
            """UPDATE runner_jobs SET status = $2, finished_at = now(), attempts = 1,
                      last_error = CASE WHEN $2 = 'failed' THEN 'JobFailed: boom' || chr(10) || 'Traceback ...' END
               WHERE id = ANY($1)""", ids, status)


async def statuses(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch("SELECT status, count(*) AS n FROM runner_jobs GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


def listed(runner_env: dict[str, str], *args: str) -> dict[str, Any]:
    result = run_cli(runner_env, "list", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


async def test_list_filters_and_keyset_paging(runner_env: dict[str, str], app: App, conn: asyncpg.Connection) -> None:
    a = await enqueue(app, "noop", 3, queue="a")
    b = await enqueue(app, "sleep", 2, queue="b")
    await set_status(conn, a[:1], "failed")

    everything = listed(runner_env)
    jobs = everything["jobs"]
    assert [j["id"] for j in jobs] == sorted(a + b, reverse=True)  # newest first
    assert everything["next_before_id"] is None
    assert set(jobs[0]) == set(await app.queue.job_get(jobs[0]["id"]))  # the columns of `show`

    assert [j["id"] for j in listed(runner_env, "--queue", "a")["jobs"]] == sorted(a, reverse=True)
    assert [j["id"] for j in listed(runner_env, "--kind", "sleep")["jobs"]] == sorted(b, reverse=True)
    failed = listed(runner_env, "--status", "failed", "--status", "cancelled")["jobs"]
    assert [(j["id"], j["last_error"]) for j in failed] == [(a[0], "JobFailed: boom\nTraceback ...")]
    pending_a = listed(runner_env, "--status", "pending", "--queue", "a", "--queue", "b", "--kind", "noop")
    assert [j["id"] for j in pending_a["jobs"]] == sorted(a[1:], reverse=True)

    # Keyset pages of 2: every job once, in order, and the last page says there is no next one.
    seen: list[int] = []
    before: int | None = None
    while True:
        page = listed(runner_env, "--limit", "2", *(["--before-id", str(before)] if before else []))
        seen += [j["id"] for j in page["jobs"]]
        if page["next_before_id"] is None:
            break
        before = page["next_before_id"]
        assert before == seen[-1]
    assert seen == sorted(a + b, reverse=True)

    table = run_cli(runner_env, "list", "--limit", "2", "--queue", "a", COLUMNS="200")
    assert table.returncode == 0, table.stderr
    assert f"next page: runner list --queue a --limit 2 --before-id {sorted(a)[1]}" in table.stdout
    assert "JobFailed: boom" not in table.stdout  # only two newest rows: a[2], a[1]
    last = run_cli(runner_env, "list", "--queue", "a", "--status", "failed", COLUMNS="200")
    assert "JobFailed: boom" in last.stdout and "Traceback" not in last.stdout  # the first line only
    assert "next page" not in last.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["list", "--status", "finished"], "unknown status 'finished'"),
        (["list", "--limit", "0"], "--limit must be positive"),
        (["cancel"], "a job id, or at least one of --status, --kind, --queue"),
        (["retry"], "a job id, or at least one of --status, --kind, --queue"),
        (["cancel", "1", "--kind", "noop"], "not both"),
        (["cancel", "--status", "succeeded"], "succeeded jobs cannot be cancelled"),
        (["retry", "--status", "running"], "running jobs cannot be retried"),
        (["purge", "--status", "pending"], "only finished jobs"),
        (["purge", "--status", "succeeded", "--older-than", "-1"], "--older-than must not be negative"),
    ],
)
async def test_operations_usage_errors_exit_2(
    runner_env: dict[str, str], app: App, args: list[str], fragment: str
) -> None:
    await enqueue(app, "noop")
    result = run_cli(runner_env, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert fragment in one_error_line(result.stderr)
    assert await app.queue.job_counts_by_status() == {"pending": 1}


async def test_bulk_cancel_retry_and_purge_by_filter(
    runner_env: dict[str, str], app: App, conn: asyncpg.Connection
) -> None:
    pending_a = await enqueue(app, "noop", 3, queue="a")
    running_a = await enqueue(app, "noop", 1, queue="a")
    await set_status(conn, running_a, "running")
    other = await enqueue(app, "noop", 2, queue="b")

    cancelled = run_cli(runner_env, "cancel", "--queue", "a")
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == "4 jobs cancelled or asked to stop"
    rows = {r["id"]: r for r in await conn.fetch("SELECT id, status, cancel_requested FROM runner_jobs")}
    assert {rows[i]["status"] for i in pending_a} == {"cancelled"}
    assert (rows[running_a[0]]["status"], rows[running_a[0]]["cancel_requested"]) == ("running", True)
    assert {rows[i]["status"] for i in other} == {"pending"}
    assert run_cli(runner_env, "cancel", "--queue", "a").stdout.strip() == "0 jobs cancelled or asked to stop"

    await set_status(conn, other[:1], "failed")
    retried = run_cli(runner_env, "retry", "--status", "failed", "--status", "cancelled", "--queue", "a")
    assert (retried.returncode, retried.stdout.strip()) == (0, "3 jobs pending again"), retried.stderr
    assert run_cli(runner_env, "retry", "--kind", "noop").stdout.strip() == "1 job pending again"  # other[0]
    assert await statuses(conn) == {"pending": 5, "running": 1}

    finished = await enqueue(app, "sleep", 5, queue="c")
    await set_status(conn, finished[:2], "succeeded")
    await set_status(conn, finished[2:4], "failed")
    await set_status(conn, finished[4:], "cancelled")
    assert run_cli(runner_env, "purge", "--status", "succeeded", "--older-than", "3600").stdout.strip() == \
        "0 jobs deleted"
    purged = run_cli(runner_env, "purge", "--status", "succeeded", "--status", "failed", "--kind", "sleep")
    assert (purged.returncode, purged.stdout.strip()) == (0, "4 jobs deleted"), purged.stderr
    assert await statuses(conn) == {"pending": 5, "running": 1, "cancelled": 1}

    # Purge never deletes pending or running jobs, whatever the filter; it works in bounded batches.
    with pytest.raises(UsageError):
        JobFilter(statuses=("pending", "bogus"))
    with pytest.raises(UsageError):
        await app.queue.job_purge_where(JobFilter(statuses=("running",)))
    more = await enqueue(app, "noop", 5, queue="d")
    await set_status(conn, more, "succeeded")
    assert await app.queue.job_purge_where(JobFilter(), batch=2) == 6  # 5 succeeded + 1 cancelled
    assert await statuses(conn) == {"pending": 5, "running": 1}


async def test_bulk_cancel_notifies_running_jobs(app: App, conn: asyncpg.Connection, database_url: str) -> None:
    ids = await enqueue(app, "sleep", 3)
    await set_status(conn, ids[:2], "running")
    listener = await asyncpg.connect(database_url)
    heard: list[str] = []
    try:
        await listener.add_listener("runner_cancel", lambda *args: heard.append(args[3]))
        assert await app.queue.job_cancel_where(JobFilter(kinds=("sleep",))) == 3
        await asyncio.sleep(0.2)
    finally:
        await listener.close()
    assert sorted(heard) == sorted(str(i) for i in ids[:2])  # the running ones: their handlers stop


async def test_status_json_by_queue_with_delayed(
    runner_env: dict[str, str], app: App, conn: asyncpg.Connection
) -> None:
    await enqueue(app, "sleep", 1, queue="q1")
    await enqueue(app, "sleep", 2, queue="q1", delay_s=3600)
    await enqueue(app, "noop", 1, queue="q1")
    running = await enqueue(app, "noop", 2, queue="q2")
    await set_status(conn, running[:1], "running")

    result = run_cli(runner_env, "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["jobs"] == {"pending": 3, "delayed": 2, "running": 1, "succeeded": 0, "failed": 0, "cancelled": 0}
    q1, q2 = status["by_queue"]["q1"], status["by_queue"]["q2"]
    assert (q1["jobs"]["pending"], q1["jobs"]["delayed"]) == (2, 2)
    assert q1["by_kind"]["sleep"]["delayed"] == 2 and q1["by_kind"]["sleep"]["pending"] == 1
    assert q1["by_kind"]["noop"]["pending"] == 1
    assert (q2["jobs"]["pending"], q2["jobs"]["running"], q2["jobs"]["delayed"]) == (1, 1, 0)
    assert status["by_kind"]["sleep"]["delayed"] == 2
    assert [j["id"] for j in status["running"]] == running[:1]

    table = run_cli(runner_env, "status")
    assert table.returncode == 0, table.stderr
    assert "delayed" in table.stdout and "q1" in table.stdout and "q2" in table.stdout


async def test_enqueue_wait_prints_the_failure(runner_env: dict[str, str], tmp_path: Path) -> None:
    worker = start_worker(runner_env, log_path=tmp_path / "worker.log")
    try:
        result = run_cli(runner_env, "enqueue", "fail", "--payload", '{"message": "boom"}', "--max-attempts", "2",
                         "--wait", timeout=60)
    finally:
        worker.terminate()
        await wait_exit(worker, 30)
    assert result.returncode == 1, (result.stdout, result.stderr)
    job_id = int(result.stdout.strip())
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"error: job {job_id} failed after 2 of 2 attempts: ")
    assert "boom" in errors[0]
    assert "no live worker" not in result.stderr


async def test_enqueue_wait_says_no_live_worker_serves_the_queue(runner_env: dict[str, str], app: App) -> None:
    waiter = subprocess.Popen(
        [sys.executable, "-m", "runner", "enqueue", "noop", "--queue", "lonely", "--wait"],
        env=cli_env(runner_env), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True,
    )
    worker = None
    try:
        assert waiter.stderr is not None
        expected = "no live worker serves queue 'lonely' (start `runner worker -q lonely`)"
        started = time.monotonic()
        while True:  # wait on the output itself (the CLI's JSON log lines go to stderr too)
            line = await asyncio.wait_for(asyncio.to_thread(waiter.stderr.readline), 30)
            assert line, "the waiting command exited without saying no worker serves the queue"
            if expected in line:
                break
        assert time.monotonic() - started < 20
        assert waiter.poll() is None  # it keeps waiting
        # A worker for that queue comes: the job runs and the wait ends with success.
        worker = start_worker(runner_env, "--queue", "lonely")
        assert await wait_exit(waiter, 60) == 0
        assert waiter.stderr.read().count("no live worker") == 0  # said once
    finally:
        if waiter.poll() is None:
            waiter.kill()
        waiter.wait(10)
        if worker is not None:
            worker.terminate()
            await wait_exit(worker, 30)
