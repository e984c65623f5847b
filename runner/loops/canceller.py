"""Cancellation check: NOTIFY delivers a cancel at once; a batched periodic check catches missed ones."""

from __future__ import annotations

from runner.config import Settings
from runner.executor import Executor
from runner.logs import get_logger
from runner.queue import JobQueue
from runner.service import Service

log = get_logger("runner.canceller")


class CancelWatcher(Service):
    name = "canceller"

    def __init__(self, queue: JobQueue, executor: Executor, settings: Settings) -> None:
        super().__init__(interval_s=settings.cancel_check_interval, timeout_s=10.0)
        self.queue = queue
        self.executor = executor

    def notified(self, job_id: int) -> None:
        # NOTIFY is sent after cancel_requested commits, so acting on it directly is safe.
        if self.executor.stop_job(job_id, "cancelled"):
            log.info("cancel requested; stopping job", job_id=job_id)

    async def run_once(self) -> None:
        active = list(self.executor.active)
        if not active:
            return
        for job_id in await self.queue.job_cancel_requested_among(active):
            self.notified(job_id)
