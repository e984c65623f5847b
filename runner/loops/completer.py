"""Status updates: completions and failures written in batches, one statement per flush, on the pool's
control lane. Outcomes stay leased (the heartbeat renews them) until written, the batch in flight too."""

from __future__ import annotations

import asyncio
from collections import Counter, deque

from runner import metrics
from runner.config import Settings
from runner.logs import get_logger
from runner.queue import JobOutcome, JobQueue, WrittenOutcome
from runner.service import Service

log = get_logger("runner.completer")
MAX_BATCH = 1000
STOP_FLUSH_ATTEMPTS = 20


def _finish_label(row: WrittenOutcome) -> str:
    """succeeded | failed | cancelled, or retried / released / snoozed for jobs that went back to pending."""
    if row.status != "pending":
        return row.status
    return row.outcome if row.outcome in ("released", "snoozed") else "retried"


class Completer(Service):
    name = "completer"

    def __init__(self, queue: JobQueue, settings: Settings) -> None:
        super().__init__(interval_s=0.5, timeout_s=60.0, jitter=0.0)
        self.queue = queue
        self.settings = settings
        self._buffer: deque[JobOutcome] = deque()
        self._in_flight: list[JobOutcome] = []
        self.flushed = asyncio.Event()
        self.empty = asyncio.Event()  # set whenever every submitted outcome has been written
        self.empty.set()

    def submit(self, outcome: JobOutcome) -> None:
        self._buffer.append(outcome)
        self.empty.clear()
        self.wake.set()

    def pending_leases(self) -> list[tuple[int, int]]:
        # Outcomes not yet written still hold their lease: the heartbeat keeps renewing them.
        return [(o.job_id, o.lease_epoch) for o in (*self._buffer, *self._in_flight)]

    def pending(self) -> int:
        return len(self._buffer) + len(self._in_flight)

    async def run_once(self) -> None:
        if self.settings.completion_flush_interval and self._buffer:
            await asyncio.sleep(self.settings.completion_flush_interval)  # let a batch gather
        busy: list[JobOutcome] = []
        while self._buffer:
            busy += await self._flush_batch()
        if busy:  # rows someone holds locked: try them on the next run, not in a hot loop
            self._buffer.extend(busy)
            return
        self.empty.set()

    async def _flush_batch(self) -> list[JobOutcome]:
        batch = self._in_flight = [self._buffer.popleft() for _ in range(min(MAX_BATCH, len(self._buffer)))]
        try:
            result = await self.queue.job_complete_many(batch)
        except BaseException:
            self._buffer.extendleft(reversed(batch))  # keep them; the next run retries the write
            raise
        finally:
            self._in_flight = []
        written = result.written
        for (kind, outcome), count in Counter((row.kind, _finish_label(row)) for row in written).items():
            metrics.JOBS_FINISHED.labels(kind, outcome).inc(count)
        busy = [o for o in batch if o.job_id in result.busy]
        if len(written) + len(busy) < len(batch):
            kept = {row.job_id for row in written} | result.busy
            for refused in batch:
                if refused.job_id not in kept:
                    self._refused(refused)
        return busy

    def _refused(self, outcome: JobOutcome) -> None:
        if outcome.settled_in_transaction:  # the handler's own transaction already completed it
            metrics.JOBS_FINISHED.labels(outcome.kind, "succeeded").inc()
            return
        metrics.JOBS_LEASE_LOST.labels(outcome.kind).inc()
        log.warning("completion refused: lease no longer held", job_id=outcome.job_id,
                    lease_epoch=outcome.lease_epoch, outcome=outcome.outcome)

    async def on_stop(self) -> None:
        for attempt in range(STOP_FLUSH_ATTEMPTS):
            if not self._buffer:
                break
            try:
                await asyncio.shield(self.run_once())
            except Exception as error:
                log.warning("final completion flush failed", attempt=attempt + 1, error=repr(error))
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        if self._buffer:
            log.error("completions left unwritten; their leases will expire and be rescued",
                      count=len(self._buffer))
        self.flushed.set()
