"""Vacuums the jobs table between autovacuum's rounds, so that claims stay as fast as the live work.

Every claim turns a pending row into a running one and leaves the pending version's entry at the front of
the claim index (the oldest jobs first): each later claim steps over every such entry until a VACUUM
removes them. Autovacuum comes at most once per ``autovacuum_naptime`` (a server-wide setting, 1 min by
default, that the table's own settings cannot shorten), by when a busy queue has left hundreds of
thousands of them and claims take several times longer. This loop vacuums runner_jobs as soon as it has
RUNNER_VACUUM_DEAD_ROWS dead versions: one worker at a time (an advisory lock), never queued behind an
autovacuum already at work (SKIP_LOCKED), and only where runner's role owns the table.
"""

from __future__ import annotations

import time

from runner.config import Settings
from runner.logs import get_logger
from runner.queue import JobQueue
from runner.service import Service

log = get_logger("runner.vacuum")


class Vacuumer(Service):
    name = "vacuum"

    def __init__(self, queue: JobQueue, settings: Settings) -> None:
        super().__init__(interval_s=settings.vacuum_interval, timeout_s=600.0, jitter=0.3)
        self.queue = queue
        self.dead_rows = settings.vacuum_dead_rows
        self.allowed: bool | None = None  # learnt on the first run
        self.runs = 0

    async def run_once(self) -> None:
        if self.dead_rows <= 0:
            return
        if self.allowed is None:
            self.allowed = await self.queue.job_table_may_vacuum()
            if not self.allowed:
                log.info("runner's role does not own runner_jobs; its vacuuming is left to autovacuum")
        if not self.allowed:
            return
        dead = await self.queue.job_table_dead_rows()
        if dead < self.dead_rows:
            return
        started = time.monotonic()
        if await self.queue.job_table_vacuum():
            self.runs += 1
            log.debug("runner_jobs vacuumed", dead_rows=dead, seconds=round(time.monotonic() - started, 3))
