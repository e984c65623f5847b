"""Built-in kinds for tests, benchmarks and smoke checks.

- ``noop``: does nothing.
- ``sleep``: ``{"seconds": float}``.
- ``record``: sleeps like ``sleep`` then writes its effect, a row in ``runner_executions``, in the same
  transaction as its completion (``ctx.complete_in``): the effect exists exactly once per succeeded job,
  whatever stalls, kills or rescues happen around it. With ``"log_start": true`` it also logs
  ``record started`` at its start (at-least-once by nature: a rescued job starts again); with
  ``"db_seconds": s`` its transaction also holds its connection that long (pool pressure). Used by the
  exactly-once tests and bench/scale.py.
- ``fail``: raises ``{"message": str}``; with ``"fatal": true`` it fails at once without retries.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

from runner.app import App
from runner.context import JobContext
from runner.errors import PayloadError
from runner.plugins import JobKind, Plugin

INSERT_EXECUTION = """
INSERT INTO runner_executions (job_id, lease_epoch, attempt, worker_id) VALUES ($1, $2, $3, $4)
"""


class JobFailed(Exception):
    """The error the ``fail`` kind raises on purpose."""


async def noop(ctx: JobContext) -> None:
    return None


def _seconds(payload: dict[str, Any], key: str = "seconds") -> float:
    seconds = payload.get(key, 0)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds) \
            or seconds < 0:
        raise PayloadError(f"'{key}' must be a non-negative number, got {seconds!r}")
    return float(seconds)


async def validate_seconds(payload: dict[str, Any], _app: App) -> None:
    _seconds(payload)
    _seconds(payload, "db_seconds")


async def sleep(ctx: JobContext) -> None:
    await asyncio.sleep(_seconds(ctx.payload))


async def record(ctx: JobContext) -> None:
    if ctx.payload.get("log_start"):
        ctx.log.info("record started", lease_epoch=ctx.job.lease_epoch)
    await asyncio.sleep(_seconds(ctx.payload))
    db_seconds = _seconds(ctx.payload, "db_seconds")
    async with ctx.db.transaction() as connection:
        if db_seconds:
            await connection.execute("SELECT pg_sleep($1)", db_seconds)
        await connection.execute(
            INSERT_EXECUTION, ctx.job_id, ctx.job.lease_epoch, ctx.attempt, ctx.app.settings.worker_id)
        await ctx.complete_in(connection)


async def fail(ctx: JobContext) -> None:
    message = str(ctx.payload.get("message", "failed on purpose"))
    if ctx.payload.get("fatal"):
        raise PayloadError(message)
    raise JobFailed(message)


plugin = Plugin(
    name="builtins",
    kinds=(
        JobKind("noop", noop),
        JobKind("sleep", sleep, validate_seconds),
        JobKind("record", record, validate_seconds),
        JobKind("fail", fail),
    ),
    migrations=Path(__file__).parent / "migrations",
)
