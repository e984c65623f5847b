"""The one shape every background loop has: a named task that runs ``run_once`` on an interval or when
woken, under a timeout; its errors are logged, counted and retried, so one failed heartbeat never kills
the worker. ``stop()`` is idempotent."""

from __future__ import annotations

import asyncio
import random
import time

from runner import metrics
from runner.logs import get_logger

log = get_logger("runner.service")


class Service:
    name = "service"

    def __init__(self, interval_s: float, timeout_s: float = 30.0, jitter: float = 0.1) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.jitter = jitter
        self.wake = asyncio.Event()
        self.stopped = asyncio.Event()
        self.alive = False
        self.last_success = 0.0
        self.failures_in_a_row = 0

    async def run_once(self) -> None:
        raise NotImplementedError

    async def on_stop(self) -> None:
        """Last work after the loop ends (flush, release)."""

    def stop(self) -> None:
        self.stopped.set()
        self.wake.set()

    async def run(self) -> None:
        self.alive = True
        try:
            while not self.stopped.is_set():
                await self._run_once_guarded()
                if not self.stopped.is_set():
                    await self._wait()
            await self.on_stop()
        finally:
            self.alive = False

    async def _run_once_guarded(self) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that arrives as the inner call
        # finishes, and a loop whose cancel was lost never stops.
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.run_once()
            self.last_success = time.monotonic()
            self.failures_in_a_row = 0
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.failures_in_a_row += 1
            metrics.LOOP_ERRORS.labels(self.name).inc()
            log.warning("loop iteration failed", loop=self.name, error=repr(error),
                        failures_in_a_row=self.failures_in_a_row)
            # Back off while the database is down instead of spinning, but never past one interval: a
            # heartbeat that backs off longer than its period would let live leases expire.
            await asyncio.sleep(min(5.0, self.interval_s, 0.1 * 2 ** min(self.failures_in_a_row, 6)))

    async def _wait(self) -> None:
        delay = self.interval_s * (1 + random.uniform(-self.jitter, self.jitter))
        try:
            async with asyncio.timeout(delay):
                await self.wake.wait()
        except TimeoutError:
            pass
        self.wake.clear()
