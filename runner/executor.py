"""Runs claimed jobs as tasks, up to the worker's concurrency, and hands their outcomes to the completer.

The executor never holds a database connection: handlers borrow one per database step. Each attempt runs
under its kind's timeout; a handler that ignores its cancellation stops being renewed, so its lease
expires and the rescuer takes the job — no lease is renewed forever.
"""

from __future__ import annotations

import asyncio
import time
import traceback
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import structlog

from runner import metrics
from runner.context import JobContext, encode_result
from runner.errors import (
    JobCancelled,
    JobFailed,
    LeaseLost,
    PayloadError,
    PoolExhausted,
    RetryLater,
    RunnerError,
    Snooze,
)
from runner.logs import get_logger, redact
from runner.policy import Backoff
from runner.queue import ClaimedJob, JobOutcome, Outcome

if TYPE_CHECKING:
    from runner.app import App
    from runner.loops.completer import Completer
    from runner.plugins import JobKind

log = get_logger("runner.executor")

StopReason = Literal["cancelled", "lease_lost", "shutdown", "timeout", "undecodable"]
_OUTCOME_OF_STOP: dict[StopReason, Outcome | None] = {
    "cancelled": "cancelled",
    "shutdown": "released",  # back to pending, no attempt used
    "lease_lost": None,  # someone else owns it now: write nothing
    "timeout": "error",  # the attempt failed; retried per the kind's policy
    "undecodable": "fatal",  # no attempt can decode it: failed at once
}
MAX_ERROR_CHARS = 4000
NOT_COMMITTED = "ctx.complete_in was called but its transaction did not commit"


@dataclass(frozen=True)
class KindMetrics:
    """Labelled metric children per kind, resolved once (labels() is a dict lookup behind a lock)."""

    claimed: Any
    duration: Any
    lease_lost: Any


@dataclass(slots=True)
class RunningJob:
    job: ClaimedJob
    context: JobContext
    task: asyncio.Task[None] | None = None
    stop_reason: StopReason | None = None
    started: bool = False
    renew_until: float | None = None  # monotonic; past it the heartbeat lets the lease go


@dataclass(slots=True)  # not frozen: one per job, and a frozen __init__ costs 5x as much
class AttemptResult:
    outcome: Outcome | None
    error: str | None = None
    delay_s: float | None = None  # None: the kind's backoff decides
    result: str | None = None  # the handler's return value, JSON text


SUCCEEDED = AttemptResult("succeeded")  # shared: most attempts end this way and nothing mutates it


def _stop_message(running: RunningJob) -> str | None:
    if running.stop_reason == "cancelled":
        return "cancelled by request"
    if running.stop_reason == "undecodable":
        return running.job.undecodable
    return None


def describe_error(error: BaseException, *, with_traceback: bool = False) -> str:
    """The error's one-line summary first; with ``with_traceback``, then the traceback, cut from the top
    (the innermost frames are kept) so the whole text stays within MAX_ERROR_CHARS."""
    summary = "".join(traceback.format_exception_only(type(error), error)).strip()
    if not with_traceback or error.__traceback__ is None:
        return redact(summary)[:MAX_ERROR_CHARS]
    trace = "".join(traceback.format_exception(type(error), error, error.__traceback__)).strip()
    room = MAX_ERROR_CHARS - min(len(summary), MAX_ERROR_CHARS // 2) - 3
    if len(trace) > room:
        trace = "..." + trace[-(room - 3):]
    return redact(f"{summary[:MAX_ERROR_CHARS // 2]}\n\n{trace}")[:MAX_ERROR_CHARS]


class Executor:
    def __init__(self, app: App, concurrency: int, completer: Completer, worker_id: str) -> None:
        self.app = app
        self.concurrency = concurrency
        self.completer = completer
        self.worker_id = worker_id
        self.active: dict[int, RunningJob] = {}
        self.on_slot_freed: Callable[[], None] = lambda: None
        self._idle = asyncio.Event()
        self._idle.set()
        self._kind_metrics: dict[str, KindMetrics] = {}
        settings = app.settings
        self.default_backoff = Backoff(settings.retry_backoff_base, settings.retry_backoff_max)
        # Job start and end are logged at debug only: checked once here, as a call per job costs more
        # than a no-op job even when the level filters it out.
        self.log_debug = settings.log_level == "debug"
        # Read when scraped rather than set twice per job; weakly, so a closed worker is not kept alive.
        executor = weakref.ref(self)
        metrics.JOBS_RUNNING.set_function(lambda: len(found.active) if (found := executor()) is not None else 0)

    def _metrics(self, kind: str) -> KindMetrics:
        found = self._kind_metrics.get(kind)
        if found is None:
            found = self._kind_metrics[kind] = KindMetrics(
                metrics.JOBS_CLAIMED.labels(kind), metrics.JOB_DURATION.labels(kind),
                metrics.JOBS_LEASE_LOST.labels(kind))
        return found

    def free_slots(self) -> int:
        return self.concurrency - len(self.active)

    def leases(self) -> list[tuple[int, int]]:
        now = time.monotonic()
        held = [(r.job.id, r.job.lease_epoch) for r in self.active.values()
                if r.renew_until is None or now < r.renew_until]
        return held + self.completer.pending_leases()

    def abandon_overdue(self) -> list[int]:
        """Jobs not renewed for a whole lease (their handler ignored its timeout) have surely lost it: stop
        tracking them as ours, so their slots and any later writes count as lost."""
        now = time.monotonic()
        lease_s = self.app.settings.lease_timeout
        overdue = [r for r in self.active.values() if r.stop_reason in (None, "timeout")
                   and r.renew_until is not None and now > r.renew_until + lease_s]
        for running in overdue:
            running.stop_reason = "lease_lost"
            running.context.request_cancel()
            if running.task is not None and running.started:
                running.task.cancel("lease_lost")
            log.warning("handler ignored its timeout; lease left to expire", job_id=running.job.id)
        return [r.job.id for r in overdue]

    def timeout_of(self, kind: JobKind | None) -> float | None:
        seconds = kind.timeout_s if kind is not None and kind.timeout_s is not None else self.app.settings.job_timeout
        return seconds or None

    def start_many(self, jobs: list[ClaimedJob]) -> None:
        """Start one claim's jobs; metrics are counted once per claim, not once per job."""
        if not jobs:
            return
        for job in jobs:
            self.start(job)
        for kind, count in Counter(job.kind for job in jobs).items():
            self._metrics(kind).claimed.inc(count)

    def start(self, job: ClaimedJob) -> None:
        running = RunningJob(job, JobContext(job=job, app=self.app, worker_id=self.worker_id))
        self.active[job.id] = running
        self._idle.clear()
        if job.cancel_requested:  # cancelled while nobody ran it: end it without running
            running.stop_reason = "cancelled"
        elif job.undecodable is not None:  # a poison payload fails alone, at once
            running.stop_reason = "undecodable"
        running.task = asyncio.create_task(self._execute(running), name=f"job-{job.id}")

    def stop_job(self, job_id: int, reason: StopReason, epoch: int | None = None) -> bool:
        running = self.active.get(job_id)
        if running is None or running.task is None or (epoch is not None and running.job.lease_epoch != epoch):
            return False
        if running.stop_reason is None:
            running.stop_reason = reason
            running.context.request_cancel()
            if running.started:  # a task cancelled before its first step would skip _execute entirely
                running.task.cancel(reason)
        return True

    def stop_all(self, reason: StopReason) -> None:
        for job_id in list(self.active):
            self.stop_job(job_id, reason)

    async def wait_idle(self, timeout_s: float | None) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def _execute(self, running: RunningJob) -> None:
        job = running.job
        running.started = True
        structlog.contextvars.bind_contextvars(
            job_id=job.id, kind=job.kind, attempt=job.attempts + 1, worker_id=self.worker_id)
        started = time.monotonic()
        try:
            if running.stop_reason is not None:  # stopped before it began
                result = AttemptResult(_OUTCOME_OF_STOP[running.stop_reason], _stop_message(running))
            else:
                if self.log_debug:
                    running.context.log.debug("job started", queue=job.queue, lease_epoch=job.lease_epoch)
                result = await self._attempt(running)
        finally:
            self.active.pop(job.id, None)
            if not self.active:
                self._idle.set()
            self.on_slot_freed()
        self._report(running, result, time.monotonic() - started)

    def _time_out(self, running: RunningJob) -> None:
        if running.stop_reason is None and running.task is not None:
            running.stop_reason = "timeout"
            running.context.request_cancel()
            running.task.cancel("timeout")

    async def _attempt(self, running: RunningJob) -> AttemptResult:
        job = running.job
        kind = self.app.registry.kinds.get(job.kind)
        if kind is None:  # claims ask only for kinds we have; a registry changed since is not the job's fault
            return AttemptResult("released", None, self.app.settings.pool_exhausted_retry_delay)
        timeout_s = self.timeout_of(kind)
        timer: asyncio.TimerHandle | None = None
        if timeout_s is not None:
            # A plain timer, not asyncio.timeout(): half the cost on a path every job takes.
            timer = asyncio.get_running_loop().call_later(timeout_s, self._time_out, running)
            # A handler still running one lease after its timeout is no longer renewed.
            running.renew_until = time.monotonic() + timeout_s + self.app.settings.lease_timeout
        try:
            value = await kind.handler(running.context)
            if value is None or running.context.completed_in_transaction:
                return SUCCEEDED
            try:
                return AttemptResult("succeeded", result=encode_result(value))
            except PayloadError as bad_result:
                return AttemptResult("fatal", describe_error(bad_result))
        except asyncio.CancelledError:
            if running.stop_reason is None:
                raise  # the worker itself is being torn down: the shutdown hand-back releases the lease
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            reason = running.stop_reason
            if reason == "timeout":
                return AttemptResult("error", f"timed out after {timeout_s:g}s (the {job.kind} kind's timeout)")
            return AttemptResult(_OUTCOME_OF_STOP[reason], "cancelled by request" if reason == "cancelled" else None)
        except PoolExhausted:
            # Not the job's fault: back to pending shortly, no attempt used.
            metrics.JOBS_RELEASED.labels(job.kind, "pool_exhausted").inc()
            running.context.log.warning("pool exhausted in handler; job released",
                                        delay_s=self.app.settings.pool_exhausted_retry_delay)
            return AttemptResult("released", None, self.app.settings.pool_exhausted_retry_delay)
        except Snooze as snooze:  # back to pending, no attempt used
            return AttemptResult("snoozed", None, snooze.delay_s)
        except RetryLater as retry:
            return AttemptResult("error", describe_error(retry), retry.delay_s)
        except JobCancelled as cancelled:
            return AttemptResult("cancelled", describe_error(cancelled))
        except LeaseLost:
            return AttemptResult(None)
        except (PayloadError, JobFailed) as refused:  # the job's input, or the handler's verdict: no retry
            return AttemptResult("fatal", describe_error(refused))
        except RunnerError as failure:
            return AttemptResult("error", describe_error(failure, with_traceback=True))
        except Exception as failure:
            return AttemptResult("error", describe_error(failure, with_traceback=True))
        finally:
            if timer is not None:
                timer.cancel()

    def _report(self, running: RunningJob, result: AttemptResult, elapsed: float) -> None:
        job = running.job
        kind_metrics = self._metrics(job.kind)
        kind_metrics.duration.observe(elapsed)
        settled = running.context.completed_in_transaction
        outcome, error = result.outcome, result.error
        if outcome is None and not settled:
            kind_metrics.lease_lost.inc()
            running.context.log.warning("lease lost; job dropped without writing", lease_epoch=job.lease_epoch)
            return
        if settled and outcome in (None, "succeeded"):
            # Refused when that transaction committed (the usual case); written when it rolled back.
            outcome, error = "error", NOT_COMMITTED
        assert outcome is not None
        if outcome in ("error", "fatal") and not settled:
            running.context.log.warning("job failed", outcome=outcome, error=error)
        elif self.log_debug:
            running.context.log.debug("job finished", outcome=outcome, seconds=round(elapsed, 6))
        self.completer.submit(JobOutcome(
            job.id, job.lease_epoch, job.kind, outcome, error, self._delay(job, outcome, result.delay_s),
            result=result.result, settled_in_transaction=settled))

    def _delay(self, job: ClaimedJob, outcome: Outcome, requested: float | None) -> float:
        if requested is not None:
            return requested
        if outcome != "error":
            return 0.0
        kind = self.app.registry.kinds.get(job.kind)
        backoff = kind.retry_backoff if kind is not None and kind.retry_backoff is not None else self.default_backoff
        return backoff.delay_s(job.attempts)
