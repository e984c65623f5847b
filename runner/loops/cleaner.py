"""Retention: deletes finished jobs older than RUNNER_RETENTION, in bounded batches, so the table (and
the cost of counting it) stays proportional to recent work. RUNNER_RETENTION=0 keeps everything."""

from __future__ import annotations

from runner.config import Settings
from runner.logs import get_logger
from runner.queue import JobQueue
from runner.service import Service

log = get_logger("runner.cleaner")
BATCH = 10_000
MAX_BATCHES_PER_RUN = 10


class Cleaner(Service):
    name = "cleaner"

    def __init__(self, queue: JobQueue, settings: Settings) -> None:
        super().__init__(interval_s=settings.cleanup_interval, timeout_s=120.0, jitter=0.3)
        self.queue = queue
        self.retention_s = settings.retention
        self.deleted = 0

    async def run_once(self) -> None:
        if self.retention_s <= 0:
            return
        for _ in range(MAX_BATCHES_PER_RUN):
            deleted = await self.queue.job_delete_finished(self.retention_s, BATCH)
            self.deleted += deleted
            if deleted:
                log.info("finished jobs deleted", count=deleted, retention_s=self.retention_s)
            if deleted < BATCH:
                return
