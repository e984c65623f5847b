"""Stale-job recovery: expired leases go back to pending, or to failed past the recovery cap.

Runs in every worker, all the time (not only at start-up); SKIP LOCKED makes concurrent runs safe.
"""

from __future__ import annotations

from collections.abc import Callable

from runner import metrics
from runner.config import Settings
from runner.logs import get_logger
from runner.queue import JobQueue
from runner.service import Service

log = get_logger("runner.rescuer")
DEAD_WORKER_AFTER_LEASES = 10


class Rescuer(Service):
    name = "rescuer"

    def __init__(self, queue: JobQueue, settings: Settings, on_rescued: Callable[[], None]) -> None:
        super().__init__(interval_s=settings.rescue_interval, timeout_s=30.0, jitter=0.3)
        self.queue = queue
        self.settings = settings
        self.on_rescued = on_rescued
        self.runs = 0

    async def run_once(self) -> None:
        rescued = await self.queue.job_rescue_stale(self.settings.max_recoveries)
        for job in rescued:
            metrics.JOBS_RECOVERED.labels(job.kind, job.status).inc()
            log.warning("stale job recovered", job_id=job.job_id, kind=job.kind, to=job.status)
        if any(job.status == "pending" for job in rescued):
            self.on_rescued()
        self.runs += 1
        if self.runs % 12 == 1:
            await self.queue.worker_delete_dead(self.settings.lease_timeout * DEAD_WORKER_AFTER_LEASES)
