"""Pending-job fetch: claims runnable jobs in batches, up to free concurrency.

Woken by NOTIFY on enqueue, by a freed slot while a backlog remains, or by the poll interval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from config import Settings
from runner.executor import Executor
from runner.queue import JobQueue
from runner.service import Service


class Fetcher(Service):
    name = "fetcher"

    def __init__(self, queue: JobQueue, executor: Executor, settings: Settings, queues: Sequence[str]) -> None:
        super().__init__(interval_s=settings.poll_interval, timeout_s=30.0)
        self.queue = queue
        self.executor = executor
        self.settings = settings
        self.queues = list(queues)
        self.backlog = True  # until a claim comes back short, assume more is waiting
        self.last_claimed = -1
        executor.on_slot_freed = self._slot_freed
        self.on_short_claim: Callable[[], None] = lambda: None  # the drain watcher listens here

    def _slot_freed(self) -> None:
        if self.backlog and not self.stopped.is_set():
            self.wake.set()

    async def run_once(self) -> None:
        free = self.executor.free_slots()
        if free <= 0:
            self.backlog = True
            return
        limit = min(free, self.settings.claim_batch_size)
        jobs = await self.queue.job_claim(self.queues, limit, self.settings.worker_id, self.settings.lease_timeout)
        if self.stopped.is_set():  # shutting down between claim and start: give them straight back
            for job in jobs:
                self.executor.start(job)
            self.executor.stop_all("shutdown")
            return
        for job in jobs:
            self.executor.start(job)
        self.last_claimed = len(jobs)
        self.backlog = len(jobs) == limit
        if not self.backlog:
            self.on_short_claim()
        if self.backlog and self.executor.free_slots() > 0:
            self.wake.set()
