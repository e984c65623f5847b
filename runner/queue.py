"""The queue's narrow interface: Entity-verb methods with typed parameters over ``queue_sql``."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from runner import queue_sql as sql
from runner.db import Database
from runner.errors import JobNotFound, UsageError

Outcome = Literal["succeeded", "cancelled", "released", "snoozed", "error", "fatal"]
FINISHED = ("succeeded", "failed", "cancelled")
# Finished jobs are counted exactly up to this many rows (the newest, through the finished index); past it
# their counts are estimates, so a count never reads the whole history.
FINISHED_EXACT_UP_TO = 10_000


@dataclass(frozen=True, slots=True)
class NewJob:
    kind: str
    payload: dict[str, Any]
    queue: str = "default"
    priority: int = 0
    delay_s: float = 0.0
    max_attempts: int | None = None  # None: the kind's own policy, else RUNNER_DEFAULT_MAX_ATTEMPTS
    dedupe_key: str | None = None
    parent_id: int | None = None  # the job this one was made by (its cancel and retry reach this one)
    fifo_key: str | None = None  # jobs sharing a key run one at a time, in enqueue (id) order
    # With fifo_key: join the key's waiting (pending) job of this kind when there is one, instead of adding
    # another; that job then does this one's work too (its handler works through whatever its key has),
    # no later than this one would have run.
    coalesce: bool = False


@dataclass(slots=True)  # not frozen: one per job, and a frozen __init__ costs 5x as much
class ClaimedJob:
    id: int
    kind: str
    queue: str
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    recoveries: int
    lease_epoch: int
    progress_done: int
    progress_total: int | None
    checkpoint: dict[str, Any] | None
    cancel_requested: bool = False
    undecodable: str | None = None  # why the payload or checkpoint could not be decoded: the job fails
    schedule_tick: datetime | None = None  # a periodic job's tick (runner.schedules)

    @classmethod
    def from_record(cls, row: asyncpg.Record) -> ClaimedJob:
        """CLAIM returns the columns in field order, payload and checkpoint as JSON text."""
        (job_id, kind, queue, payload_text, attempts, max_attempts, recoveries, epoch, done, total,
         checkpoint_text, cancel_requested, schedule_tick, *_) = row  # CLAIM_CAPPED adds `seen`
        try:
            payload = json.loads(payload_text)
            checkpoint = None if checkpoint_text is None else json.loads(checkpoint_text)
        except (ValueError, RecursionError) as error:  # too deep, a number too long, ...
            reason = f"payload cannot be decoded: {type(error).__name__}: {str(error)[:200]}"
            return cls(job_id, kind, queue, {}, attempts, max_attempts, recoveries, epoch, done, total, None,
                       cancel_requested, reason, schedule_tick)
        return cls(job_id, kind, queue, payload, attempts, max_attempts, recoveries, epoch, done, total,
                   checkpoint, cancel_requested, None, schedule_tick)


@dataclass(slots=True)  # not frozen: one per job, and a frozen __init__ costs 5x as much
class JobOutcome:
    job_id: int
    lease_epoch: int
    kind: str
    outcome: Outcome
    error: str | None = None
    delay_s: float = 0.0  # when it goes back to pending: seconds before it may run again
    result: str | None = None  # the handler's return value as JSON text, stored when it succeeded
    # The handler called ctx.complete_in: if that transaction committed, this outcome is refused (the job
    # is no longer running) and that refusal is the expected end, not a lost lease.
    settled_in_transaction: bool = False


@dataclass(slots=True)  # not frozen: one per job, and a frozen __init__ costs 5x as much
class WrittenOutcome:
    job_id: int
    kind: str
    status: str
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class CompletionResult:
    written: list[WrittenOutcome]
    busy: set[int]  # still ours but locked by someone else: write again later


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    held: set[int]  # still ours (renewed, or skipped because someone holds the row locked)
    renewed: set[int]


@dataclass(frozen=True, slots=True)
class RescuedJob:
    job_id: int
    kind: str
    status: str


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    id: str
    queues: tuple[str, ...]
    concurrency: int
    host: str = socket.gethostname()
    pid: int = os.getpid()


BIGINT_MAX = 2**63 - 1


def check_job_id(job_id: int) -> None:
    """Ids are positive bigints: anything else names no job (said before asking the database)."""
    if isinstance(job_id, bool) or not isinstance(job_id, int) or not 1 <= job_id <= BIGINT_MAX:
        raise JobNotFound(f"no job with id {job_id!r} (ids are integers from 1 to {BIGINT_MAX})")


def _decoded(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        return {"undecodable": f"{type(error).__name__}: {str(error)[:200]}", "json_prefix": text[:200]}


def job_row(row: asyncpg.Record) -> dict[str, Any]:
    """A GET_JOB / LIST_JOBS row with its JSON columns decoded."""
    job = dict(row)
    for column in ("payload", "checkpoint", "result"):
        job[column] = _decoded(job[column])
    return job


class JobQueue:
    def __init__(self, db: Database, max_attempts_for: Callable[[str], int] | None = None) -> None:
        self.db = db
        # The attempts a new job of a kind gets when the caller names none (the kind's policy, then settings).
        self.max_attempts_for = max_attempts_for or (lambda _kind: 5)

    # --- producers ------------------------------------------------------------------------------
    async def job_enqueue_many(
        self, jobs: Sequence[NewJob], connection: asyncpg.Connection | None = None,
        payloads_json: Sequence[str] | None = None,
    ) -> list[int]:
        """Insert jobs in one statement (one transaction) and NOTIFY their queues. Deduped jobs are skipped.
        ``payloads_json``: the payloads already encoded (runner.App's checks encode them once)."""
        args = (
            [j.kind for j in jobs],
            [j.queue for j in jobs],
            list(payloads_json) if payloads_json is not None else [json.dumps(j.payload) for j in jobs],
            [j.priority for j in jobs],
            [j.delay_s for j in jobs],
            [j.max_attempts if j.max_attempts is not None else self.max_attempts_for(j.kind) for j in jobs],
            [j.dedupe_key for j in jobs],
            [j.parent_id for j in jobs],
            [j.fifo_key for j in jobs],
        )
        if connection is not None:
            rows = await connection.fetch(sql.ENQUEUE, *args)
        else:
            rows = await self.db.fetch(sql.ENQUEUE, *args)
        return [row["id"] for row in rows]

    async def job_enqueue_in(
        self, connection: asyncpg.Connection, job: NewJob, payload_json: str | None = None
    ) -> tuple[int, bool]:
        """Enqueue one job inside the caller's transaction; (id, created): with its dedupe key held by an
        unfinished job, that job's id; coalesced, the waiting job it joined (locked until the caller's
        commit, so no claim takes it before this transaction's work is visible). Raises a UsageError when
        the key's holder finished meanwhile."""
        if job.coalesce:
            waiting = await connection.fetchval(sql.JOIN_WAITING_OF_KEY, job.fifo_key, job.kind, job.delay_s)
            if waiting is not None:
                return int(waiting), False
        ids = await self.job_enqueue_many([job], connection, None if payload_json is None else [payload_json])
        if ids:
            return ids[0], True
        existing = await connection.fetchval(sql.FIND_UNFINISHED_BY_DEDUPE_KEY, job.dedupe_key)
        if existing is None:
            raise UsageError(f"dedupe key {job.dedupe_key!r}: its job finished during this enqueue; enqueue again")
        return int(existing), False

    async def job_enqueue(self, job: NewJob) -> tuple[int, bool]:
        """Enqueue one job; return (id, created). With a dedupe key already unfinished, the existing id."""
        async with self.db.transaction() as connection:
            ids = await self.job_enqueue_many([job], connection)
            if ids:
                return ids[0], True
            existing = await connection.fetchval(sql.FIND_UNFINISHED_BY_DEDUPE_KEY, job.dedupe_key)
        if existing is None:  # the other job finished between the two statements: try once more
            return await self.job_enqueue(job)
        return int(existing), False

    # --- the worker's hot path ------------------------------------------------------------------
    async def job_claim(
        self, queues: Sequence[str], limit: int, worker_id: str, lease_s: float, kinds: Sequence[str]
    ) -> list[ClaimedJob]:
        rows = await self.db.fetch(sql.CLAIM, list(queues), limit, worker_id, lease_s, list(kinds))
        return [ClaimedJob.from_record(row) for row in rows]

    async def job_claim_capped(
        self, queues: Sequence[str], limit: int, worker_id: str, lease_s: float, kinds: Sequence[str],
        rooms: Mapping[str, int],
    ) -> tuple[list[ClaimedJob], int]:
        """A claim that takes at most ``rooms[kind]`` jobs of each capped kind; also returns how many rows its
        walk took (``seen``: more than claimed when caps held some back)."""
        capped = [kind for kind in rooms if kind in kinds]
        rows = await self.db.fetch(sql.CLAIM_CAPPED, list(queues), limit, worker_id, lease_s, list(kinds),
                                   capped, [rooms[kind] for kind in capped])
        return [ClaimedJob.from_record(row) for row in rows], rows[0]["seen"] if rows else 0

    async def job_heartbeat(
        self, leases: Sequence[tuple[int, int]], worker: WorkerIdentity, lease_s: float
    ) -> HeartbeatResult:
        """Renew the given (id, epoch) leases and the worker row, skipping rows someone holds locked."""
        row = await self.db.fetchrow(
            sql.HEARTBEAT,
            [job_id for job_id, _ in leases],
            [epoch for _, epoch in leases],
            lease_s,
            worker.id,
            worker.host,
            worker.pid,
            ",".join(worker.queues),
            worker.concurrency,
            json.dumps(self.db.pool_use()),
            lane="control",
        )
        assert row is not None
        return HeartbeatResult(set(row["held"]), set(row["renewed"]))

    async def job_complete_many(self, outcomes: Sequence[JobOutcome]) -> CompletionResult:
        rows = await self.db.fetch(
            sql.COMPLETE,
            [o.job_id for o in outcomes],
            [o.lease_epoch for o in outcomes],
            [o.outcome for o in outcomes],
            [o.error for o in outcomes],
            [o.delay_s for o in outcomes],
            [o.result for o in outcomes],
            lane="control",
        )
        written = [WrittenOutcome(r["id"], r["kind"], r["status"], r["outcome"]) for r in rows if not r["busy"]]
        return CompletionResult(written, {r["id"] for r in rows if r["busy"]})

    async def job_complete_in_transaction(
        self, connection: asyncpg.Connection, job_id: int, lease_epoch: int, result: str | None = None
    ) -> bool:
        """Mark the job succeeded inside the caller's transaction; False when the lease is no longer ours."""
        row = await connection.fetchrow(sql.COMPLETE_IN_TRANSACTION, job_id, lease_epoch, result)
        return bool(row is not None and row["n"] == 1)

    async def job_release_owned_except(self, worker_id: str, keep: Sequence[int]) -> list[RescuedJob]:
        """Hand back (no attempt used) the running jobs owned by this worker that it does not run."""
        rows = await self.db.fetch(sql.RELEASE_OWNED_EXCEPT, worker_id, list(keep), lane="control")
        return [RescuedJob(r["id"], r["kind"], r["status"]) for r in rows]

    async def job_save_progress(
        self,
        job_id: int,
        lease_epoch: int,
        *,
        done: int | None,
        total: int | None,
        checkpoint: dict[str, Any] | None,
        connection: asyncpg.Connection | None = None,
    ) -> bool:
        """Fenced progress/checkpoint write; False when the lease is no longer ours."""
        args = (job_id, lease_epoch, done, total, checkpoint)  # the jsonb codec encodes the dict
        if connection is not None:
            status = await connection.execute(sql.SAVE_PROGRESS, *args)
        else:
            status = await self.db.execute(sql.SAVE_PROGRESS, *args)
        return status.endswith(" 1")

    async def job_cancel_requested_among(self, job_ids: Sequence[int]) -> list[int]:
        rows = await self.db.fetch(sql.CANCEL_REQUESTED_AMONG, list(job_ids), lane="control")
        return [row["id"] for row in rows]

    async def job_rescue_stale(self, max_recoveries: int, limit: int = 1000) -> list[RescuedJob]:
        rows = await self.db.fetch(sql.RESCUE_STALE, max_recoveries, limit, lane="control")
        return [RescuedJob(r["id"], r["kind"], r["status"]) for r in rows]

    async def job_delete_finished(self, older_than_s: float, limit: int = 10_000) -> int:
        status = await self.db.execute(sql.DELETE_FINISHED_BEFORE, older_than_s, limit)
        return int(status.split()[-1])

    async def job_table_dead_rows(self) -> int:
        """Dead row versions in runner_jobs by the statistics collector (updated within about a second)."""
        return int(await self.db.fetchval(sql.JOBS_DEAD_ROWS) or 0)

    async def job_table_may_vacuum(self) -> bool:
        return bool(await self.db.fetchval(sql.MAY_VACUUM_JOBS))

    async def job_table_vacuum(self) -> bool:
        """VACUUM runner_jobs unless another worker is doing it; True when this call ran it."""
        async with self.db.connection() as connection:
            if not await connection.fetchval(sql.TRY_VACUUM_LOCK):
                return False
            try:
                await connection.execute(sql.VACUUM_JOBS)  # no arguments: simple protocol, no transaction
            finally:
                await connection.fetchval(sql.VACUUM_UNLOCK)
        return True

    async def worker_id_in_use(self, worker: WorkerIdentity, lease_s: float) -> str | None:
        """'host:pid (heartbeat Ns ago)' of another live process using this worker id, or None."""
        row = await self.db.fetchrow(sql.WORKER_ID_IN_USE, worker.id, worker.host, worker.pid, lease_s, lane="control")
        return None if row is None else f"{row['host']}:{row['pid']} (heartbeat {float(row['age_s']):.1f}s ago)"

    async def worker_unregister(self, worker_id: str) -> None:
        await self.db.execute(sql.UNREGISTER_WORKER, worker_id, lane="control")

    async def worker_delete_dead(self, older_than_s: float) -> None:
        await self.db.execute(sql.DELETE_DEAD_WORKERS, older_than_s)

    async def job_has_runnable_or_running(self, queues: Sequence[str], kinds: Sequence[str]) -> bool:
        return bool(await self.db.fetchval(sql.HAS_RUNNABLE_OR_RUNNING, list(queues), list(kinds)))

    # --- operators ------------------------------------------------------------------------------
    async def job_get(self, job_id: int) -> dict[str, Any]:
        check_job_id(job_id)
        row = await self.db.fetchrow(sql.GET_JOB, job_id)
        if row is None:
            raise JobNotFound(f"no job with id {job_id}")
        return job_row(row)

    async def job_request_cancel(self, job_id: int) -> str:
        """Cancel a pending job at once, or ask the worker running it to stop. Returns the new status."""
        check_job_id(job_id)
        async with self.db.transaction() as connection:
            row = await connection.fetchrow(sql.LOCK_JOB, job_id)
            if row is None:
                raise JobNotFound(f"no job with id {job_id}")
            if row["status"] in FINISHED:
                raise UsageError(f"job {job_id} has already finished ({row['status']})")
            status = await connection.fetchval(sql.REQUEST_CANCEL, job_id)
            await connection.execute(sql.NOTIFY_CANCEL, str(job_id))
            await connection.execute(sql.CANCEL_CHILDREN, job_id)
        return str(status)

    async def job_retry(self, job_id: int) -> None:
        check_job_id(job_id)
        async with self.db.transaction() as connection:
            row = await connection.fetchrow(sql.LOCK_JOB, job_id)
            if row is None:
                raise JobNotFound(f"no job with id {job_id}")
            queue = await connection.fetchval(sql.RETRY, job_id)
            if queue is None:
                raise UsageError(f"job {job_id} is {row['status']}; only failed or cancelled jobs can be retried")
            await connection.execute(sql.NOTIFY_JOBS, queue)
            await connection.execute(sql.RETRY_CHILDREN, job_id)

    async def job_cancel_children(self, job_id: int) -> int:
        """Cancel the unfinished jobs ``job_id`` made (pending ones at once, running ones asked to stop)."""
        row = await self.db.fetchrow(sql.CANCEL_CHILDREN, job_id)
        return 0 if row is None else int(row["n"])

    async def job_notify(self, queues: Sequence[str]) -> None:
        """Wake the workers of these queues (NOTIFY runner_jobs), as an enqueue does."""
        await self.db.execute(sql.NOTIFY_JOBS_MANY, list(queues), lane="control")

    async def job_children(self, job_id: int, connection: asyncpg.Connection | None = None) -> list[dict[str, Any]]:
        """The jobs ``job_id`` made (a parallel backfill's chunks), oldest first, JSON columns decoded."""
        rows = await (connection.fetch(sql.CHILDREN, job_id) if connection is not None
                      else self.db.fetch(sql.CHILDREN, job_id))
        return [job_row(row) for row in rows]

    async def job_counts(self) -> list[tuple[str, str, int]]:
        """(kind, status, n), from job_counts_by_queue: finished counts may be estimates (see there)."""
        totals: dict[tuple[str, str], int] = {}
        for row in await self.job_counts_by_queue():
            totals[(row["kind"], row["status"])] = totals.get((row["kind"], row["status"]), 0) + int(row["n"])
        return [(kind, status, n) for (kind, status), n in totals.items()]

    async def job_counts_by_status(self) -> dict[str, int]:
        """Exact counts by status, scanning the whole table (history included): tests and one-off checks.
        Loops and `status` use job_depth_by_status / job_counts_by_queue, which never scan history."""
        rows = await self.db.fetch(sql.COUNT_BY_STATUS)
        return {r["status"]: r["n"] for r in rows}

    async def job_depth_by_status(self) -> tuple[dict[str, int], list[str]]:
        """Counts by status and the statuses among them that are estimates. Pending and running: exact, through
        the partial index on unfinished jobs. Finished: exact up to FINISHED_EXACT_UP_TO rows, else estimated
        from the planner's statistics (pg_class.reltuples x the status frequencies in pg_stats)."""
        counts = {r["status"]: int(r["n"]) for r in await self.db.fetch(sql.COUNT_UNFINISHED_BY_STATUS)}
        recent = {r["status"]: int(r["n"]) for r in
                  await self.db.fetch(sql.COUNT_RECENT_FINISHED_BY_STATUS, FINISHED_EXACT_UP_TO)}
        if sum(recent.values()) < FINISHED_EXACT_UP_TO:
            return {**counts, **recent}, []
        estimates = await self._finished_estimates()
        for status in FINISHED:
            n = max(estimates.get(status, 0), recent.get(status, 0))
            if n:
                counts[status] = n
        return counts, sorted(FINISHED)

    async def _finished_estimates(self) -> dict[str, int]:
        return {r["status"]: int(r["n"]) for r in await self.db.fetch(sql.ESTIMATE_FINISHED_BY_STATUS)}

    async def job_list_running(self, limit: int = 50) -> list[dict[str, Any]]:
        return [dict(r) for r in await self.db.fetch(sql.RUNNING_JOBS, limit)]

    # --- operations: list and bulk by filter ----------------------------------------------------
    async def job_list(
        self, where: JobFilter, *, limit: int = 50, before_id: int | None = None
    ) -> list[dict[str, Any]]:
        """Jobs matching the filter, newest first (the columns of job_get); the next page: before_id=last id."""
        if limit < 1:
            raise UsageError(f"limit must be positive, got {limit}")
        if before_id is not None:
            check_job_id(before_id)
        rows = await self.db.fetch(sql.LIST_JOBS, *where.arrays(), limit, before_id)
        return [job_row(row) for row in rows]

    async def job_cancel_where(self, where: JobFilter) -> int:
        """Cancel every pending job matching the filter and ask workers to stop the running ones (one NOTIFY
        each, as job_request_cancel). Returns how many jobs were cancelled or asked to stop."""
        where.only(("pending", "running"), "cancelled")
        return await self._bulk_where(sql.CANCEL_WHERE, where, await self._clock(0))

    async def job_retry_where(self, where: JobFilter) -> int:
        """Run the failed and cancelled jobs matching the filter again, attempts reset (as job_retry)."""
        where.only(("failed", "cancelled"), "retried")
        return await self._bulk_where(sql.RETRY_WHERE, where, await self._clock(0))

    async def job_purge_where(self, where: JobFilter, older_than_s: float = 0, batch: int = 10_000) -> int:
        """Delete finished jobs (never pending or running ones) matching the filter that finished more than
        older_than_s seconds ago, in batches of at most ``batch`` rows (one short statement each)."""
        where.only(FINISHED, "purged")
        if older_than_s < 0:
            raise UsageError(f"older than must not be negative, got {older_than_s:g}")
        if batch < 1:
            raise UsageError(f"batch must be positive, got {batch}")
        return await self._bulk_where(sql.PURGE_WHERE, where, await self._clock(older_than_s), batch)

    async def job_counts_by_queue(self) -> list[dict[str, Any]]:
        """Rows of queue, kind, status, delayed (pending with run_at in the future), n and estimated. Never
        scans history: pending and running jobs are counted exactly (partial index on unfinished jobs); so
        are finished ones up to FINISHED_EXACT_UP_TO rows. Past that, finished rows are estimated (estimated:
        true): each status's total from the planner's statistics, split by queue and kind in the
        proportions of the newest FINISHED_EXACT_UP_TO finished jobs."""
        rows = [{**dict(row), "estimated": False} for row in await self.db.fetch(sql.COUNT_UNFINISHED_BY_QUEUE)]
        recent = [dict(row) for row in await self.db.fetch(sql.COUNT_RECENT_FINISHED_BY_QUEUE, FINISHED_EXACT_UP_TO)]
        if sum(int(row["n"]) for row in recent) < FINISHED_EXACT_UP_TO:
            return rows + [{**row, "estimated": False} for row in recent]
        estimates = await self._finished_estimates()
        sampled: dict[str, int] = {}
        for row in recent:
            sampled[row["status"]] = sampled.get(row["status"], 0) + int(row["n"])
        for row in recent:
            total = max(estimates.get(row["status"], 0), sampled[row["status"]])
            n = round(int(row["n"]) * total / sampled[row["status"]])
            rows.append({**row, "n": n, "estimated": True})
        return rows

    async def live_workers_for_queue(self, queue: str, within_s: float) -> int:
        """Workers serving ``queue`` whose heartbeat is at most within_s seconds old."""
        return int(await self.db.fetchval(sql.LIVE_WORKERS_FOR_QUEUE, queue, within_s))

    async def clock(self) -> datetime:
        """The database server's now(): what job timestamps are measured against."""
        return await self._clock(0)  # type: ignore[no-any-return]

    async def _clock(self, minus_s: float) -> Any:
        from datetime import timedelta

        return await self.db.fetchval(sql.CLOCK) - timedelta(seconds=minus_s)

    async def _bulk_where(self, statement: str, where: JobFilter, cutoff: Any, batch: int = 10_000) -> int:
        """Run a bulk statement batch after batch until nothing matches. Rows other transactions hold (a
        claim, a completion flush) are skipped, not waited for; they are tried again until they come free,
        for at most BULK_LOCKED_WAIT_S without progress."""
        import asyncio

        total = 0
        loop = asyncio.get_running_loop()
        stalled_since: float | None = None
        while True:
            row = await self.db.fetchrow(statement, *where.arrays(), batch, cutoff)
            assert row is not None
            total += int(row["n"])
            if not row["more"]:
                return total
            if row["n"]:
                stalled_since = None
                continue
            now = loop.time()
            stalled_since = now if stalled_since is None else stalled_since
            if now - stalled_since > BULK_LOCKED_WAIT_S:
                return total
            await asyncio.sleep(0.05)


STATUSES = ("pending", "running", *FINISHED)
# How long a bulk operation retries rows that stay locked by others before it returns what it did.
BULK_LOCKED_WAIT_S = 5.0


@dataclass(frozen=True, slots=True)
class JobFilter:
    """Which jobs an operation applies to; an empty tuple means any status, kind or queue."""

    statuses: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    queues: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("statuses", "kinds", "queues"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = [s for s in self.statuses if s not in STATUSES]
        if unknown:
            raise UsageError(f"unknown status {unknown[0]!r} (known: {', '.join(STATUSES)})")

    def arrays(self) -> tuple[list[str], list[str], list[str]]:
        return list(self.statuses), list(self.kinds), list(self.queues)

    def only(self, allowed: Sequence[str], verb: str) -> None:
        """Refuse statuses an operation cannot apply to (a purge never touches a pending job)."""
        refused = [s for s in self.statuses if s not in allowed]
        if refused:
            raise UsageError(f"{refused[0]} jobs cannot be {verb} (only {', '.join(allowed)} ones)")
