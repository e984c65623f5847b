"""The ``backfill`` job kind: copy a table between PostgreSQL databases in keyset batches with exact progress.

See :mod:`runner.jobs.backfill.mover` for how batches move and resume, :mod:`runner.jobs.backfill.plan` for the checks
made at enqueue and again at run time, and :mod:`runner.jobs.backfill.pools` for named connections.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.plugins import JobKind, Plugin

# Every `runner` command (`--help` too) loads this plugin: the mover, the planner and the pools (asyncpg,
# tenacity, the app) are imported by the handler, the validator and the command when they first run.
if TYPE_CHECKING:
    import typer
    from pydantic_settings import BaseSettings

    from runner.app import App
    from runner.context import JobContext


async def handle(ctx: JobContext) -> dict[str, Any] | None:
    from runner.jobs.backfill.mover import handle

    return await handle(ctx)


async def validate(payload: dict[str, Any], app: App) -> None:
    """At enqueue: the payload's shape, then both catalogs (raises PayloadError, a usage error)."""
    from runner.jobs.backfill.plan import build_plan
    from runner.jobs.backfill.pools import named_pools
    from runner.jobs.backfill.spec import parse_spec

    spec = parse_spec(payload)
    pools = named_pools(app)
    async with pools.use(spec.source) as source_db, pools.use(spec.dest) as dest_db:
        await build_plan(spec, source_db, dest_db)


async def close_named_pools(app: App) -> None:
    from runner.jobs.backfill.pools import close_named_pools

    await close_named_pools(app)


def commands(cli: typer.Typer) -> None:
    from runner.jobs.backfill.cli import register  # the CLI module imports runner.cli; only load it for the CLI

    register(cli)


# A billion-row copy runs for hours, past RUNNER_JOB_TIMEOUT's hour; a timed-out attempt resumes from its
# checkpoint, so a day bounds a stuck one without cutting real ones short.
BACKFILL_TIMEOUT_S = 24 * 3600.0

def chunks_per_worker(app: App) -> int:
    from runner.jobs.backfill.settings import backfill_settings

    return backfill_settings(app).chunks_per_worker


def settings_class() -> type[BaseSettings]:
    from runner.jobs.backfill.settings import BackfillSettings

    return BackfillSettings


plugin = Plugin(
    name="backfill",
    # A parallel backfill (parallel > 1) is a parent that splits the copy into backfill_chunk jobs, each
    # an ordinary backfill of one key range (runner.jobs.backfill.parallel).
    kinds=(JobKind("backfill", handle, validate, timeout_s=BACKFILL_TIMEOUT_S),
           JobKind("backfill_chunk", handle, validate, timeout_s=BACKFILL_TIMEOUT_S, max_running=chunks_per_worker)),
    settings=settings_class,
    commands=commands,
    close_resources=close_named_pools,
    migrations=Path(__file__).with_name("migrations"),  # the incremental backfills' watermarks
)
