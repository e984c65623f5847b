"""``runner backfill SRC DEST ...``: validate against the catalogs, enqueue, print the id, optionally watch."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from runner.cli import fail, settings_or_exit, with_app
from runner.errors import UsageError
from runner.jobs.backfill.spec import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONNECTION,
    MAX_PARALLEL,
    VERIFY_CHUNK_ROWS,
    VERIFY_MAX_REPORTED,
    VERIFY_PARALLEL,
    BackfillSpec,
    parse_spec,
)
from runner.jobs.backfill.where import parse_where

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from runner.app import App
    from runner.jobs.backfill.verify import VerifyReport

KIND = "backfill"
POLL_S = 0.25
FINISHED = ("succeeded", "failed", "cancelled")


def register(app: typer.Typer) -> None:
    app.command(KIND)(backfill_command)


def backfill_command(
    tables: Annotated[list[str], typer.Argument(
        metavar="[verify] SRC_TABLE DEST_TABLE",
        help="schema.table to copy from and to; with `verify` first, compare them instead of copying")],
    source: Annotated[str, typer.Option(help="Source connection (RUNNER_SOURCE_<NAME>_URL)")] = DEFAULT_CONNECTION,
    dest: Annotated[str, typer.Option(help="Destination connection")] = DEFAULT_CONNECTION,
    key: Annotated[str | None, typer.Option(help="Unique key column (default: the primary key)")] = None,
    where: Annotated[list[str] | None, typer.Option(help="Filter such as 'created_at>=2024-01-01' (repeatable)")]
    = None,
    batch_size: Annotated[int, typer.Option(help="Rows per batch")] = DEFAULT_BATCH_SIZE,
    mode: Annotated[str, typer.Option(help="insert (skip existing keys) or upsert (update them)")] = "insert",
    create_table: Annotated[bool, typer.Option(help="Create the destination from the source's columns")] = False,
    allow_narrowing: Annotated[bool, typer.Option(
        help="Accept destination columns narrower than the source's (a row that does not fit fails the job)")] = False,
    since_column: Annotated[str | None, typer.Option(
        help="Incremental: copy (upsert) only rows whose COLUMN is past the previous run's watermark")] = None,
    max_rows_per_second: Annotated[float | None, typer.Option(
        help="Copy at most this many rows per second on average")] = None,
    wait: Annotated[bool, typer.Option(help="Show progress; exit 0 only if the job succeeded")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="After the copy (implies --wait), compare the tables as `backfill verify` does")] = False,
    parallel: Annotated[int | None, typer.Option(
        help="Copy as N key-range chunks, jobs that any worker runs (balanced by rows); verify: key ranges "
             f"compared at once (default {VERIFY_PARALLEL})")] = None,
    batch_bytes: Annotated[int, typer.Option(
        help="Bytes of COPY data per batch at most (a running copy holds up to 4 batches)")] = DEFAULT_BATCH_BYTES,
    chunk_rows: Annotated[int, typer.Option(help="verify: source rows per key range")] = VERIFY_CHUNK_ROWS,
    as_json: Annotated[bool, typer.Option("--json", help="verify: the report as JSON")] = False,
) -> None:
    """Copy a table between PostgreSQL databases in keyset batches (prints the job id), or, as
    `runner backfill verify SRC DEST`, compare two tables by key range: exit 0 when equal, 1 listing the
    key ranges that differ."""
    settings = settings_or_exit()
    comparing = len(tables) == 3 and tables[0] == "verify"
    try:
        if len(tables) != 2 and not comparing:
            raise UsageError("give SRC_TABLE DEST_TABLE to copy, or `verify SRC_TABLE DEST_TABLE` to compare")
        source_table, dest_table = tables[-2:]
        compare_at_once = VERIFY_PARALLEL if parallel is None or (not comparing and parallel == 1) else parallel
        if not 1 <= compare_at_once <= MAX_PARALLEL or not 1_000 <= chunk_rows <= 10_000_000:
            raise UsageError(f"--parallel must be 1 to {MAX_PARALLEL} and --chunk-rows 1,000 to 10,000,000")
        spec = parse_spec({
            "source": source, "source_table": source_table, "dest": dest, "dest_table": dest_table, "key": key,
            "filters": [parse_where(w).to_json() for w in where or []], "batch_size": batch_size, "mode": mode,
            "create_table": create_table and not comparing, "allow_narrowing": allow_narrowing or comparing,
            **({"since_column": since_column} if since_column and not comparing else {}),
            **({"max_rows_per_second": max_rows_per_second} if max_rows_per_second is not None else {}),
            **({"parallel": parallel} if parallel is not None and not comparing else {}),
            "batch_bytes": batch_bytes,
        })
    except UsageError as error:
        raise fail(str(error), 2) from None

    async def body(app: App) -> int:
        if comparing:
            return await run_verify(app, spec, compare_at_once, chunk_rows, as_json)
        code = await enqueue(app, spec, wait or verify)
        if verify and code == 0:
            verified = dataclasses.replace(spec, create_table=False, allow_narrowing=True, parallel=1)
            return await run_verify(app, verified, compare_at_once, chunk_rows, as_json)
        return code

    raise typer.Exit(with_app(settings, body))


async def run_verify(app: App, spec: BackfillSpec, parallel: int, chunk_rows: int, as_json: bool) -> int:
    """Compare the two tables; print the report; 0 when equal, 1 when not."""
    import json

    from runner.jobs.backfill.plan import build_plan
    from runner.jobs.backfill.pools import named_pools
    from runner.jobs.backfill.verify import Verifier

    pools = named_pools(app)
    async with pools.use(spec.source) as source_db, pools.use(spec.dest) as dest_db:
        plan = await build_plan(spec, source_db, dest_db)
        report = await Verifier(plan, source_db, dest_db, chunk_rows=chunk_rows, parallel=parallel).run()
    if as_json:
        print(json.dumps(report.as_dict()))
    else:
        print_report(report)
    return 0 if report.equal else 1


def print_report(report: VerifyReport) -> None:
    rate = report.source_rows / report.seconds if report.seconds else 0.0
    summary = (f"{report.source} ({report.source_rows:,} rows) and {report.dest} ({report.dest_rows:,} rows), "
               f"{report.ranges} key ranges, {report.seconds:.2f} s ({rate:,.0f} rows/s)")
    if report.equal:
        print(f"equal: {summary}")
        return
    print(f"differ: {summary}; {len(report.differing)} key ranges differ:")
    for diff in report.differing[:VERIFY_MAX_REPORTED]:
        print(f"  {diff.range.describe(report.key)}: source {diff.source_rows:,} rows, "
              f"destination {diff.dest_rows:,}")
    if len(report.differing) > VERIFY_MAX_REPORTED:
        more = len(report.differing) - VERIFY_MAX_REPORTED
        print(f"  ... and {more} more (--json lists the first {VERIFY_MAX_REPORTED})")


async def enqueue(app: App, spec: BackfillSpec, wait: bool) -> int:
    job_id = await app.enqueue(KIND, spec.to_payload())  # validated there, like every enqueue
    print(job_id, flush=True)
    if not wait:
        return 0
    return await watch(app, job_id)


def progress_bar(console: Console) -> Progress:
    # rich is imported here, not at the top: every command's start loads this module to register `backfill`.
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} rows/s" if speed else "- rows/s", style="progress.data.speed")

    return Progress(
        TextColumn("job {task.fields[job_id]}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
        RateColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
        console=console, refresh_per_second=4,
    )


async def watch(app: App, job_id: int) -> int:
    """A live progress bar (rows, rows/s, ETA) on stderr until the job finishes."""
    try:
        from rich.console import Console

        job = await follow(app, job_id, Console(stderr=True))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"stopped watching; job {job_id} goes on (runner cancel {job_id} stops it)", file=sys.stderr)
        return 1
    if job["status"] == "succeeded":
        found = job.get("result")
        result: dict[str, Any] = found if isinstance(found, dict) else {}
        split = ", ".join(f"{result[k]:,} {k}" for k in ("inserted", "updated", "skipped")
                          if isinstance(result.get(k), int))
        chunks = result.get("chunks")
        where = f" in {len(chunks)} chunks" if isinstance(chunks, list) else ""
        print(f"job {job_id} succeeded: {job['progress_done']:,} rows{where}" + (f" ({split})" if split else ""),
              file=sys.stderr)
        return 0
    print(f"error: job {job_id} {job['status']}: {job['last_error'] or ''}".rstrip(": "), file=sys.stderr)
    return 1


async def follow(app: App, job_id: int, console: Console) -> dict[str, Any]:
    with progress_bar(console) as progress:
        task = progress.add_task(KIND, total=None, job_id=job_id, status="pending")
        while True:
            job = await app.queue.job_get(job_id)
            progress.update(task, completed=job["progress_done"], total=job["progress_total"], status=job["status"])
            if job["status"] in FINISHED:
                return job
            await asyncio.sleep(POLL_S)
