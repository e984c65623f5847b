"""Pending-job fetch: claims runnable jobs of the kinds this worker has, in batches, up to free concurrency.

Woken by NOTIFY on enqueue, by a freed slot while a backlog remains, or by the poll interval. A claim
whose result never reached us (a timeout, a dropped connection) may still have committed: after any
failed claim, the jobs this worker owns but does not run are handed back at once, no attempt used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from runner import metrics
from runner.config import Settings
from runner.executor import Executor
from runner.logs import get_logger
from runner.queue import JobQueue
from runner.service import Service

log = get_logger("runner.fetcher")


class Fetcher(Service):
    name = "fetcher"

    def __init__(
        self, queue: JobQueue, executor: Executor, settings: Settings, queues: Sequence[str], kinds: Sequence[str]
    ) -> None:
        super().__init__(interval_s=settings.poll_interval, timeout_s=30.0)
        self.queue = queue
        self.executor = executor
        self.settings = settings
        self.queues = list(queues)
        self.kinds = sorted(kinds)
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
        try:
            jobs = await self.queue.job_claim(
                self.queues, limit, self.settings.worker_id, self.settings.lease_timeout, self.kinds)
        except BaseException:
            await asyncio.shield(self.hand_back_unrun())
            raise
        self.executor.start_many(jobs)
        if self.stopped.is_set():  # shutting down between claim and start: give these straight back
            for job in jobs:  # only these: the jobs already running get their shutdown grace
                self.executor.stop_job(job.id, "shutdown")
            return
        self.last_claimed = len(jobs)
        self.backlog = len(jobs) == limit
        if not self.backlog:
            self.on_short_claim()
        if self.backlog and self.executor.free_slots() > 0:
            self.wake.set()

    async def hand_back_unrun(self) -> None:
        """Release every running job this worker owns but has no task or pending outcome for."""
        # every job with a task here (renewed or not) and every outcome still waiting to be written
        keep = [*self.executor.active, *(job_id for job_id, _ in self.executor.completer.pending_leases())]
        try:
            released = await self.queue.job_release_owned_except(self.settings.worker_id, keep)
        except Exception as error:  # the rescuer gets them after a lease; nothing is lost
            log.warning("could not hand back unrun claims", error=repr(error))
            return
        for job in released:
            metrics.JOBS_RELEASED.labels(job.kind, "unrun_claim").inc()
        if released:
            log.warning("unrun claims handed back", count=len(released), job_ids=[j.job_id for j in released][:20])
