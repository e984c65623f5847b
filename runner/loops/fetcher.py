"""Pending-job fetch: claims runnable jobs of the kinds this worker has, in batches, up to free concurrency.

Woken by NOTIFY on enqueue, by a freed slot while a backlog remains, or by the poll interval. A claim
whose result never reached us (a timeout, a dropped connection) may still have committed: after any
failed claim, the jobs this worker owns but does not run are handed back at once, no attempt used.

Kinds with a per-worker cap (``JobKind.max_running``) are left out of the claim while at their cap; the
jobs of a kind one claim took past its cap are handed back the same way, for other workers to claim.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from runner import metrics
from runner.config import Settings
from runner.executor import Executor
from runner.logs import get_logger
from runner.queue import ClaimedJob, JobQueue
from runner.service import Service

log = get_logger("runner.fetcher")


class Fetcher(Service):
    name = "fetcher"

    def __init__(
        self, queue: JobQueue, executor: Executor, settings: Settings, queues: Sequence[str], kinds: Sequence[str],
        caps: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(interval_s=settings.poll_interval, timeout_s=30.0)
        self.queue = queue
        self.executor = executor
        self.settings = settings
        self.queues = list(queues)
        self.kinds = sorted(kinds)
        self.caps = dict(caps or {})  # kind -> the most jobs of it this worker runs at once
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
        room = self._room() if self.caps else {}
        kinds = [kind for kind in self.kinds if room.get(kind, 1) > 0] if room else self.kinds
        seen = 0
        try:
            if room:  # never more of a capped kind than its room (see CLAIM_CAPPED)
                jobs, seen = await self.queue.job_claim_capped(
                    self.queues, limit, self.settings.worker_id, self.settings.lease_timeout, kinds, room)
            else:
                jobs = await self.queue.job_claim(
                    self.queues, limit, self.settings.worker_id, self.settings.lease_timeout, kinds)
        except BaseException:
            await asyncio.shield(self.hand_back_unrun())
            raise
        over = self._past_caps(jobs, room) if room else set()
        if over:
            jobs = [job for job in jobs if job.id not in over]
        self.executor.start_many(jobs)
        if over:  # no task for them: the hand-back releases exactly these, no attempt used
            await asyncio.shield(self.hand_back_unrun("over_cap"))
        if self.stopped.is_set():  # shutting down between claim and start: give these straight back
            for job in jobs:  # only these: the jobs already running get their shutdown grace
                self.executor.stop_job(job.id, "shutdown")
            return
        self.last_claimed = len(jobs)
        # more may be waiting: the claim was full, or caps held back some of what it walked over, or a
        # capped kind took all its room (its next job is claimed when a slot of it frees)
        self.backlog = len(jobs) == limit or seen == limit or self._filled_a_cap(jobs, room)
        if not self.backlog:
            self.on_short_claim()
        if self.backlog and self.executor.free_slots() > 0:
            self.wake.set()

    def _room(self) -> dict[str, int]:
        """Per capped kind: how many more of its jobs this worker may start now."""
        running = Counter(r.job.kind for r in self.executor.active.values() if r.job.kind in self.caps)
        return {kind: cap - running[kind] for kind, cap in self.caps.items()}

    @staticmethod
    def _filled_a_cap(jobs: list[ClaimedJob], room: dict[str, int]) -> bool:
        if not room:
            return False
        taken = Counter(job.kind for job in jobs if job.kind in room)
        return any(0 < room[kind] <= taken[kind] for kind in room)

    @staticmethod
    def _past_caps(jobs: list[ClaimedJob], room: dict[str, int]) -> set[int]:
        """The ids of the claimed jobs that would take their kind past its cap."""
        left = dict(room)
        over = set()
        for job in jobs:
            if job.kind in left:
                left[job.kind] -= 1
                if left[job.kind] < 0:
                    over.add(job.id)
        return over

    async def hand_back_unrun(self, reason: str = "unrun_claim") -> None:
        """Release every running job this worker owns but has no task or pending outcome for: the claims
        whose result never reached us (``unrun_claim``), or those a claim took past a kind's cap
        (``over_cap``: expected, so not a warning, and the other workers are woken for them)."""
        # every job with a task here (renewed or not) and every outcome still waiting to be written
        keep = [*self.executor.active, *(job_id for job_id, _ in self.executor.completer.pending_leases())]
        try:
            released = await self.queue.job_release_owned_except(self.settings.worker_id, keep)
            if released and reason == "over_cap":
                await self.queue.job_notify(self.queues)
        except Exception as error:  # the rescuer gets them after a lease; nothing is lost
            log.warning("could not hand back claims", reason=reason, error=repr(error))
            return
        for job in released:
            metrics.JOBS_RELEASED.labels(job.kind, reason).inc()
        if released and reason == "unrun_claim":
            log.warning("unrun claims handed back", count=len(released), job_ids=[j.job_id for j in released][:20])
