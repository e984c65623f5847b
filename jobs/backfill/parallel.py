"""A parallel backfill: a parent job that splits the key range into chunks and watches them run.

The parent counts the rows within the filters and cuts them into ``parallel`` key ranges of equal row
counts: the key's quantiles, exact up to :data:`SAMPLE_ABOVE_ROWS` rows, else from a block sample of about
:data:`SAMPLE_ROWS` rows (``TABLESAMPLE SYSTEM``), so skewed keys still give even chunks. Each range becomes
a ``backfill_chunk`` job (``parent_id`` = the parent), enqueued in the same transaction as the parent's
fenced checkpoint: a parent that lost its lease enqueues nothing, and a resumed parent finds its chunks
instead of making more. A chunk is an ordinary backfill of its range (its own checkpoint, leases, fencing,
rescue and retries), claimed by any worker (at most RUNNER_BACKFILL_CHUNKS_PER_WORKER at once in one).

The parent then polls its chunks (one index scan of ``parent_id`` every :data:`WATCH_EVERY_S`), keeps its own
progress at their sum, and ends when every chunk has: succeeded with the totals and each chunk's figures,
or failed (:class:`JobFailed`, no retry of its own) naming the chunks that did not succeed. Cancelling the
parent cancels its chunks and retrying it retries its failed ones (runner.queue). The parent holds a
slot of its worker while it waits, but no connection.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

from runner.context import JobContext
from runner.db import Database
from runner.errors import JobFailed
from runner.jobs.backfill import mover
from runner.jobs.backfill.plan import Plan
from runner.jobs.backfill.spec import Chunk
from runner.queue import FINISHED, NewJob

CHUNK_KIND = "backfill_chunk"
SAMPLE_ABOVE_ROWS = 200_000  # up to this many rows the quantiles are exact (one sort of the keys)
SAMPLE_ROWS = 100_000  # past it, a block sample of about this many rows
WATCH_EVERY_S = 0.25
COUNTS = ("inserted", "updated", "skipped")


async def run_parent(ctx: JobContext, plan: Plan, source_db: Database) -> dict[str, Any]:
    await mover.retrying(ctx, "split", functools.partial(split_once, ctx, plan, source_db))
    try:
        return await watch(ctx, plan)
    except BaseException:
        if ctx.cancel_requested():  # a stop of any kind: a user's cancel (of this job alone, or in bulk)
            await asyncio.shield(cancel_chunks_if_cancelled(ctx))  # reaches the chunks; a shutdown does not
        raise


async def cancel_chunks_if_cancelled(ctx: JobContext) -> None:
    """When the parent itself was cancelled, its chunks are too (runner cancel ID does it at once; this
    covers cancels by filter, which do not look for children)."""
    try:
        if (await ctx.app.queue.job_get(ctx.job_id))["cancel_requested"]:
            cancelled = await ctx.app.queue.job_cancel_children(ctx.job_id)
            ctx.log.info("backfill cancelled with its chunks", chunks=cancelled)
    except Exception as error:  # the chunks run on; runner cancel on the parent again reaches them
        ctx.log.warning("could not cancel the chunks", error=repr(error))


async def split_once(ctx: JobContext, plan: Plan, source_db: Database) -> None:
    """Count, cut and enqueue the chunks, unless an earlier attempt did (then nothing)."""
    if ctx.saved_checkpoint and "chunks" in ctx.saved_checkpoint:
        return
    sql, args = plan.statements.count()
    total = int(await source_db.fetchval(sql, *args))
    points, sampled = await split_points(plan, source_db, total)
    bounds: list[str | None] = [None, *points, None]
    chunks = [Chunk(i + 1, len(bounds) - 1, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    jobs = [NewJob(CHUNK_KIND, plan.spec.chunk_payload(chunk), queue=ctx.job.queue,
                   max_attempts=ctx.job.max_attempts, parent_id=ctx.job_id) for chunk in chunks]
    state = {"chunks": len(chunks), "split_at": time.time()}
    async with ctx.app.db.transaction() as connection:
        # Fenced, and it locks the parent's row: a second owner waits here, then finds the chunks.
        await ctx.checkpoint(state, done=0, total=total, connection=connection)
        if not await ctx.app.queue.job_children(ctx.job_id, connection=connection):
            await ctx.app.queue.job_enqueue_many(jobs, connection)
    ctx.job.checkpoint, ctx.job.progress_total = state, total
    ctx.log.info("backfill split", chunks=len(chunks), total=total, sampled=sampled,
                 ranges=[c.describe(plan.key.name) for c in chunks][:16])


async def split_points(plan: Plan, source_db: Database, total: int) -> tuple[list[str], bool]:
    """The keys between chunks (fewer when the rows are too few for ``parallel`` distinct ranges) and
    whether they came from a sample."""
    parts = min(plan.spec.parallel, max(1, total))
    if parts < 2:
        return [], False
    sampled = total > SAMPLE_ABOVE_ROWS
    sql, args = plan.statements.split_points(parts, 100.0 * SAMPLE_ROWS / total if sampled else None)
    points = await source_db.fetchval(sql, *args)
    if sampled and (not points or None in points):  # the sample came back (nearly) empty: be exact
        sampled = False
        sql, args = plan.statements.split_points(parts, None)
        points = await source_db.fetchval(sql, *args)
    distinct: list[str] = []
    for point in points or []:  # quantiles rise in key order: equal neighbours are equal keys
        if point is not None and (not distinct or distinct[-1] != point):
            distinct.append(point)
    return distinct, sampled


async def watch(ctx: JobContext, plan: Plan) -> dict[str, Any]:
    saved = ctx.saved_checkpoint or {}
    split_at = float(saved.get("split_at", time.time()))
    shown = (ctx.job.progress_done, ctx.job.progress_total)
    next_log = time.monotonic() + mover.PROGRESS_LOG_EVERY_S
    while True:
        children = await mover.retrying(ctx, "watch chunks", functools.partial(ctx.app.queue.job_children,
                                                                              ctx.job_id))
        done = sum(int(c["progress_done"]) for c in children)
        totals = [c["progress_total"] for c in children]
        total = sum(totals) if children and None not in totals else shown[1]
        if (done, total) != shown:
            await mover.retrying(ctx, "progress", functools.partial(ctx.progress, done, total))
            shown = (done, total)
        if children and all(c["status"] in FINISHED for c in children):
            return finished(plan, children, split_at)
        if time.monotonic() >= next_log:
            next_log = time.monotonic() + mover.PROGRESS_LOG_EVERY_S
            log_progress(ctx, children, done, total, split_at)
        await asyncio.sleep(WATCH_EVERY_S)


def log_progress(ctx: JobContext, children: list[dict[str, Any]], done: int, total: int | None,
                 split_at: float) -> None:
    elapsed = time.time() - split_at
    rate = done / elapsed if elapsed > 0 else 0.0
    left = None if total is None else max(0, total - done)
    by_status: dict[str, int] = {}
    for child in children:
        by_status[child["status"]] = by_status.get(child["status"], 0) + 1
    ctx.log.info("backfill progress", rows=done, total=total, rows_per_s=round(rate),
                 eta_s=round(left / rate) if rate > 0 and left is not None else None, chunks=by_status)


def finished(plan: Plan, children: list[dict[str, Any]], split_at: float) -> dict[str, Any]:
    """The parent's result when every chunk succeeded; JobFailed naming the ones that did not."""
    key = plan.key.name
    failed = [c for c in children if c["status"] != "succeeded"]
    if failed:
        described = "; ".join(f"chunk {chunk_of(c).index} (job {c['id']}, {chunk_of(c).describe(key)}) "
                              f"{c['status']}: {first_line(c['last_error'])}" for c in failed[:5])
        raise JobFailed(f"{len(failed)} of {len(children)} chunks did not succeed: {described}; the others "
                        f"are copied (runner retry runs the parent and these chunks again)")
    results = [c["result"] if isinstance(c["result"], dict) else {} for c in children]
    per_chunk = [{"job_id": c["id"], "index": chunk_of(c).index, "after": chunk_of(c).after,
                  "upto": chunk_of(c).upto, "rows": int(r.get("rows", c["progress_done"])),
                  **{n: int(r.get(n, 0)) for n in COUNTS}, "seconds": r.get("seconds"),
                  "attempts": c["attempts"], "recoveries": c["recoveries"]}
                 for c, r in zip(children, results, strict=True)]
    return {"rows": sum(p["rows"] for p in per_chunk), **{n: sum(p[n] for p in per_chunk) for n in COUNTS},
            "seconds": round(time.time() - split_at, 3), "chunks": per_chunk}


def chunk_of(child: dict[str, Any]) -> Chunk:
    raw = (child["payload"] or {}).get("chunk") or {}
    return Chunk(int(raw.get("index", 0)), int(raw.get("of", 0)), raw.get("after"), raw.get("upto"))


def first_line(error: str | None) -> str:
    return (error or "no error recorded").strip().splitlines()[0][:300]
