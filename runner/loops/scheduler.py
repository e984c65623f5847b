"""Periodic jobs: enqueues each due tick of every schedule once, then sleeps until the next tick.

Any number of workers and replicas run this loop. A due schedule is locked while one worker fires it (the
others skip it), its next tick moves forward in the same transaction as the jobs' insert, and the unique
(schedule_name, schedule_tick) index refuses a second job for a tick: one job per tick whoever fires it.
The loop sleeps until the nearest tick (at most SCHEDULE_MAX_SLEEP_S, in case a NOTIFY was lost) and is
woken early by a change to the schedules (NOTIFY runner_schedules).
"""

from __future__ import annotations

from collections.abc import Sequence

from runner.config import Settings
from runner.logs import get_logger
from runner.schedules import ScheduleSpec, ScheduleStore
from runner.service import Service

log = get_logger("runner.scheduler")
SCHEDULE_MAX_SLEEP_S = 30.0
SCHEDULE_MIN_SLEEP_S = 0.01


class Scheduler(Service):
    name = "scheduler"

    def __init__(self, store: ScheduleStore, settings: Settings, declared: Sequence[ScheduleSpec]) -> None:
        super().__init__(interval_s=SCHEDULE_MAX_SLEEP_S, timeout_s=60.0, jitter=0.0)
        self.store = store
        self.grace_s = settings.schedule_grace
        self.declared = list(declared)
        self.upserted = False
        self.enqueued = 0

    async def run_once(self) -> None:
        if not self.upserted:  # the code's schedules, once per start (a redeploy updates them)
            changed = await self.store.upsert_code(self.declared)
            if changed:
                log.info("schedules declared in code stored", names=changed)
            self.upserted = True
        for fired in await self.store.fire_due(self.grace_s):
            self.enqueued += len(fired.job_ids)
            if fired.missed:
                log.warning("schedule ticks missed while no worker ran; skipped by its policy",
                            schedule=fired.schedule, missed=fired.missed)
            if fired.job_ids:
                log.info("schedule fired", schedule=fired.schedule, jobs=len(fired.job_ids),
                         ticks=[t.isoformat() for t in fired.ticks[-3:]])
        seconds = await self.store.seconds_to_next()
        self.interval_s = SCHEDULE_MAX_SLEEP_S if seconds is None else min(
            SCHEDULE_MAX_SLEEP_S, max(SCHEDULE_MIN_SLEEP_S, seconds))
