"""The backfill handler: count, then move keyset batches, checkpointing the last key after each.

A batch is ``lower < key <= upper``: a reader task finds the batch's ``upper`` on the source (the
batch_size-th key after ``lower`` within the filters; never OFFSET) and takes its rows out by binary
``COPY (SELECT ... WHERE ... ORDER BY key) TO STDOUT``, staying up to :data:`READ_AHEAD` batches ahead
of the writer so both databases work at once. The writer puts each batch into the destination by COPY:

- ``direct``: straight into the table, while the destination holds no key past the checkpoint (checked
  once per run) and its column types are the source's. A unique violation (someone else wrote into the
  range) sends that batch, and the probe for every later one, to the stage;
- ``probe``: per batch, ``direct`` when the destination holds no key of the range, else ``stage``;
- ``stage``: COPY into a temporary table of the source's types, then
  ``INSERT ... SELECT ... ON CONFLICT (key) DO NOTHING`` (insert) or ``DO UPDATE`` (upsert).

The same pipeline serves one database (two pooled connections) and two: COPY beats ``INSERT ... SELECT``
with ``ON CONFLICT`` even there (bench/backfill.py).

When the destination is the runner's database the batch and the checkpoint commit in one transaction
(the checkpoint write is fenced by the lease epoch: a lost lease rolls the batch back), and the last
batch also completes the job (``ctx.complete_in``): rows, checkpoint and ``succeeded`` commit together. Otherwise every
batch is idempotent by key, so replaying a batch after a crash between its commit and its checkpoint
neither duplicates nor loses a row. Cancellation is checked before every batch is written. A transient
database error (restart, failover, lost connection) pauses the step and retries it for up to
:data:`RETRY_FOR_S`; a write is retried only after re-reading the committed checkpoint.
A data error while writing a batch (SQLSTATE class 22, a value that does not fit, or 23, a constraint the
row violates) is not retried: the batch's transaction has rolled back (the checkpoint stays after the last
committed batch), :meth:`Backfill.locate` finds the batch's first row that does not fit (a binary search over
the batch's keys in a rolled-back transaction) and the job fails with a PayloadError naming its key.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import asyncpg
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_delay, wait_exponential_jitter

from runner.context import JobContext
from runner.db import TRANSIENT_ERRORS, Database
from runner.errors import DatabaseUnavailable, LeaseLost, PayloadError, PoolExhausted
from runner.jobs.backfill.catalog import Column
from runner.jobs.backfill.plan import Plan, build_plan, create_dest_table
from runner.jobs.backfill.pools import named_pools
from runner.jobs.backfill.spec import parse_spec
from runner.jobs.backfill.sql import (
    STAGE,
    WATERMARK_GET,
    WATERMARK_SET,
    TypedFilter,
    not_after_sql,
    quote_ident,
    range_filters,
)

T = TypeVar("T")
Route = Literal["direct", "probe", "stage"]  # how a batch enters the destination
READ_AHEAD = 2
RETRY_FOR_S = 120.0
TRANSIENT = (*TRANSIENT_ERRORS, PoolExhausted, DatabaseUnavailable, asyncpg.PostgresConnectionError,
             asyncpg.exceptions.CannotConnectNowError, asyncpg.exceptions.AdminShutdownError,
             asyncpg.exceptions.CrashShutdownError, asyncpg.exceptions.DeadlockDetectedError,
             asyncpg.exceptions.SerializationError,
             # a statement or lock timeout: typically a frozen owner's transaction, which the server ends
             # at idle_in_transaction_session_timeout; the retry then goes through
             asyncpg.exceptions.QueryCanceledError, asyncpg.exceptions.LockNotAvailableError)

DATA_ERROR_CLASSES = ("22", "23")  # data exception, integrity constraint violation: the same on every retry
MAX_DETAIL_CHARS = 200
# unique, foreign key, exclusion: the detail names the conflicting key (the others' detail is the whole row)
KEY_DETAIL_STATES = ("23505", "23503", "23P01")
PROBE = "runner_backfill_probe"
NUMERIC_KEYS = ("smallint", "integer", "bigint", "numeric")


MIN_BATCH_ROWS = 10  # a batch is halved on a statement timeout down to this
# The first batch of an attempt is at most this many rows: its COPY data gives the bytes per row, from which
# later batches are sized to --batch-bytes (a 100k-row batch of 3.5 kB rows would be 350 MB).
FIRST_BATCH_ROWS = 100
PROGRESS_LOG_EVERY_S = 10.0  # a long backfill logs rows, rows/s and ETA this often
# Under pressure (lock waits, statement timeouts at the smallest batch, deadlocks) a backfill pauses, up to
# PRESSURE_MAX_PAUSE_S at a time, halves its rate and goes on; it fails only after this long without a batch.
PRESSURE_MAX_PAUSE_S = 30.0
PRESSURE_GIVE_UP_S = 3600.0
SPEED_UP_AFTER_BATCHES = 5  # clean batches after which a slowed-down backfill doubles its rate
RECENT_BATCHES = 10  # the rate reached is measured over this many batches


class Throttle:
    """Paces batches to at most ``rate`` rows per second on average (None: no limit); the first is free.

    Under pressure :meth:`slow_down` halves the rate the last batches reached; after
    SPEED_UP_AFTER_BATCHES clean batches :meth:`clean_batch` doubles it, back up to the cap given."""

    def __init__(self, rate: float | None) -> None:
        self.cap = rate  # the user's --max-rows-per-second (None: none)
        self.rate = rate
        self.started: float | None = None
        self.granted = 0
        self.clean = 0
        self.reached = 0.0  # the rate before the last slow-down: past it, an uncapped copy is uncapped again
        self.recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=RECENT_BATCHES)

    async def wait(self, rows: int) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        if self.started is None:
            self.started = now
        due = self.started + self.granted / self.rate
        if due > now:
            await asyncio.sleep(due - now)
        self.granted += rows

    def slow_down(self) -> float | None:
        """Half the rate the last batches reached (at least 1 row/s); None while too few batches went
        through to tell. The pacing starts again from now."""
        if len(self.recent) < 2 or self.recent[-1][0] <= self.recent[0][0]:
            return None
        rows = sum(n for _, n in list(self.recent)[1:])
        reached = rows / (self.recent[-1][0] - self.recent[0][0])
        self.reached = max(self.reached, reached)
        self.rate = max(1.0, min(self.rate or reached, reached) / 2)
        self.started, self.granted, self.clean = None, 0, 0
        self.recent.clear()
        return self.rate

    def clean_batch(self, rows: int) -> None:
        self.recent.append((time.monotonic(), rows))
        if self.rate is None or self.rate == self.cap:
            return
        self.clean += 1
        if self.clean >= SPEED_UP_AFTER_BATCHES:
            faster = self.rate * 2
            self.rate = None if self.cap is None and faster >= self.reached else min(faster, self.cap or faster)
            self.started, self.granted, self.clean = None, 0, 0


def is_pressure(error: BaseException) -> bool:
    """A database too busy for this batch right now: a lock wait that timed out, a statement timeout, a
    deadlock. Slowing down helps; failing the job would not."""
    return is_statement_timeout(error) or isinstance(
        error, asyncpg.exceptions.LockNotAvailableError | asyncpg.exceptions.DeadlockDetectedError)


def is_data_error(error: BaseException) -> bool:
    return isinstance(error, asyncpg.PostgresError) and str(error.sqlstate or "")[:2] in DATA_ERROR_CLASSES


@dataclass(frozen=True)
class Offender:
    key: str
    error: asyncpg.PostgresError
    column: str | None


@dataclass(frozen=True)
class Batch:
    lower: str | None  # exclusive
    upper: str  # inclusive: the batch's last key as text, which becomes the checkpoint
    rows: int
    data: bytes  # COPY data in the plan's format


@dataclass
class Position:
    last_key: str | None
    done: int
    total: int


def with_filters(plan: Plan, extra: tuple[TypedFilter, ...]) -> Plan:
    filters = plan.statements.filters + extra
    return dataclasses.replace(plan, statements=dataclasses.replace(plan.statements, filters=filters))


async def handle(ctx: JobContext) -> dict[str, Any] | None:
    spec = parse_spec(ctx.payload)
    pools = named_pools(ctx.app)
    async with pools.use(spec.source) as source_db, pools.use(spec.dest) as dest_db:
        plan = await retrying(ctx, "validate", functools.partial(build_plan, spec, source_db, dest_db))
        if plan.dest is None:
            await retrying(ctx, "create table", functools.partial(create_dest_table, plan, dest_db))
            plan = await retrying(ctx, "validate", functools.partial(build_plan, spec, source_db, dest_db))
        if spec.parallel > 1:
            from runner.jobs.backfill.parallel import run_parent

            return await run_parent(ctx, plan, source_db)
        if spec.chunk is not None:
            plan = with_filters(plan, range_filters(plan.key, spec.chunk.after, spec.chunk.upto))
        window: Window | None = None
        if spec.since_column is not None:
            window = await retrying(ctx, "watermark", functools.partial(since_window, ctx, plan, source_db))
            if window.upto is None:
                ctx.log.info("incremental backfill: no rows past the watermark", watermark=window.after)
                return window.result(0)
            plan = window.applied(plan)
        backfill = Backfill(ctx, plan, source_db, dest_db, await start(ctx, plan, source_db), window)
        await backfill.run()
        if ctx.completed_in_transaction:
            return None  # the last batch completed the job, its result with it
        if window is not None:  # the watermark moves with the completion
            async def settle() -> None:
                async with ctx.app.db.transaction() as connection:
                    await backfill.complete(connection)

            await retrying(ctx, "watermark", settle)
            return None
        return backfill.result()


@dataclass(frozen=True)
class Window:
    """One incremental run: the rows whose since_column is past ``after`` (the stored watermark; None: the
    first run) and at most ``upto`` (its largest value when the run began; None: nothing new)."""

    stream: str
    column: Column
    after: str | None
    upto: str | None

    def applied(self, plan: Plan) -> Plan:
        assert self.upto is not None
        return with_filters(plan, range_filters(self.column, self.after, self.upto))

    def checkpoint(self) -> dict[str, Any]:
        return {"since": [self.after, self.upto]}

    def result(self, rows: int) -> dict[str, Any]:
        return {"rows": rows, "since": self.after, "watermark": self.upto or self.after}


async def since_window(ctx: JobContext, plan: Plan, source_db: Database) -> Window:
    """The window a resumed attempt already began (its checkpoint), else from the stored watermark."""
    spec = plan.spec
    assert spec.since_column is not None
    column = plan.source.column(spec.since_column)
    assert column is not None
    saved = (ctx.saved_checkpoint or {}).get("since")
    if isinstance(saved, list) and len(saved) == 2:
        return Window(spec.stream, column, saved[0], saved[1])
    after = await ctx.app.db.fetchval(WATERMARK_GET, spec.stream)
    sql, args = plan.statements.since_max(column)
    upto = await source_db.fetchval(sql, *args)
    if upto is not None and after is not None and await source_db.fetchval(not_after_sql(column.type), upto, after):
        upto = None  # nothing changed since the last run
    return Window(spec.stream, column, after, upto)


async def start(ctx: JobContext, plan: Plan, source_db: Database) -> Position:
    """Where to begin: the checkpoint's last key and progress, or the beginning with a fresh count."""
    last_key = (ctx.saved_checkpoint or {}).get("last_key")
    if last_key is not None and ctx.job.progress_total is not None:
        ctx.log.info("resuming backfill", last_key=last_key, done=ctx.job.progress_done, total=ctx.job.progress_total)
        return Position(str(last_key), ctx.job.progress_done, ctx.job.progress_total)
    sql, args = plan.statements.count()
    total = int(await retrying(ctx, "count", functools.partial(source_db.fetchval, sql, *args)))
    await ctx.progress(0, total)
    ctx.log.info("backfill counted", total=total, batch_size=plan.spec.batch_size, mode=plan.spec.mode)
    return Position(None, 0, total)


def is_statement_timeout(error: BaseException) -> bool:
    return isinstance(error, asyncpg.exceptions.QueryCanceledError) and "statement timeout" in str(error)


async def retrying(ctx: JobContext, step: str, operation: Callable[[], Awaitable[T]], *,
                   shrinkable: bool = False) -> T:
    """``operation``, retried on transient errors for up to RETRY_FOR_S. ``shrinkable``: a batch step, whose
    pressure errors (:func:`is_pressure`) are not retried as is but raised, for the pipeline to go on with
    smaller batches or more slowly."""
    def warn(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        ctx.log.warning("backfill step failed; retrying", step=step, error=repr(error), attempt=state.attempt_number)

    def transient(error: BaseException) -> bool:
        return isinstance(error, TRANSIENT) and not (shrinkable and is_pressure(error))

    async for attempt in AsyncRetrying(
        retry=retry_if_exception(transient),
        stop=stop_after_delay(RETRY_FOR_S),
        wait=wait_exponential_jitter(multiplier=0.1, max=2.0, jitter=0.1),
        before_sleep=warn,
        reraise=True,
    ):
        with attempt:
            return await operation()
    raise AssertionError("unreachable")  # pragma: no cover - tenacity either returns or raises


class Backfill:
    def __init__(self, ctx: JobContext, plan: Plan, source_db: Database, dest_db: Database, at: Position,
                 window: Window | None = None) -> None:
        self.window = window
        saved = (ctx.saved_checkpoint or {}).get("counts")
        # rows inserted, updated (upserts) and skipped (existing keys) by every attempt: kept in the checkpoint
        self.counts: dict[str, int] = dict(saved) if isinstance(saved, dict) else {
            "inserted": 0, "updated": 0, "skipped": 0}
        self.throttle = Throttle(plan.spec.max_rows_per_second)
        shrunk = (ctx.saved_checkpoint or {}).get("batch_size")  # a smaller size an earlier attempt settled on
        self.batch_size = min(plan.spec.batch_size, shrunk) if isinstance(shrunk, int) and shrunk > 0 \
            else plan.spec.batch_size
        self.row_bytes: float | None = None  # COPY bytes per row, from the batches read so far
        # Half the statement timeout: a write that waits on a lock fails as a lock wait, before it times out.
        self.lock_timeout_ms = int(ctx.app.settings.statement_timeout * 500)
        self.next_log = time.monotonic() + PROGRESS_LOG_EVERY_S
        self.started = time.monotonic()
        self.done_at_start = at.done
        self.ctx = ctx
        self.plan = plan
        self.statements = plan.statements
        self.source_db = source_db
        self.dest_db = dest_db
        self.at = at
        self.atomic = plan.spec.atomic_checkpoint
        self.route: Route = "stage"

    async def run(self) -> None:
        started, done_before = time.monotonic(), self.at.done
        await self._pipeline()
        await self._finish(time.monotonic() - started, self.at.done - done_before)

    async def _finish(self, elapsed: float, moved: int) -> None:
        if self.at.done != self.at.total and not self.ctx.completed_in_transaction:
            self.ctx.log.warning("the source changed during the backfill", counted=self.at.total, copied=self.at.done)
            self.at.total = self.at.done
            await self.ctx.progress(self.at.done, self.at.total)
        self.ctx.log.info("backfill finished", rows=self.at.done, rows_this_attempt=moved, **self.counts,
                          seconds=round(elapsed, 3), rows_per_s=round(moved / elapsed) if elapsed > 0 else None)

    # --- progress -------------------------------------------------------------------------------
    async def _checkpoint(
        self, upper: str, rows: int, connection: asyncpg.Connection | None, last: bool = False
    ) -> None:
        done = self.at.done + rows
        if last and done != self.at.total:  # the source changed while we copied: the total is what we moved
            self.ctx.log.warning("the source changed during the backfill", counted=self.at.total, copied=done)
            self.at.total = done
        state: dict[str, Any] = {"last_key": upper, "counts": self.counts, "batch_size": self.batch_size,
                                 **(self.window.checkpoint() if self.window else {})}
        await self.ctx.checkpoint(state, done=done, total=self.at.total, connection=connection)

    async def complete(self, connection: asyncpg.Connection, last_rows: int = 0) -> None:
        """Succeed in ``connection``'s transaction (the runner's database), with an incremental run's new
        watermark: both commit, or neither."""
        if self.window is not None:
            await connection.execute(WATERMARK_SET, self.window.stream, self.window.upto, self.ctx.job_id)
        await self.ctx.complete_in(connection, self.result(self.at.done + last_rows))

    def result(self, rows: int | None = None) -> dict[str, Any]:
        """The job's result: rows copied, inserted / updated / skipped, this attempt's seconds (and an
        incremental run's window)."""
        rows = self.at.done if rows is None else rows
        found = {"rows": rows, **self.counts, "seconds": round(time.monotonic() - self.started, 3)}
        return {**found, **self.window.result(rows)} if self.window is not None else found

    def _advance(self, upper: str, rows: int) -> None:
        self.at.last_key, self.at.done = upper, self.at.done + rows

    async def _reload(self) -> None:
        """After a failed write: the committed checkpoint is the truth (the commit may have happened)."""
        job = await self.ctx.app.queue.job_get(self.ctx.job_id)
        if job["status"] == "succeeded" and job["lease_epoch"] == self.ctx.job.lease_epoch and self.atomic:
            self.ctx.completed_in_transaction = True  # the last batch committed with the completion
        elif job["status"] != "running" or job["lease_epoch"] != self.ctx.job.lease_epoch:
            raise LeaseLost(f"job {self.ctx.job_id}: lease epoch {self.ctx.job.lease_epoch} is no longer current")
        last_key = (job["checkpoint"] or {}).get("last_key")
        self.at.last_key = None if last_key is None else str(last_key)
        counts = (job["checkpoint"] or {}).get("counts")
        if isinstance(counts, dict):
            self.counts = dict(counts)
        self.at.done = job["progress_done"]

    async def _write(self, step: str, write: Callable[[], Awaitable[None]]) -> None:
        first = True

        async def attempt() -> None:
            nonlocal first
            if not first:
                await self._reload()
            first = False
            await write()

        await retrying(self.ctx, step, attempt, shrinkable=True)

    # --- the pipeline: COPY out, COPY in -------------------------------------------------------------
    async def _pipeline(self) -> None:
        """Batches until the end, from the committed checkpoint after each setback: a batch that hits the
        statement timeout is tried again at half the size, so wide rows under a short timeout still make
        progress; under pressure (a lock wait, a timeout at the smallest batch, a deadlock) the copy pauses
        and goes on at half the rate instead of failing (for up to PRESSURE_GIVE_UP_S without a batch)."""
        pause, since = 0.0, None
        while True:
            done_before = self.at.done
            try:
                await self._pipeline_once()
                return
            except asyncpg.PostgresError as error:
                if not is_pressure(error):
                    raise
                went_on = self.at.done > done_before or since is None  # batches went through since the last setback
                if went_on:
                    pause, since = 0.0, None
                if is_statement_timeout(error) and self.batch_size > MIN_BATCH_ROWS:
                    self.batch_size = max(MIN_BATCH_ROWS, self.batch_size // 2)
                    self.ctx.log.warning("backfill batch hit the statement timeout; halving the batch",
                                         batch_size=self.batch_size, error=str(error))
                else:
                    now = time.monotonic()
                    since = now if since is None else since
                    if now - since > PRESSURE_GIVE_UP_S:
                        raise
                    pause = min(PRESSURE_MAX_PAUSE_S, max(0.25, pause * 2))
                    if went_on:  # once per episode: while nothing goes through, only the pauses grow
                        self.throttle.slow_down()
                    rate = self.throttle.rate
                    self.ctx.log.warning("backfill under database pressure; pausing, then slowing down",
                                         pause_s=pause, rows_per_s=None if rate is None else round(rate),
                                         error=str(error))
                    self.ctx.raise_if_cancelled()
                    await asyncio.sleep(pause)
                await retrying(self.ctx, "reload checkpoint", self._reload)
                if self.ctx.completed_in_transaction:
                    return

    async def _pipeline_once(self) -> None:
        self.route = await retrying(self.ctx, "probe destination", self._choose_route, shrinkable=True)
        queue: asyncio.Queue[Batch | BaseException | None] = asyncio.Queue(maxsize=READ_AHEAD)
        reader = asyncio.create_task(self._read_ahead(queue), name=f"backfill-read-{self.ctx.job_id}")
        try:
            item = await queue.get()
            while item is not None:
                if isinstance(item, BaseException):
                    raise item
                # Look one batch ahead: the last one, when atomic, also completes the job.
                following = await queue.get()
                self.ctx.raise_if_cancelled()
                await self.throttle.wait(item.rows)
                await self._write("write batch", functools.partial(self._write_batch, item, following is None))
                self.throttle.clean_batch(item.rows)
                self._log_progress()
                item = following
        finally:
            reader.cancel()
            await asyncio.wait([reader])

    def _log_progress(self) -> None:
        now = time.monotonic()
        if now < self.next_log:
            return
        self.next_log = now + PROGRESS_LOG_EVERY_S
        elapsed = now - self.started
        rate = (self.at.done - self.done_at_start) / elapsed if elapsed > 0 else 0.0
        left = max(0, self.at.total - self.at.done)
        self.ctx.log.info("backfill progress", rows=self.at.done, total=self.at.total, rows_per_s=round(rate),
                          eta_s=round(left / rate) if rate > 0 else None, **self.counts)

    async def _read_ahead(self, queue: asyncio.Queue[Batch | BaseException | None]) -> None:
        lower = self.at.last_key
        try:
            while True:
                batch = await retrying(self.ctx, "read batch", functools.partial(self._read, lower), shrinkable=True)
                await queue.put(batch)
                if batch is None:
                    return
                lower = batch.upper
        except Exception as error:  # handed to the writer, which raises it
            await queue.put(error)

    def _batch_rows(self) -> int:
        """Rows in the next batch: batch_size (or the smaller size a statement timeout left), and no more
        than fit in batch_bytes at the bytes per row seen so far."""
        if self.row_bytes is None:
            return min(self.batch_size, FIRST_BATCH_ROWS)
        fit = int(self.plan.spec.batch_bytes / max(self.row_bytes, 1.0))
        return max(1, min(self.batch_size, max(MIN_BATCH_ROWS, fit)))

    def _saw(self, batch: Batch) -> None:
        if batch.rows:
            seen = len(batch.data) / batch.rows  # wider rows count at once; narrower ones by halves
            self.row_bytes = seen if self.row_bytes is None else max(seen, (self.row_bytes + seen) / 2)

    async def _read(self, lower: str | None) -> Batch | None:
        bound_sql, args = self.statements.upper_bound(lower, self._batch_rows())
        chunks: list[bytes] = []

        async def sink(data: bytes) -> None:
            chunks.append(data)

        async with self.source_db.connection() as connection:
            upper = await connection.fetchval(bound_sql, *args)
            if upper is None:
                return None
            status = await connection.copy_from_query(
                self.statements.copy_out(lower, upper), output=sink, format=self.plan.copy_format)
        batch = Batch(lower, upper, copied_rows(status), b"".join(chunks))
        self._saw(batch)
        return batch

    async def _write_batch(self, batch: Batch, last: bool = False) -> None:
        if self.at.last_key == batch.upper:
            return  # committed already: the failure came after the commit
        if self.at.last_key != batch.lower:
            raise RuntimeError(f"backfill reader and writer disagree: at {self.at.last_key!r}, batch from "
                               f"{batch.lower!r}")
        direct = self.route == "direct" or (
            self.route == "probe" and not await self._dest_has(batch.lower, batch.upper))
        try:
            try:
                await self._commit_batch(batch, direct, last)
            except asyncpg.UniqueViolationError:
                if not direct:
                    raise
                self.ctx.log.info("destination keys appeared in the batch range; probing each batch from now on")
                self.route = "probe"
                await self._commit_batch(batch, direct=False, last=last)
        except asyncpg.PostgresError as error:
            if not is_data_error(error):
                raise
            # fatal: every attempt would fail on the same row (the batch rolled back, the checkpoint stays)
            raise PayloadError(await self._describe_data_error(batch, error)) from None

    async def _commit_batch(self, batch: Batch, direct: bool, last: bool = False) -> None:
        before = dict(self.counts)
        try:
            await self._commit_batch_counted(batch, direct, last)
        except BaseException:
            self.counts = before  # rolled back (or unknown: _reload re-reads the committed checkpoint)
            raise
        if not self.atomic:
            await self._checkpoint(batch.upper, batch.rows, None)
        self._advance(batch.upper, batch.rows)

    async def _commit_batch_counted(self, batch: Batch, direct: bool, last: bool) -> None:
        async with self.dest_db.transaction() as connection:
            if self.lock_timeout_ms:  # a lock wait is pressure, not a batch too big: tell the two apart
                await connection.execute(f"SET LOCAL lock_timeout = {self.lock_timeout_ms}")
            if direct:
                await self._copy(connection, batch, self.plan.spec.dest_table.name, self.plan.spec.dest_table.schema)
                self.counts["inserted"] += batch.rows
            else:
                await connection.execute(self.statements.create_stage())
                await self._copy(connection, batch, STAGE, None)
                written = await connection.fetchrow(self.statements.insert_from_stage_counted())
                assert written is not None
                self.counts["inserted"] += written["inserted"]
                self.counts["updated"] += written["updated"]
                self.counts["skipped"] += batch.rows - written["inserted"] - written["updated"]
            if self.atomic:
                await self._checkpoint(batch.upper, batch.rows, connection, last)
                if last:
                    await self.complete(connection, batch.rows)

    # --- a row that does not fit ---------------------------------------------------------------------
    def _show_key(self, key: str) -> str:
        shown = key if self.statements.key.base_type in NUMERIC_KEYS else repr(key)
        return f"{self.statements.key.name}={shown}"

    async def _describe_data_error(self, batch: Batch, error: asyncpg.PostgresError) -> str:
        """One line: the first offending row's key, the error and its column, and where the copy stands."""
        try:
            offender = await self.locate(batch)
        except asyncpg.PostgresError as probe_error:
            if not is_data_error(probe_error) and not permanent_probe_error(probe_error):
                raise  # transient: the write is retried (and the row looked for again)
            self.ctx.log.warning("could not find the row that does not fit", error=repr(probe_error))
            offender = None
        key = self.statements.key.name
        if offender is None:
            lower = "" if batch.lower is None else f"{key} > {batch.lower} and "
            where = f"a row with {lower}{key} <= {batch.upper}"
            message, label = error_text(error), error_label(error)
        else:
            where = f"row with {self._show_key(offender.key)}"
            message = error_text(offender.error)
            label = f"column {offender.column}" if offender.column else error_label(offender.error)
        at = "nothing copied yet" if self.at.last_key is None else \
            f"copied through {self._show_key(self.at.last_key)}, {self.at.done:,} rows"
        return (f"{where}: {message}{f' ({label})' if label else ''}; the batch was rolled back "
                f"({at}; fix the data or the destination, then runner retry resumes there)")

    async def locate(self, batch: Batch) -> Offender | None:
        """The batch's first row (in key order) whose write fails, in a transaction that is rolled back.

        The batch goes into the stage; then the rows after the last known-good prefix go in by halves,
        each in a savepoint: a half that fails is rolled back and split, one that fits stays in place.
        About 2 x batch_size rows and log2(batch_size) statements."""
        async with self.dest_db.connection() as connection:
            transaction = connection.transaction()
            await transaction.start()
            try:
                await connection.execute("SET CONSTRAINTS ALL IMMEDIATE")  # deferred ones fail on their row
                await connection.execute(self.statements.create_stage())
                await self._copy(connection, batch, STAGE, None)
                keys: list[str] = [r[0] for r in await connection.fetch(self.statements.stage_keys())]
                insert = self.statements.insert_from_stage_range()

                async def fails(start: int, stop: int) -> asyncpg.PostgresError | None:
                    try:
                        async with connection.transaction():  # a savepoint
                            await connection.execute(insert, keys[start - 1] if start else None, keys[stop - 1])
                    except asyncpg.PostgresError as error:
                        if not is_data_error(error):
                            raise
                        return error
                    return None

                good, bad = 0, len(keys)  # keys[:good] are in and fit; keys[:bad] do not
                while bad - good > 1:
                    middle = (good + bad) // 2
                    if await fails(good, middle) is None:
                        good = middle
                    else:
                        bad = middle
                error = await fails(good, good + 1) if keys else None
                if error is None:
                    return None  # not reproduced (the destination changed since)
                return Offender(keys[good], error, await self._offending_column(connection, keys[good]))
            finally:
                await transaction.rollback()

    async def _offending_column(self, connection: asyncpg.Connection, key: str) -> str | None:
        """The first column of the row whose value alone the destination's type refuses."""
        dest = self.plan.dest
        if dest is None:
            return None
        for number, column in enumerate(self.statements.columns):
            target = dest.column(column.name)
            if target is None or target.type == column.type:
                continue
            probe = quote_ident(f"{PROBE}_{number}")
            try:
                async with connection.transaction():
                    await connection.execute(f"CREATE TEMP TABLE {probe} (v {target.type}) ON COMMIT DROP")
                    await connection.execute(self.statements.probe_column(probe, column), key)
            except asyncpg.PostgresError as error:
                if not is_data_error(error):
                    raise
                return column.name
        return None

    async def _choose_route(self) -> Route:
        """COPY straight into the table while the destination holds no key past ours (checked once), else
        probe each batch's range, else (other column types) always go through the stage."""
        if not self.plan.copy_direct:
            return "stage"
        chunk = self.plan.spec.chunk  # only this chunk's range: the next chunks may be writing theirs
        lower = self.at.last_key if self.at.last_key is not None or chunk is None else chunk.after
        return "probe" if await self._dest_has(lower, chunk.upto if chunk else None) else "direct"

    async def _dest_has(self, lower: str | None, upper: str | None) -> bool:
        sql, args = self.statements.any_in_range(lower, upper)
        return bool(await self.dest_db.fetchval(sql, *args))

    async def _copy(self, connection: asyncpg.Connection, batch: Batch, table: str, schema: str | None) -> None:
        # a memoryview, because asyncpg would take bytes for a file path
        await connection.copy_to_table(table, schema_name=schema, columns=self.statements.column_names,
                                       source=memoryview(batch.data),  # type: ignore[arg-type]  # stubs omit buffers
                                       format=self.plan.copy_format)


def permanent_probe_error(error: asyncpg.PostgresError) -> bool:
    """An error of the search itself that a retry would not change (a schema or syntax error)."""
    return not isinstance(error, TRANSIENT)


def error_text(error: asyncpg.PostgresError) -> str:
    message = str(getattr(error, "message", None) or error)
    detail = getattr(error, "detail", None)
    if detail and error.sqlstate in KEY_DETAIL_STATES:
        message += f" ({str(detail)[:MAX_DETAIL_CHARS]})"
    return message


def error_label(error: asyncpg.PostgresError) -> str | None:
    """"column x" or "constraint y", as far as the server said."""
    column = getattr(error, "column_name", None)
    constraint = getattr(error, "constraint_name", None)
    if column:
        return f"column {column}"
    return f"constraint {constraint}" if constraint else None


def copied_rows(status: str) -> int:
    """'COPY 10000' -> 10000."""
    return int(status.rsplit(" ", 1)[-1])
