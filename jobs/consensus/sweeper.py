"""The orphan sweep: the one safety net under "every write that leaves work enqueues its job".

A job can end without the work it was enqueued for: an operator cancelled it (a waiting one at once, a
running one as it snoozed), or the core failed it past RUNNER_MAX_RECOVERIES. Every SWEEP_INTERVAL_S each
worker with the consensus loops enqueues (coalesced) the job of every contract with work and no unfinished
job, and the finality job when decided transactions wait without one. Set-based, bounded by live work;
workers sweeping at once join each other's jobs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runner.logs import get_logger
from runner.service import Service

if TYPE_CHECKING:
    from runner.app import App

log = get_logger("runner.jobs.consensus")
SWEEP_INTERVAL_S = 15.0


class OrphanSweeper(Service):
    name = "consensus-sweeper"

    def __init__(self, app: App, interval_s: float = SWEEP_INTERVAL_S) -> None:
        super().__init__(interval_s=interval_s, timeout_s=30.0, jitter=0.3)
        self.app = app

    async def run_once(self) -> None:
        engine = self.app.resources.get("consensus")
        if engine is None:  # the loops are off in this worker
            return
        contracts, finality = await engine.store.enqueue_orphaned()
        if contracts:
            log.warning("consensus work without a job: enqueued again", contracts=len(contracts),
                        finality=finality, first=contracts[:5])
        elif finality:  # also decided transactions behind a predecessor not final yet: a run finds nothing
            log.info("decided consensus transactions without a finality job: enqueued one")
