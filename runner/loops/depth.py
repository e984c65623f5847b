"""Samples queue depth by status into a gauge on an interval (never per scrape)."""

from __future__ import annotations

from runner import metrics
from runner.queue import FINISHED, JobQueue
from runner.service import Service

ALL_STATUSES = ("pending", "running", *FINISHED)


class DepthSampler(Service):
    name = "depth"

    def __init__(self, queue: JobQueue, interval_s: float) -> None:
        super().__init__(interval_s=interval_s, timeout_s=30.0)
        self.queue = queue
        self.latest: dict[str, int] = {}

    async def run_once(self) -> None:
        counts = await self.queue.job_counts_by_status()
        self.latest = {status: counts.get(status, 0) for status in ALL_STATUSES}
        for status, count in self.latest.items():
            metrics.QUEUE_DEPTH.labels(status).set(count)
