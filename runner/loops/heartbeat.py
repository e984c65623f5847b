"""Heartbeat: one set-based statement per interval renews every lease this worker holds and its row.

A job whose lease did not renew was rescued by someone else: it is dropped here, its writes refused.
"""

from __future__ import annotations

import time

from config import Settings
from runner import metrics
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
        leases = self.executor.leases()
        renewed = await self.queue.job_heartbeat(leases, self.identity, self.settings.lease_timeout)
        self.last_beat = time.monotonic()
        metrics.HEARTBEAT_LAG.set(0)
        for job_id, epoch in leases:
            if job_id not in renewed and self.executor.stop_job(job_id, "lease_lost", epoch):
                log.warning("lease lost to a rescue; dropping job", job_id=job_id, lease_epoch=epoch)
