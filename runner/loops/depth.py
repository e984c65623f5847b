"""Samples queue depth by status into a gauge on an interval (never per scrape). Never scans history:
pending and running are exact (partial index on unfinished jobs); finished statuses are exact up to
FINISHED_EXACT_UP_TO rows and estimates from the planner's statistics past that."""

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
        self.estimated: list[str] = []

    async def run_once(self) -> None:
        counts, self.estimated = await self.queue.job_depth_by_status()
        self.latest = {status: counts.get(status, 0) for status in ALL_STATUSES}
        for status, count in self.latest.items():
            metrics.QUEUE_DEPTH.labels(status).set(count)
