"""The keyed FIFO lock (``fifo_key``): jobs that share a key run one at a time, in id order, whichever
workers claim them; a retry keeps its place; a failed, cancelled or dead-and-rescued one is waited for
and then lets the next go; other keys and unkeyed jobs run alongside. Real PostgreSQL, real workers."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from runner.app import App
from runner.context import JobContext
from runner.errors import Snooze, UsageError
from runner.plugins import JobKind
from runner.queue import ClaimedJob, JobOutcome, NewJob
from runner.worker import Worker
from tests.conftest import finished_row, run_cli, start_worker, wait_exit
from tests.pg import wait_until
from tests.stress import log_lines

FAST = {"RUNNER_POLL_INTERVAL": "0.05", "RUNNER_RETRY_BACKOFF_BASE": "0", "RUNNER_RETRY_BACKOFF_MAX": "0",
        "RUNNER_RESCUE_INTERVAL": "0.2"}


async def _claim(app: App, limit: int = 50, worker: str = "t") -> list[ClaimedJob]:
    return await app.queue.job_claim(["default"], limit, worker, 30.0, ["record", "fail", "sleep"])


async def _succeed(app: App, claimed: list[ClaimedJob]) -> None:
    outcomes = [JobOutcome(c.id, c.lease_epoch, c.kind, "succeeded") for c in claimed]
    await app.queue.job_complete_many(outcomes)


async def _rows(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT id, fifo_key, status, attempts, recoveries, started_at, finished_at "
                            "FROM runner_jobs ORDER BY id")
    return [dict(r) for r in rows]


# started_at is its claim's transaction start and finished_at its completion's: the claim's snapshot, which
# saw the predecessor finished, is taken after its own start (planning; a preemption under CPU hogs), so a
# successor can show a start up to that long before the predecessor's finish (0.8 ms seen) without any
# overlap. A real overlap of the 0.3 s jobs below would be hundreds of milliseconds.
CLOCK_SLACK = timedelta(milliseconds=100)


def _assert_one_at_a_time_in_id_order(rows: list[dict[str, Any]]) -> None:
    """Per key, in id order: each job started after the one before it finished (within CLOCK_SLACK)."""
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["fifo_key"] is not None:
            by_key[row["fifo_key"]].append(row)
    for key, keyed in by_key.items():
        for before, after in itertools.pairwise(keyed):
            assert after["started_at"] >= before["finished_at"] - CLOCK_SLACK, (key, before, after)


async def test_a_claim_takes_only_the_oldest_job_of_each_key(app: App) -> None:
    ids = await app.queue.job_enqueue_many(
        [NewJob("record", {}, fifo_key="a"), NewJob("record", {}, fifo_key="b"), NewJob("record", {}, fifo_key="a"),
         NewJob("record", {}), NewJob("record", {}, fifo_key="b"), NewJob("record", {})])
    a1, b1, a2, free1, b2, free2 = ids
    first = await _claim(app)
    assert sorted(c.id for c in first) == sorted([a1, b1, free1, free2])
    assert await _claim(app) == []  # a2 and b2 wait for a1 and b1, which are running
    await _succeed(app, [c for c in first if c.id == a1])
    second = await _claim(app)
    assert [c.id for c in second] == [a2]
    await _succeed(app, [c for c in first if c.id == b1])
    assert [c.id for c in await _claim(app)] == [b2]


async def test_a_retry_keeps_its_place_and_a_failure_lets_the_next_go(app: App, conn: asyncpg.Connection) -> None:
    head, tail = await app.queue.job_enqueue_many(
        [NewJob("fail", {}, fifo_key="k", max_attempts=2), NewJob("record", {}, fifo_key="k")])
    (claimed,) = await _claim(app)
    assert claimed.id == head
    await app.queue.job_complete_many([JobOutcome(head, claimed.lease_epoch, "fail", "error", "boom", 0.0)])
    assert await conn.fetchval("SELECT status FROM runner_jobs WHERE id = $1", head) == "pending"
    (again,) = await _claim(app)  # the retried head, not the job behind it
    assert again.id == head
    await app.queue.job_complete_many([JobOutcome(head, again.lease_epoch, "fail", "error", "boom")])
    assert [c.id for c in await _claim(app)] == [tail]


async def test_a_head_waiting_out_its_backoff_still_holds_the_key(app: App) -> None:
    head, tail = await app.queue.job_enqueue_many(
        [NewJob("fail", {}, fifo_key="k"), NewJob("record", {}, fifo_key="k")])
    (claimed,) = await _claim(app)
    await app.queue.job_complete_many([JobOutcome(head, claimed.lease_epoch, "fail", "error", "boom", 3600.0)])
    assert await _claim(app) == []
    await app.queue.job_request_cancel(head)  # cancelling the waiting head frees the key
    assert [c.id for c in await _claim(app)] == [tail]


async def test_concurrent_claims_never_take_two_jobs_of_one_key(app: App, conn: asyncpg.Connection) -> None:
    keys = [f"k{i}" for i in range(5)]
    await app.queue.job_enqueue_many([NewJob("record", {}, fifo_key=k) for _ in range(20) for k in keys])
    for _ in range(20):  # each round: four claims at once take the five heads, no more
        batches = await asyncio.gather(*(_claim(app, 10, f"w{i}") for i in range(4)))
        claimed = [c for batch in batches for c in batch]
        running = await conn.fetch("SELECT fifo_key, count(*) AS n FROM runner_jobs WHERE status = 'running' "
                                   "GROUP BY fifo_key")
        assert sorted((r["fifo_key"], r["n"]) for r in running) == [(k, 1) for k in keys]
        assert len(claimed) == len(keys)
        await _succeed(app, claimed)
    assert await _claim(app) == []
    _assert_one_at_a_time_in_id_order(await _rows(conn))


async def test_workers_run_each_key_in_order_and_the_keys_side_by_side(
    runner_env: dict[str, str], app: App, conn: asyncpg.Connection
) -> None:
    keys = ["a", "b", "c", "d"]
    await app.queue.job_enqueue_many(
        [NewJob("record", {"seconds": 0.3}, fifo_key=k) for _ in range(5) for k in keys]
        + [NewJob("record", {"seconds": 0.3}) for _ in range(8)])
    workers = [start_worker(runner_env, "--drain", RUNNER_CONCURRENCY="8",
                            log_path=None, RUNNER_WORKER_ID=f"w{i}", **FAST) for i in range(2)]
    assert [await wait_exit(w) for w in workers] == [0, 0]
    rows = await _rows(conn)
    assert {r["status"] for r in rows} == {"succeeded"}
    assert await conn.fetchval("SELECT count(*) FROM runner_executions") == 28
    _assert_one_at_a_time_in_id_order(rows)
    heads = [next(r for r in rows if r["fifo_key"] == k) for k in keys]
    # Different keys are not serialised behind each other: all four heads ran at one time.
    assert max(h["started_at"] for h in heads) < min(h["finished_at"] for h in heads)


async def test_a_failed_or_cancelled_job_lets_the_next_of_its_key_run(
    runner_env: dict[str, str], app: App, conn: asyncpg.Connection
) -> None:
    ids = await app.queue.job_enqueue_many([
        NewJob("fail", {}, fifo_key="f", max_attempts=2), NewJob("record", {}, fifo_key="f"),
        NewJob("record", {"seconds": 600, "log_start": True}, fifo_key="c"), NewJob("record", {}, fifo_key="c"),
    ])
    failing, after_failure, hung, after_cancel = ids
    worker = start_worker(runner_env, "--drain", log_path=None, **FAST)
    try:
        await wait_until(lambda: finished_row(app, after_failure), timeout_s=60)
        await wait_until(lambda: _status_is(conn, hung, "running"), timeout_s=60)
        assert await conn.fetchval("SELECT status FROM runner_jobs WHERE id = $1", after_cancel) == "pending"
        await app.cancel(hung)
        assert await wait_exit(worker) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    rows = {r["id"]: r for r in await _rows(conn)}
    assert (rows[failing]["status"], rows[failing]["attempts"]) == ("failed", 2)
    assert [rows[i]["status"] for i in (after_failure, hung, after_cancel)] == ["succeeded", "cancelled", "succeeded"]
    _assert_one_at_a_time_in_id_order(list(rows.values()))


async def _status_is(conn: asyncpg.Connection, job_id: int, status: str) -> bool:
    return bool(await conn.fetchval("SELECT status = $2 FROM runner_jobs WHERE id = $1", job_id, status))


async def test_the_key_waits_for_a_killed_workers_job_to_be_rescued_and_rerun(
    runner_env: dict[str, str], app: App, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    head, tail = await app.queue.job_enqueue_many([
        NewJob("record", {"seconds": 600, "log_start": True}, fifo_key="k"), NewJob("record", {}, fifo_key="k")])
    first_log = tmp_path / "first.log"
    first = start_worker(runner_env, log_path=first_log, **FAST)
    await wait_until(lambda: _logged(first_log, "record started"), timeout_s=60)
    os.kill(first.pid, signal.SIGKILL)
    await wait_exit(first)
    # Its rerun need not take ten minutes: a payload is read at each claim, so shorten it for the rerun.
    await conn.execute("""UPDATE runner_jobs SET payload = '{"seconds": 0, "log_start": true}' WHERE id = $1""",
                       head)
    second_log = tmp_path / "second.log"
    second = start_worker(runner_env, "--drain", log_path=second_log, **FAST)
    assert await wait_exit(second) == 0
    rows = {r["id"]: r for r in await _rows(conn)}
    assert rows[head]["recoveries"] == 1 and rows[head]["status"] == "succeeded"
    assert rows[tail]["status"] == "succeeded"
    assert rows[tail]["started_at"] >= rows[head]["finished_at"] - CLOCK_SLACK
    assert [line["job_id"] for line in log_lines(second_log, "record started")] == [head]


async def _logged(path: Path, event: str) -> bool:
    return path.exists() and bool(log_lines(path, event))


async def test_a_bad_fifo_key_is_refused_before_anything_is_written(
    app: App, runner_env: dict[str, str], conn: asyncpg.Connection
) -> None:
    for key in ("", "x" * 10_000):
        with pytest.raises(UsageError, match="fifo key"):
            await app.enqueue("sleep", {}, fifo_key=key)
        done = run_cli(runner_env, "enqueue", "sleep", "--fifo-key", key)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "fifo key" in done.stderr
    assert await conn.fetchval("SELECT count(*) FROM runner_jobs") == 0


async def test_a_job_shows_its_fifo_key(app: App, runner_env: dict[str, str]) -> None:
    job_id = await app.enqueue("sleep", {}, fifo_key="account-7")
    assert (await app.get(job_id)).fifo_key == "account-7"
    shown = run_cli(runner_env, "show", str(job_id), "--json")
    assert shown.returncode == 0, shown.stderr
    assert '"fifo_key": "account-7"' in shown.stdout


async def test_the_end_of_a_keyed_job_wakes_the_workers_for_the_next(
    runner_env: dict[str, str], app: App, conn: asyncpg.Connection
) -> None:
    # No poll for an hour: only the NOTIFY sent when a keyed job ends (through the completer for `sleep`,
    # in the handler's own transaction for `record`) can start the next job of its key in time.
    await app.queue.job_enqueue_many(
        [NewJob(kind, {}, fifo_key=kind) for _ in range(5) for kind in ("sleep", "record")])
    workers = [start_worker(runner_env, "--drain", log_path=None, RUNNER_WORKER_ID=f"w{i}",
                            RUNNER_POLL_INTERVAL="3600") for i in range(2)]
    try:
        assert [await wait_exit(w, timeout_s=120) for w in workers] == [0, 0]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    rows = await _rows(conn)
    assert [r["status"] for r in rows] == ["succeeded"] * 10
    _assert_one_at_a_time_in_id_order(rows)


async def test_a_retried_job_goes_back_to_its_place_and_a_delayed_one_holds_the_key(app: App) -> None:
    first, second = await app.queue.job_enqueue_many(
        [NewJob("fail", {}, fifo_key="r"), NewJob("record", {}, fifo_key="r")])
    (claimed,) = await _claim(app)
    await app.queue.job_complete_many([JobOutcome(first, claimed.lease_epoch, "fail", "fatal", "boom")])
    (running,) = await _claim(app)
    assert running.id == second
    await app.retry(first)
    assert await _claim(app) == []  # the retried job waits for the running one, then goes first
    await _succeed(app, [running])
    assert [c.id for c in await _claim(app)] == [first]
    delayed, behind = await app.queue.job_enqueue_many(
        [NewJob("record", {}, fifo_key="d", delay_s=3600), NewJob("record", {}, fifo_key="d")])
    assert await _claim(app) == []
    assert await app.queue.job_request_cancel(delayed)
    assert [c.id for c in await _claim(app)] == [behind]


async def test_a_coalesced_enqueue_joins_its_keys_waiting_job_and_holds_it_until_commit(
        app: App, conn: asyncpg.Connection) -> None:
    """``NewJob(coalesce=True)``: while its key has a waiting job of the kind, no other is added (the id
    returned is that job's, created False), and a claim cannot take the waiting job until the enqueuing
    transaction commits, so the job, once it runs, sees what that transaction wrote; a joined job runs no
    later than the joining one would have. With the key's job running and none waiting, a new one is added;
    another kind or key is not joined."""
    def coalesced(key: str = "k", kind: str = "record") -> NewJob:
        return NewJob(kind, {"seconds": 0}, fifo_key=key, coalesce=True)

    [(first, created)] = await app.enqueue_jobs([coalesced()])
    assert created
    notified: list[str] = []
    await conn.add_listener("runner_jobs", lambda *args: notified.append(args[-1]))
    async with app.db.transaction() as tx:
        assert await app.enqueue_jobs([coalesced()], connection=tx) == [(first, False)]
        assert await _claim(app) == []  # locked by the open transaction: skipped, not taken
    # a claim that skipped it may have gone to sleep: the commit wakes the workers of its queue
    await wait_until(lambda: asyncio.sleep(0, bool(notified)), 10)
    assert notified == ["default"]
    [claimed] = await _claim(app)
    assert claimed.id == first
    [(second, created)] = await app.enqueue_jobs([coalesced()])  # the first runs: a new one waits
    assert created and second != first
    assert await app.enqueue_jobs([coalesced(), coalesced("other"), coalesced(kind="sleep")]) == [
        (second, False), (second + 1, True), (second + 2, True)]
    later = NewJob("record", {"seconds": 0}, delay_s=3600, fifo_key="late", coalesce=True)
    [(late, _)] = await app.enqueue_jobs([later])
    assert await app.enqueue_jobs([coalesced("late")]) == [(late, False)]  # joined: it runs now, not in an hour
    assert await conn.fetchval("SELECT run_at <= now() FROM runner_jobs WHERE id = $1", late)
    with pytest.raises(UsageError, match="coalesce needs a fifo_key"):
        await app.enqueue_jobs([NewJob("record", {}, coalesce=True)])
    statuses = [r["status"] for r in await _rows(conn)]
    assert statuses == ["running", "pending", "pending", "pending", "pending"]


async def test_a_snoozed_job_runs_again_using_no_attempt_and_its_key_waits_for_it(
    app: App, conn: asyncpg.Connection
) -> None:
    """runner.Snooze: back to pending for its delay, attempts untouched (max_attempts=1 still runs it three
    times), recorded as snoozed; the next job of its key waits until it has really ended."""
    runs: list[int] = []

    async def poll(ctx: JobContext) -> dict[str, int]:
        runs.append(ctx.job.id)
        if ctx.payload["snoozes"] > runs.count(ctx.job.id) - 1:
            raise Snooze(0.05, "not ready yet")
        return {"runs": runs.count(ctx.job.id)}

    app.registry.add(JobKind("poll", poll, max_attempts=1))
    first, second = await app.queue.job_enqueue_many(
        [NewJob("poll", {"snoozes": 2}, fifo_key="k"), NewJob("poll", {"snoozes": 0}, fifo_key="k")])
    worker = Worker(app, install_signal_handlers=False)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: conn.fetchval(
            "SELECT count(*) = 2 FROM runner_jobs WHERE status = 'succeeded'"), 30)
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
    assert runs == [first, first, first, second]
    row = await conn.fetchrow("SELECT attempts, result::text, attempt_log::text FROM runner_jobs WHERE id = $1", first)
    assert row["attempts"] == 0 and json.loads(row["result"]) == {"runs": 3}
    assert [a["outcome"] for a in json.loads(row["attempt_log"])] == ["snoozed", "snoozed", "succeeded"]
    with pytest.raises(ValueError):
        Snooze(-1)
