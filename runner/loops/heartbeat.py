"""Heartbeat: one set-based statement per interval renews every lease this worker holds and its row.

It runs on the pool's control lane, so handlers holding every other connection never delay it, and it
never waits on a row lock (a locked row is skipped and still held). Only a job the database says is no
longer ours (rescued by someone else) is dropped; a heartbeat that failed or timed out drops nothing.
"""

from __future__ import annotations

import time

from runner import metrics
from runner.config import Settings
from runner.executor import Executor
from runner.logs import get_logger
from runner.queue import JobQueue, WorkerIdentity
from runner.service import Service

log = get_logger("runner.heartbeat")


class Heartbeat(Service):
    name = "heartbeat"

    def __init__(self, queue: JobQueue, executor: Executor, settings: Settings, identity: WorkerIdentity) -> None:
        super().__init__(interval_s=settings.heartbeat_interval, timeout_s=settings.heartbeat_interval * 2)
        self.queue = queue
        self.executor = executor
        self.settings = settings
        self.identity = identity
        self.last_beat = time.monotonic()

    def lag_s(self) -> float:
        return time.monotonic() - self.last_beat

    async def run_once(self) -> None:
        metrics.HEARTBEAT_LAG.set(self.lag_s())
        self.executor.abandon_overdue()
        leases = self.executor.leases()
        result = await self.queue.job_heartbeat(leases, self.identity, self.settings.lease_timeout)
        self.last_beat = time.monotonic()
        metrics.HEARTBEAT_LAG.set(0)
        for job_id, epoch in leases:
            if job_id in result.held:
                continue
            running = self.executor.active.get(job_id)
            if running is not None and running.context.completed_in_transaction:
                continue  # its own transaction completed it; it is finishing, not lost
            if self.executor.stop_job(job_id, "lease_lost", epoch):
                log.warning("lease lost to a rescue; dropping job", job_id=job_id, lease_epoch=epoch)
