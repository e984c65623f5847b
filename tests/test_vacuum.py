"""The worker vacuums runner_jobs between autovacuum's rounds: once past the dead-row threshold, one
worker at a time, and only where runner's role owns the table."""

from __future__ import annotations

import asyncio

import asyncpg

from runner import queue_sql
from runner.app import App
from runner.loops.vacuum import Vacuumer
from runner.queue import NewJob
from runner.worker import Worker
from tests.pg import wait_until


async def manual_vacuums(app: App) -> int:
    # vacuum_count counts VACUUM commands only; autovacuum has its own counter
    return int(await app.db.fetchval(
        "SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = 'runner_jobs'::regclass"))


def eager(app: App, dead_rows: int) -> App:
    settings = app.settings.model_copy(update={"vacuum_dead_rows": dead_rows, "vacuum_interval": 0.05})
    return App.assemble(settings, app.dsn, app.db, app.queue, app.plugins, app.registry)


async def test_a_busy_jobs_table_is_vacuumed_by_the_worker(app: App) -> None:
    before = await manual_vacuums(app)
    await app.queue.job_enqueue_many([NewJob("noop", {}) for _ in range(600)])
    worker = Worker(eager(app, dead_rows=300), install_signal_handlers=False)
    task = asyncio.create_task(worker.run())
    try:
        # 600 claims and 600 completions leave 1,200 dead versions: past 300, the worker vacuums
        await wait_until(lambda: _ran(worker), timeout_s=60)
        assert await manual_vacuums(app) > before
        # and again once the drain is over (a vacuum early in it leaves the rest of the churn: 600 dead
        # versions read after one, under two CPU hogs)
        await wait_until(lambda: app.db.fetchval(
            "SELECT count(*) = 600 FROM runner_jobs WHERE status = 'succeeded'"), timeout_s=60)
        await wait_until(lambda: _dead_below(app, 600), timeout_s=60)
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
    assert await app.db.fetchval("SELECT count(*) FROM runner_jobs WHERE status = 'succeeded'") == 600


async def test_below_the_threshold_or_switched_off_nothing_is_vacuumed(app: App) -> None:
    await app.queue.job_enqueue_many([NewJob("noop", {}) for _ in range(50)])
    await app.db.execute("UPDATE runner_jobs SET status = 'succeeded', finished_at = now()")
    await wait_until(lambda: _dead_at_least(app, 50), timeout_s=30)  # the statistics see them
    before = await manual_vacuums(app)
    for dead_rows in (10_000, 0):  # above what is dead; 0 turns the loop off
        vacuumer = Vacuumer(app.queue, eager(app, dead_rows).settings)
        await vacuumer.run_once()
        assert vacuumer.runs == 0
    assert await manual_vacuums(app) == before
    vacuumer = Vacuumer(app.queue, eager(app, 10).settings)
    await vacuumer.run_once()
    assert vacuumer.runs == 1
    await wait_until(lambda: _manual_vacuums_above(app, before), timeout_s=30)


async def _ran(worker: Worker) -> bool:
    return worker.vacuumer.runs >= 1


async def _dead_at_least(app: App, n: int) -> bool:
    return await app.queue.job_table_dead_rows() >= n


async def _manual_vacuums_above(app: App, n: int) -> bool:
    return await manual_vacuums(app) > n


async def test_one_worker_vacuums_at_a_time(app: App, database_url: str) -> None:
    other = await asyncpg.connect(database_url)
    try:  # another worker holds the vacuum lock: this one skips its turn
        assert await other.fetchval(queue_sql.TRY_VACUUM_LOCK)
        assert await app.queue.job_table_vacuum() is False
        await other.fetchval(queue_sql.VACUUM_UNLOCK)
        assert await app.queue.job_table_vacuum() is True
    finally:
        await other.close()


async def test_a_role_that_does_not_own_the_table_leaves_it_to_autovacuum(app: App, database_url: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        assert await connection.fetchval(queue_sql.MAY_VACUUM_JOBS) is True  # the owner (and a superuser)
        await connection.execute("DROP ROLE IF EXISTS runner_reader")
        await connection.execute("CREATE ROLE runner_reader NOSUPERUSER")
        try:
            await connection.execute("SET ROLE runner_reader")
            assert await connection.fetchval(queue_sql.MAY_VACUUM_JOBS) is False
            await connection.execute("RESET ROLE")
        finally:
            await connection.execute("DROP ROLE runner_reader")
    finally:
        await connection.close()


async def _dead_below(app: App, rows: int) -> bool:
    return bool(await app.queue.job_table_dead_rows() < rows)
