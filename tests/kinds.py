"""The test suite's and the benchmarks' own kinds, as an application: ``RUNNER_APP=tests.kinds:app``.

They are not part of runner's production schema: ``runner migrate`` creates ``runner_executions`` only
with this app loaded (its migrations, ``tests/migrations``, are an Alembic branch of their own).

- ``record``: sleeps like ``sleep`` (``{"seconds": s}``) then writes its effect, a row in
  ``runner_executions``, in the same transaction as its completion (``ctx.complete_in``): the effect exists
  exactly once per succeeded job, whatever stalls, kills or rescues happen around it. With
  ``"log_start": true`` it also logs ``record started`` at its start (at-least-once by nature: a rescued
  job starts again); with ``"db_seconds": s`` its transaction also holds its connection that long (pool
  pressure). Used by the exactly-once tests and bench/scale.py.
- ``fail``: raises ``{"message": str}``; with ``"fatal": true`` it fails at once without retries.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import runner
from runner.jobs.builtins import payload_seconds

REFERENCE = "tests.kinds:app"  # RUNNER_APP for the tests' and benchmarks' workers and CLI calls
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
INSERT_EXECUTION = """
INSERT INTO runner_executions (job_id, lease_epoch, attempt, worker_id) VALUES ($1, $2, $3, $4)
"""

app = runner.App(name="test-kinds", migrations=MIGRATIONS)


class JobFailed(Exception):
    """The error the ``fail`` kind raises on purpose."""


def validate_record(payload: dict[str, Any]) -> None:
    payload_seconds(payload)
    payload_seconds(payload, "db_seconds")


@app.job("record", validate=validate_record)
async def record(ctx: runner.JobContext) -> None:
    if ctx.payload.get("log_start"):
        ctx.log.info("record started", lease_epoch=ctx.job.lease_epoch)
    await asyncio.sleep(payload_seconds(ctx.payload))
    db_seconds = payload_seconds(ctx.payload, "db_seconds")
    async with ctx.db.transaction() as connection:
        if db_seconds:
            await connection.execute("SELECT pg_sleep($1)", db_seconds)
        await connection.execute(
            INSERT_EXECUTION, ctx.job_id, ctx.job.lease_epoch, ctx.attempt, ctx.app.settings.worker_id)
        await ctx.complete_in(connection)


@app.job("fail")
async def fail(ctx: runner.JobContext) -> None:
    message = str(ctx.payload.get("message", "failed on purpose"))
    if ctx.payload.get("fatal"):
        raise runner.PayloadError(message)
    raise JobFailed(message)
