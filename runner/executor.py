"""Runs claimed jobs as tasks, up to the worker's concurrency, and hands their outcomes to the completer.

The executor never holds a database connection: handlers borrow one per database step.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import structlog

from runner import metrics
from runner.context import JobContext
from runner.errors import JobCancelled, LeaseLost, PayloadError, RunnerError
from runner.logs import get_logger, redact
from runner.queue import ClaimedJob, JobOutcome, Outcome

if TYPE_CHECKING:
    from runner.app import App
    from runner.loops.completer import Completer

log = get_logger("runner.executor")

StopReason = Literal["cancelled", "lease_lost", "shutdown"]
_OUTCOME_OF_STOP: dict[StopReason, Outcome | None] = {
    "cancelled": "cancelled",
    "shutdown": "released",  # back to pending, no attempt used
    "lease_lost": None,  # someone else owns it now: write nothing
}
MAX_ERROR_CHARS = 4000


@dataclass(frozen=True)
class KindMetrics:
    """Labelled metric children per kind, resolved once (labels() is a dict lookup behind a lock)."""

    claimed: Any
    duration: Any
    lease_lost: Any


@dataclass
class RunningJob:
    job: ClaimedJob
    context: JobContext
    task: asyncio.Task[None] | None = None
    stop_reason: StopReason | None = None


def describe_error(error: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    return redact(text)[:MAX_ERROR_CHARS]


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
        held = [(r.job.id, r.job.lease_epoch) for r in self.active.values()]
        return held + self.completer.pending_leases()

    def start(self, job: ClaimedJob) -> None:
        running = RunningJob(job, JobContext(job=job, app=self.app, worker_id=self.worker_id))
        self.active[job.id] = running
        self._idle.clear()
        self._metrics(job.kind).claimed.inc()
        metrics.JOBS_RUNNING.set(len(self.active))
        running.task = asyncio.create_task(self._execute(running), name=f"job-{job.id}")

    def stop_job(self, job_id: int, reason: StopReason, epoch: int | None = None) -> bool:
        running = self.active.get(job_id)
        if running is None or running.task is None or (epoch is not None and running.job.lease_epoch != epoch):
            return False
        if running.stop_reason is None:
            running.stop_reason = reason
            running.context.request_cancel()
            running.task.cancel(reason)
        return True

    def stop_all(self, reason: StopReason) -> None:
        for job_id in list(self.active):
            self.stop_job(job_id, reason)

    async def wait_idle(self, timeout_s: float | None) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _execute(self, running: RunningJob) -> None:
        job = running.job
        structlog.contextvars.bind_contextvars(
            job_id=job.id, kind=job.kind, attempt=job.attempts + 1, worker_id=self.worker_id)
        started = time.monotonic()
        outcome: Outcome | None
        error: str | None = None
        try:
            kind = self.app.registry.get(job.kind)
            await kind.handler(running.context)
            outcome = "succeeded"
        except asyncio.CancelledError:
            if running.stop_reason is None:
                raise  # the worker itself is being torn down: the lease will expire and be rescued
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            outcome = _OUTCOME_OF_STOP[running.stop_reason]
            error = "cancelled by request" if outcome == "cancelled" else None
        except JobCancelled as cancelled:
            outcome, error = "cancelled", describe_error(cancelled)
        except LeaseLost:
            outcome = None
        except (PayloadError, RunnerError) as failure:
            outcome, error = ("fatal" if isinstance(failure, PayloadError) else "error"), describe_error(failure)
        except Exception as failure:
            outcome, error = "error", describe_error(failure)
        finally:
            self.active.pop(job.id, None)
            metrics.JOBS_RUNNING.set(len(self.active))
            if not self.active:
                self._idle.set()
            self.on_slot_freed()
        self._report(running, outcome, error, time.monotonic() - started)

    def _report(self, running: RunningJob, outcome: Outcome | None, error: str | None, elapsed: float) -> None:
        job = running.job
        kind_metrics = self._metrics(job.kind)
        kind_metrics.duration.observe(elapsed)
        if outcome is None:
            kind_metrics.lease_lost.inc()
            running.context.log.warning("lease lost; job dropped without writing", lease_epoch=job.lease_epoch)
            return
        if outcome in ("error", "fatal"):
            running.context.log.warning("job failed", outcome=outcome, error=error)
        self.completer.submit(JobOutcome(job.id, job.lease_epoch, job.kind, outcome, error))
