"""What a backfill reports: inserted / updated / skipped rows in its result, its progress in the log while it
runs, and a rows-per-second cap that holds."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

from runner.app import App
from runner.jobs.backfill import mover
from runner.jobs.backfill.pools import close_named_pools
from runner.queue import NewJob
from runner.worker import Worker
from tests import test_backfill
from tests.pg import wait_until
from tests.test_backfill import digest, execute, make_table, run_backfill

other_url = test_backfill.other_url  # the fixture: a second database, the connection 'other'


def copy(**extra: Any) -> dict[str, Any]:
    return {"source_table": "public.src", "dest_table": "public.dst", "batch_size": 250, **extra}


async def test_a_rerun_into_a_full_table_says_what_it_skipped_and_updated(app: App, database_url: str) -> None:
    await make_table(database_url, "public.src", 1000)
    first = await run_backfill(app, copy(create_table=True))
    assert {k: first["result"][k] for k in ("rows", "inserted", "updated", "skipped")} == {
        "rows": 1000, "inserted": 1000, "updated": 0, "skipped": 0}
    again = await run_backfill(app, copy())  # insert mode: every key exists, nothing is written
    assert {k: again["result"][k] for k in ("rows", "inserted", "updated", "skipped")} == {
        "rows": 1000, "inserted": 0, "updated": 0, "skipped": 1000}
    await make_table(database_url, "public.src", 100, first=1001)
    upserted = await run_backfill(app, copy(mode="upsert"))
    assert {k: upserted["result"][k] for k in ("rows", "inserted", "updated", "skipped")} == {
        "rows": 1100, "inserted": 100, "updated": 1000, "skipped": 0}
    assert upserted["result"]["seconds"] > 0


async def test_the_rate_cap_holds_and_progress_is_logged(
        app: App, database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(mover, "PROGRESS_LOG_EVERY_S", 0.5)
    await make_table(database_url, "public.src", 3000)
    job = await run_backfill(app, copy(create_table=True, batch_size=150, max_rows_per_second=1000))
    assert job["status"] == "succeeded" and job["progress_done"] == 3000
    rate = 3000 / (job["finished_at"] - job["started_at"]).total_seconds()
    assert 800 <= rate <= 1200, rate  # within 20% of the cap (without it: tens of thousands of rows/s)
    progress = [line for line in capsys.readouterr().err.splitlines() if '"backfill progress"' in line]
    assert len(progress) >= 3, progress  # every 0.5 s over ~3 s: rows, total, rows/s, ETA
    assert all('"eta_s"' in line and '"rows_per_s"' in line for line in progress)


async def full_copy_seconds(url: str, table: str) -> float:
    """The fastest of three whole-table COPYs out on this machine, now: the batch size the test starts at."""
    connection = await asyncpg.connect(url)

    async def discard(_: bytes) -> None:
        return None

    try:
        times = []
        for _ in range(3):
            began = time.monotonic()
            await connection.copy_from_query(f"SELECT * FROM {table}", output=discard)
            times.append(time.monotonic() - began)
    finally:
        await connection.close()
    return min(times)


async def test_wide_rows_under_a_short_statement_timeout_still_complete(
        app: App, database_url: str, other_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    # ~3.5 kB of incompressible text per row, 10,000 rows: 35 MB, read in one batch to begin with
    await execute(other_url, "CREATE TABLE public.wide (id bigint PRIMARY KEY, body text NOT NULL)")
    await execute(other_url, "INSERT INTO public.wide SELECT g, (SELECT string_agg(md5(g::text || i::text), '') "
                             "FROM generate_series(1, 110) i) FROM generate_series(1, 10000) g")
    # The timeout is a fifth of what reading the whole table takes on this machine right now, so the first
    # batch cannot fit however fast the machine is, and a batch a tenth the size or smaller can.
    timeout = max(0.02, round(await full_copy_seconds(other_url, "public.wide") / 5, 3))
    tight = App.assemble(app.settings.model_copy(update={"statement_timeout": timeout}), app.dsn, app.db,
                         app.queue, app.plugins, app.registry)  # for the named connections; the app's own pool
    try:                                                       # keeps its own
        job = await run_backfill(tight, {"source": "other", "source_table": "public.wide",
                                         "dest_table": "public.wide", "create_table": True, "batch_size": 10000})
    finally:
        await close_named_pools(tight)
    assert job["status"] == "succeeded", job["last_error"]
    assert job["progress_done"] == 10000 and job["result"]["inserted"] == 10000
    assert job["checkpoint"]["batch_size"] < 10000, timeout  # the size it settled on, kept for a resumed attempt
    assert "halving the batch" in capsys.readouterr().err
    assert await digest(other_url, "public.wide") == await digest(database_url, "public.wide")


async def test_a_locked_destination_slows_the_copy_down_instead_of_failing(
        app: App, database_url: str, other_url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Without the back-off, a step still failing after RETRY_FOR_S fails the attempt: here after 0.5 s.
    monkeypatch.setattr(mover, "RETRY_FOR_S", 0.5)
    await make_table(database_url, "public.src", 3000)
    await make_table(other_url, "public.dst", 0)
    # A 1 s statement timeout on the named connections: a write waits 0.5 s for a lock, then backs off.
    tight = App.assemble(app.settings.model_copy(update={"statement_timeout": 1.0}), app.dsn, app.db, app.queue,
                         app.plugins, app.registry)
    job_id = await enqueue_backfill(tight, {"source_table": "public.src", "dest": "other", "dest_table": "public.dst",
                                            "batch_size": 100, "max_rows_per_second": 1000})
    worker = asyncio.create_task(Worker(tight, drain=True, install_signal_handlers=False).run())
    blocker = await asyncpg.connect(other_url)
    try:
        await wait_until(lambda: moved(tight, job_id), timeout_s=30)
        async with blocker.transaction():  # writes wait (reads do not) for 3 s: six lock timeouts and more
            await blocker.execute("LOCK TABLE public.dst IN EXCLUSIVE MODE")
            await asyncio.sleep(3)  # the pressure itself, not a wait for a condition
        await worker
    finally:
        await blocker.close()
        await close_named_pools(tight)
    job = await app.queue.job_get(job_id)
    assert job["status"] == "succeeded", job["last_error"]
    assert job["attempts"] == 0 and job["progress_done"] == 3000
    assert "backfill under database pressure" in capsys.readouterr().err
    assert await digest(database_url, "public.src") == await digest(other_url, "public.dst")


async def enqueue_backfill(app: App, payload: dict[str, Any]) -> int:
    kind = app.registry.get("backfill")
    assert kind.validate is not None
    await kind.validate(payload, app)
    job_id, _ = await app.queue.job_enqueue(NewJob("backfill", payload))
    return job_id


async def moved(app: App, job_id: int) -> bool:
    return int((await app.queue.job_get(job_id))["progress_done"]) > 0


def test_under_pressure_the_rate_halves_then_doubles_back_after_clean_batches() -> None:
    capped = mover.Throttle(1000)
    assert capped.slow_down() is None  # no batches yet: nothing to halve
    capped.recent.extend([(0.0, 100), (1.0, 900), (2.0, 900)])  # 900 rows/s reached
    assert capped.slow_down() == 450
    for _ in range(mover.SPEED_UP_AFTER_BATCHES):
        capped.clean_batch(100)
    assert capped.rate == 900
    for _ in range(mover.SPEED_UP_AFTER_BATCHES):
        capped.clean_batch(100)
    assert capped.rate == 1000  # never past the cap given
    free = mover.Throttle(None)
    free.recent.extend([(0.0, 100), (1.0, 5000), (2.0, 5000)])
    assert free.slow_down() == 2500
    for _ in range(mover.SPEED_UP_AFTER_BATCHES):
        free.clean_batch(100)
    assert free.rate is None  # back to the rate it had before: no limit again


async def test_batches_stay_within_batch_bytes(app: App, database_url: str, other_url: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # 2,000 rows of ~3.5 kB: 10,000-row batches would be one 7 MB batch; 256 kB batches are ~70 rows
    await execute(other_url, "CREATE TABLE public.wide (id bigint PRIMARY KEY, body text NOT NULL)")
    await execute(other_url, "INSERT INTO public.wide SELECT g, (SELECT string_agg(md5(g::text || i::text), '') "
                             "FROM generate_series(1, 110) i) FROM generate_series(1, 2000) g")
    sizes: list[int] = []
    read = mover.Backfill._read

    async def recording(self: mover.Backfill, lower: str | None) -> mover.Batch | None:
        batch = await read(self, lower)
        if batch is not None:
            sizes.append(len(batch.data))
        return batch

    monkeypatch.setattr(mover.Backfill, "_read", recording)
    limit = 256 * 1024
    job = await run_backfill(app, {"source": "other", "source_table": "public.wide", "dest_table": "public.wide",
                                   "create_table": True, "batch_size": 10000, "batch_bytes": limit})
    assert job["status"] == "succeeded", job["last_error"]
    assert len(sizes) >= 2000 * 3500 // limit and sum(sizes) > 2000 * 3500
    assert max(sizes[1:]) <= 1.1 * limit, sizes  # the first (100 rows) measures the rows; the rest fit
    assert await digest(other_url, "public.wide") == await digest(database_url, "public.wide")
