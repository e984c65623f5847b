"""The queue against a real PostgreSQL: ordering, dedupe, fencing, retries, recovery, cancel."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from runner import queue_sql
from runner.app import App
from runner.config import Settings
from runner.queue import ClaimedJob, JobOutcome, NewJob, WorkerIdentity
from runner.worker import Worker
from tests.conftest import finished_row
from tests.pg import holds, wait_until

LEASE_S = 2.0


async def claim(app: App, limit: int, worker: str = "w1", queues: tuple[str, ...] = ("default",),
                kinds: list[str] | None = None) -> list[ClaimedJob]:
    return await app.queue.job_claim(list(queues), limit, worker, LEASE_S, kinds or list(app.registry.kinds))


async def run_worker(app: App, **kwargs: object) -> None:
    await Worker(app, drain=True, install_signal_handlers=False, **kwargs).run()  # type: ignore[arg-type]


async def test_claim_order_is_priority_then_run_at_then_id(app: App) -> None:
    # Ids run against the expected order, so ordering by id alone, or by run_at before priority, fails.
    [a] = await app.queue.job_enqueue_many([NewJob("noop", {"n": "a"}, delay_s=-10)])
    [b] = await app.queue.job_enqueue_many([NewJob("noop", {"n": "b"}, delay_s=-20)])
    [c] = await app.queue.job_enqueue_many([NewJob("noop", {"n": "c"}, priority=5, delay_s=-1)])
    [d] = await app.queue.job_enqueue_many([NewJob("noop", {"n": "d"})])
    [z] = await app.queue.job_enqueue_many([NewJob("noop", {"n": "z"}, priority=-1, delay_s=-99)])
    await app.db.execute("UPDATE runner_jobs SET run_at = (SELECT run_at FROM runner_jobs WHERE id = $1) "
                         "WHERE id = $2", a, d)
    [delayed] = await app.queue.job_enqueue_many([NewJob("noop", {}, priority=9, delay_s=3600)])
    order = [job.id for _ in range(6) for job in await claim(app, 1)]
    assert order == [c, b, a, d, z]  # priority DESC, then run_at, then id; the delayed job not yet
    assert delayed not in order


async def test_claim_takes_only_the_kinds_given(app: App) -> None:
    [known] = await app.queue.job_enqueue_many([NewJob("noop", {})])
    [unknown] = await app.queue.job_enqueue_many([NewJob("not-deployed-yet", {}, priority=9)])
    assert [j.id for j in await claim(app, 10, kinds=["noop"])] == [known]
    assert (await app.queue.job_get(unknown))["status"] == "pending"
    assert [j.id for j in await claim(app, 10, kinds=["not-deployed-yet"])] == [unknown]


async def test_claim_respects_limit_and_queue(app: App) -> None:
    await app.queue.job_enqueue_many([NewJob("noop", {}, queue="other") for _ in range(5)])
    await app.queue.job_enqueue_many([NewJob("noop", {}) for _ in range(5)])
    claimed = await claim(app, 3)
    assert len(claimed) == 3 and all(j.queue == "default" for j in claimed)
    assert all(j.lease_epoch == 1 for j in claimed)


async def test_dedupe_key_unique_among_unfinished_jobs(app: App) -> None:
    first, created = await app.queue.job_enqueue(NewJob("noop", {}, dedupe_key="k"))
    again, created_again = await app.queue.job_enqueue(NewJob("noop", {}, dedupe_key="k"))
    assert created and not created_again and again == first
    await run_worker(app)
    after, created_after = await app.queue.job_enqueue(NewJob("noop", {}, dedupe_key="k"))
    assert created_after and after != first  # finished jobs no longer hold the key


async def test_delayed_job_runs_only_when_due(app: App) -> None:
    [job_id] = await app.queue.job_enqueue_many([NewJob("noop", {}, delay_s=1.0)])
    assert await claim(app, 10) == []
    await wait_until(lambda: app.db.fetchval("SELECT run_at <= now() FROM runner_jobs WHERE id = $1", job_id), 10)
    assert [j.id for j in await claim(app, 10)] == [job_id]


async def test_old_owner_writes_are_refused_after_a_rescue(app: App) -> None:
    [job_id] = await app.queue.job_enqueue_many([NewJob("noop", {})])
    [old] = await claim(app, 1, "old-worker")
    await app.db.execute("UPDATE runner_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1", job_id)
    [rescued] = await app.queue.job_rescue_stale(max_recoveries=3)
    assert (rescued.job_id, rescued.status) == (job_id, "pending")
    [new] = await claim(app, 1, "new-worker")
    assert new.lease_epoch == old.lease_epoch + 1

    # The old owner, still alive, tries to write progress, a checkpoint and a completion: nothing changes.
    assert not await app.queue.job_save_progress(job_id, old.lease_epoch, done=99, total=100, checkpoint={"k": 1})
    identity = WorkerIdentity("old-worker", ("default",), 1)
    assert (await app.queue.job_heartbeat([(job_id, old.lease_epoch)], identity, LEASE_S)).held == set()
    result = await app.queue.job_complete_many([JobOutcome(job_id, old.lease_epoch, "noop", "succeeded")])
    assert (result.written, result.busy) == ([], set())
    row = await app.queue.job_get(job_id)
    assert (row["status"], row["lease_owner"], row["progress_done"], row["checkpoint"]) == (
        "running", "new-worker", 0, None)

    # The new owner's writes land.
    assert await app.queue.job_save_progress(job_id, new.lease_epoch, done=5, total=10, checkpoint={"k": 2})
    [done] = (await app.queue.job_complete_many([JobOutcome(job_id, new.lease_epoch, "noop", "succeeded")])).written
    assert done.status == "succeeded"
    row = await app.queue.job_get(job_id)
    assert (row["status"], row["checkpoint"], row["progress_done"], row["attempts"], row["recoveries"]) == (
        "succeeded", {"k": 2}, 5, 1, 1)


async def test_live_worker_that_lost_its_lease_drops_the_job(app: App, settings: Settings) -> None:
    """Worker A stalls past its lease (its heartbeat is slow); B rescues and finishes; A writes nothing."""
    slow = settings.model_copy(update={"worker_id": "stalled-a", "heartbeat_interval": 30.0, "lease_timeout": 90.0})
    app_a = await App.open(slow)
    try:
        [job_id] = await app.queue.job_enqueue_many([NewJob("record", {"seconds": 2.5})])
        worker_a = Worker(app_a, install_signal_handlers=False)
        task_a = asyncio.create_task(worker_a.run())
        await wait_until(lambda: app.db.fetchval("SELECT status = 'running' FROM runner_jobs WHERE id = $1", job_id))
        # A claims nothing more (its handler runs on within the grace): otherwise A itself may take the
        # rescued job back before B does (seen under two CPU hogs), which is fine but not this test
        worker_a.request_stop()
        # the stop reaches A's fetcher on A's next turn of the loop (2.4 s later under two CPU hogs, when A
        # claimed the rescued job back first: lease epoch 3): the rescue waits for it
        await wait_until(lambda: holds(worker_a.fetcher.stopped.is_set()), 30)
        await app.db.execute(
            "UPDATE runner_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1", job_id)
        assert [j.job_id for j in await app.queue.job_rescue_stale(max_recoveries=3)] == [job_id]
        await run_worker(app)  # worker B claims and finishes the job
        # A's handler wakes up, tries to record and complete, and is refused: then A runs nothing.
        await wait_until(lambda: holds(not worker_a.executor.active), 30)
        await asyncio.wait_for(task_a, 30)
    finally:
        await app_a.close()
    row = await app.queue.job_get(job_id)
    executions = await app.db.fetch("SELECT worker_id, lease_epoch FROM runner_executions WHERE job_id = $1", job_id)
    assert row["status"] == "succeeded" and row["lease_epoch"] == 2
    assert [(e["worker_id"], e["lease_epoch"]) for e in executions] == [(settings.worker_id, 2)]


async def test_failure_retries_with_backoff_then_fails_with_the_error(app: App) -> None:
    [job_id] = await app.queue.job_enqueue_many([NewJob("fail", {"message": "boom"}, max_attempts=3)])
    worker = Worker(app, install_signal_handlers=False)
    task = asyncio.create_task(worker.run())
    row = await wait_until(lambda: finished_row(app, job_id), timeout_s=30)
    worker.request_stop()
    await task
    assert row["status"] == "failed" and row["attempts"] == 3
    assert "JobFailed: boom" in row["last_error"]


async def test_fatal_failure_does_not_retry(app: App) -> None:
    [job_id] = await app.queue.job_enqueue_many([NewJob("fail", {"message": "bad", "fatal": True})])
    await run_worker(app)
    row = await app.queue.job_get(job_id)
    assert (row["status"], row["attempts"]) == ("failed", 1)


async def test_failed_job_backoff_moves_run_at_into_the_future(app: App) -> None:
    [job_id] = await app.queue.job_enqueue_many([NewJob("noop", {}, max_attempts=5)])
    [job] = await claim(app, 1, "w")
    await app.queue.job_complete_many([JobOutcome(job_id, job.lease_epoch, "noop", "error", "e", delay_s=10.0)])
    row = await app.db.fetchrow("SELECT status, attempts, run_at - now() AS wait FROM runner_jobs WHERE id=$1", job_id)
    assert row["status"] == "pending" and row["attempts"] == 1
    assert 9 <= row["wait"].total_seconds() <= 10


async def test_recovery_cap_ends_in_failed(app: App) -> None:
    [job_id] = await app.queue.job_enqueue_many([NewJob("noop", {}, max_attempts=10)])
    for _ in range(3):  # max_recoveries = 2: two recoveries, the third lost lease fails it
        await claim(app, 1, "w")
        await app.db.execute("UPDATE runner_jobs SET lease_expires_at = now() - interval '1 second'")
        await app.queue.job_rescue_stale(max_recoveries=2)
    row = await app.queue.job_get(job_id)
    assert row["status"] == "failed" and row["recoveries"] == 3
    assert "recovery limit 2 reached" in row["last_error"]


async def test_rescue_is_safe_when_every_worker_runs_it_at_once(app: App) -> None:
    await app.queue.job_enqueue_many([NewJob("noop", {}) for _ in range(300)])
    await claim(app, 300, "dead")
    await app.db.execute("UPDATE runner_jobs SET lease_expires_at = now() - interval '1 second'")
    results = await asyncio.gather(*[app.queue.job_rescue_stale(max_recoveries=3, limit=100) for _ in range(6)])
    rescued = [job.job_id for batch in results for job in batch]
    assert len(rescued) == len(set(rescued)) == 300
    assert await app.db.fetchval("SELECT count(*) FROM runner_jobs WHERE recoveries = 1 AND status='pending'") == 300


async def test_cancel_pending_job_at_once(app: App) -> None:
    [job_id] = await app.queue.job_enqueue_many([NewJob("noop", {})])
    assert await app.queue.job_request_cancel(job_id) == "cancelled"
    assert await claim(app, 1, "w") == []


async def test_cancel_running_job_reaches_the_handler(app: App) -> None:
    [job_id] = await app.queue.job_enqueue_many([NewJob("sleep", {"seconds": 60})])
    worker = Worker(app, install_signal_handlers=False)
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: app.db.fetchval("SELECT status = 'running' FROM runner_jobs WHERE id = $1", job_id))
    await app.queue.job_request_cancel(job_id)
    row = await wait_until(lambda: finished_row(app, job_id), timeout_s=5)
    worker.request_stop()
    await task
    assert row["status"] == "cancelled" and row["last_error"] == "cancelled by request"


async def test_cancel_check_catches_a_missed_notify(app: App) -> None:
    """With no NOTIFY (flag set directly), the batched periodic check still cancels the job."""
    [job_id] = await app.queue.job_enqueue_many([NewJob("sleep", {"seconds": 60})])
    worker = Worker(app, install_signal_handlers=False)
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: app.db.fetchval("SELECT status = 'running' FROM runner_jobs WHERE id = $1", job_id))
    await app.db.execute("UPDATE runner_jobs SET cancel_requested = true WHERE id = $1", job_id)
    row = await wait_until(lambda: finished_row(app, job_id), timeout_s=5)
    worker.request_stop()
    await task
    assert row["status"] == "cancelled"


async def test_heartbeat_renews_leases_and_worker_row_in_one_statement(app: App) -> None:
    await app.queue.job_enqueue_many([NewJob("noop", {}) for _ in range(3)])
    claimed = await claim(app, 3, "w")
    before = await app.db.fetchval("SELECT max(lease_expires_at) FROM runner_jobs")
    identity = WorkerIdentity("w", ("default",), 3)
    result = await app.queue.job_heartbeat([(j.id, j.lease_epoch) for j in claimed], identity, 60)
    assert result.renewed == result.held == {j.id for j in claimed}
    assert await app.db.fetchval("SELECT min(lease_expires_at) FROM runner_jobs") > before  # 2 s lease -> 60 s
    assert await app.db.fetchval("SELECT count(*) FROM runner_workers WHERE id = 'w'") == 1
    pool = json.loads(await app.db.fetchval("SELECT pool FROM runner_workers WHERE id = 'w'"))  # the dashboard's
    assert pool["max"] == app.db.max_size and pool["size"] >= 1 and pool["waiters"] == 0
    assert pool.keys() == {"size", "max", "in_use", "waiters", "peak_in_use", "exhaustion_retries", "give_ups"}


async def test_claim_is_an_index_scan_at_a_million_rows(app: App) -> None:
    await app.db.execute("""
        INSERT INTO runner_jobs (kind, payload, status, priority, run_at)
        SELECT 'noop', '{}', CASE WHEN g % 10 = 0 THEN 'pending' ELSE 'succeeded' END, g % 3,
               now() - (g % 1000) * interval '1 second'
        FROM generate_series(1, 1000000) g""")
    await app.db.execute("ANALYZE runner_jobs")
    async with app.db.connection() as connection:  # the claim itself, planned for these arguments
        await connection.execute(f"PREPARE claim_plan AS {queue_sql.CLAIM}")
        plan = "\n".join(r[0] for r in await connection.fetch(
            "EXPLAIN EXECUTE claim_plan('{default}', 200, 'w', 30, '{noop,sleep}')"))
        await connection.execute("DEALLOCATE claim_plan")
    assert "Index Scan using runner_jobs_claim_idx" in plan, plan
    assert "Sort" not in plan, plan


async def test_drain_check_and_depth_counts_never_scan_history(app: App) -> None:
    await app.db.execute("""
        INSERT INTO runner_jobs (kind, payload, status, started_at, finished_at)
        SELECT 'noop', '{}', 'succeeded', now() - g * interval '1 second', now() - g * interval '1 second'
        FROM generate_series(1, 20000) g""")
    await app.queue.job_enqueue_many([NewJob("noop", {}) for _ in range(5)])
    await app.db.execute("ANALYZE runner_jobs")
    statements = {
        "HAS_RUNNABLE_OR_RUNNING": (queue_sql.HAS_RUNNABLE_OR_RUNNING, "('{default}', '{noop,sleep}')"),
        "COUNT_UNFINISHED_BY_STATUS": (queue_sql.COUNT_UNFINISHED_BY_STATUS, ""),
        "COUNT_UNFINISHED_BY_QUEUE": (queue_sql.COUNT_UNFINISHED_BY_QUEUE, ""),
        "COUNT_RECENT_FINISHED_BY_STATUS": (queue_sql.COUNT_RECENT_FINISHED_BY_STATUS, "(1000)"),
        "COUNT_RECENT_FINISHED_BY_QUEUE": (queue_sql.COUNT_RECENT_FINISHED_BY_QUEUE, "(1000)"),
        "RESCUE_STALE": (queue_sql.RESCUE_STALE, "(3, 100)"),
        "RUNNING_JOBS": (queue_sql.RUNNING_JOBS, "(50)"),
    }
    async with app.db.connection() as connection:  # default planner settings; custom and generic plans
        for (name, (statement, args)), mode in [(s, m) for s in statements.items()
                                                for m in ("force_custom_plan", "force_generic_plan")]:
            await connection.execute(f"SET plan_cache_mode = {mode}")
            await connection.execute(f"PREPARE p AS {statement}")  # EXPLAIN without ANALYZE: nothing runs
            plan = "\n".join(r[0] for r in await connection.fetch(f"EXPLAIN EXECUTE p{args}"))
            await connection.execute("DEALLOCATE p")
            assert "Seq Scan on runner_jobs" not in plan, (name, mode, plan)
            if name in ("RESCUE_STALE", "RUNNING_JOBS"):  # reads running entries only, not the pending ones
                assert "Index Cond: (status = 'running'::text)" in plan, (name, mode, plan)
        await connection.execute("RESET plan_cache_mode")
    assert await app.queue.job_has_runnable_or_running(["default"], ["noop"])
    counts, estimated = await app.queue.job_depth_by_status()
    assert counts == {"pending": 5, "succeeded": 20000} and estimated == ["cancelled", "failed", "succeeded"]
    by_queue = await app.queue.job_counts_by_queue()
    assert sum(r["n"] for r in by_queue if r["status"] == "succeeded") == 20000  # estimate: ANALYZE just ran
    assert all(r["estimated"] == (r["status"] == "succeeded") for r in by_queue)


@pytest.fixture
async def raw(database_url: str) -> asyncpg.Connection:
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


async def test_pool_exhaustion_gives_up_with_a_typed_error(settings: Settings) -> None:
    from runner.db import Database
    from runner.errors import PoolExhausted

    tight = settings.model_copy(update={
        "pool_max_size": 2, "pool_min_size": 1, "pool_acquire_timeout": 0.05, "pool_retry_attempts": 3})
    app = await App.open(tight)
    try:
        db: Database = app.db
        async with db.connection():
            async with db.connection("control") as control:  # handlers hold every jobs connection;
                assert await control.fetchval("SELECT 1") == 1  # the control lane's is still there
            with pytest.raises(PoolExhausted, match="after 3 attempts"):
                async with db.connection():
                    pass
        assert (db.exhaustion_retries, db.give_ups) == (2, 1)
        async with db.connection() as connection:  # the pool recovers once the holder lets go
            assert await connection.fetchval("SELECT 1") == 1
    finally:
        await app.close()


async def test_retention_deletes_only_old_finished_jobs(app: App) -> None:
    ids = await app.queue.job_enqueue_many([NewJob("noop", {}) for _ in range(4)])
    await app.db.execute("UPDATE runner_jobs SET status = 'succeeded', finished_at = now() - interval '2 days' "
                         "WHERE id = ANY($1)", ids[:2])
    await app.db.execute("UPDATE runner_jobs SET status = 'failed', finished_at = now() WHERE id = $1", ids[2])
    assert await app.queue.job_delete_finished(older_than_s=86400) == 2
    remaining = await app.db.fetch("SELECT id, status FROM runner_jobs ORDER BY id")
    assert [(r["id"], r["status"]) for r in remaining] == [(ids[2], "failed"), (ids[3], "pending")]


async def test_drain_waits_for_a_retry_in_its_backoff(app: App) -> None:
    slow_retry = app.settings.model_copy(update={"retry_backoff_base": 0.5, "retry_backoff_max": 0.5})
    [job_id] = await app.queue.job_enqueue_many([NewJob("fail", {"message": "again"}, max_attempts=2)])
    [delayed] = await app.queue.job_enqueue_many([NewJob("noop", {}, delay_s=3600)])
    retry_app = App.assemble(slow_retry, app.dsn, app.db, app.queue, app.plugins, app.registry)
    await run_worker(retry_app)
    row = await app.queue.job_get(job_id)
    assert (row["status"], row["attempts"]) == ("failed", 2)  # both attempts ran before the drain ended
    assert (await app.queue.job_get(delayed))["status"] == "pending"  # a delayed job is not waited for


async def test_a_claim_that_returns_after_stop_hands_back_only_what_it_claimed(app: App) -> None:
    # SIGTERM while a claim is in flight: the claimed jobs go straight back, the running ones keep their grace
    [running_id] = await app.queue.job_enqueue_many([NewJob("record", {"seconds": 1.0, "log_start": True})])
    worker = Worker(app, install_signal_handlers=False)
    task = asyncio.create_task(worker.run())

    async def started() -> bool:
        running = worker.executor.active.get(running_id)
        return running is not None and running.started

    try:
        await wait_until(started, timeout_s=30)
        worker.fetcher.stop()  # as at shutdown: no more claims from its loop
        [late_id] = await app.queue.job_enqueue_many([NewJob("noop", {})])
        await worker.fetcher.run_once()  # the claim that was in flight when the stop came
        assert worker.executor.active[running_id].stop_reason is None
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
    assert (await app.queue.job_get(running_id))["status"] == "succeeded"
    late = await app.queue.job_get(late_id)
    assert (late["status"], late["attempts"]) == ("pending", 0)


async def test_a_capped_claim_takes_no_more_of_a_kind_than_its_room(app: App, conn: asyncpg.Connection) -> None:
    """A worker running a kind with max_running claims at most its room of that kind; the rest of what the
    claim walked over stays pending untouched (no epoch bump, no handed-back attempt), other kinds are
    claimed beside it, and `seen` tells the worker that more is waiting."""
    await app.enqueue_many("record", [{"seconds": 0}] * 5)
    await app.enqueue_many("sleep", [{"seconds": 0}] * 3)
    jobs, seen = await app.queue.job_claim_capped(["default"], 10, "w", 30.0, ["record", "sleep"], {"record": 2})
    assert sorted(j.kind for j in jobs) == ["record", "record", "sleep", "sleep", "sleep"] and seen == 8
    left = await conn.fetch("SELECT status, lease_epoch, attempt_log::text AS log FROM runner_jobs "
                            "WHERE kind = 'record' AND status = 'pending'")
    assert [(r["lease_epoch"], r["log"]) for r in left] == [(0, "[]")] * 3
    assert await app.queue.job_claim_capped(["default"], 10, "w", 30.0, ["record"], {"record": 1}) != ([], 0)
