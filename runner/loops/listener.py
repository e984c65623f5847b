"""The single LISTEN connection: wakes the fetcher on enqueue and the canceller on cancel.

It checks itself every interval and reconnects with backoff after a database restart; on every
(re)connect it wakes both, since notifications sent while it was away are lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import asyncpg

from runner.db import Database
from runner.logs import get_logger
from runner.queue_sql import CANCEL_CHANNEL, JOBS_CHANNEL, SCHEDULES_CHANNEL
from runner.service import Service

log = get_logger("runner.listener")


class Listener(Service):
    name = "listener"

    def __init__(
        self,
        db: Database,
        queues: Sequence[str],
        on_jobs: Callable[[], None],
        on_cancel: Callable[[int], None],
        dsn: str | None = None,
        on_schedules: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(interval_s=2.0, timeout_s=10.0, jitter=0.0)
        self.db = db
        self.queues = set(queues)
        self.on_jobs = on_jobs
        self.on_cancel = on_cancel
        self.on_schedules = on_schedules
        self.dsn = dsn
        self.connection: asyncpg.Connection | None = None
        self.connects = 0
        self.connected_at = 0.0  # monotonic time of the last (re)connect

    @property
    def connected(self) -> bool:
        return self.connection is not None and not self.connection.is_closed()

    async def run_once(self) -> None:
        if self.connected:
            assert self.connection is not None
            await self.connection.execute("SELECT 1")  # a dead socket shows up here
            return
        await self._connect()

    async def _connect(self) -> None:
        await self._close()
        connection = await self.db.listen_connection(self.dsn)
        try:
            await connection.add_listener(JOBS_CHANNEL, self._jobs_notified)
            await connection.add_listener(CANCEL_CHANNEL, self._cancel_notified)
            await connection.add_listener(SCHEDULES_CHANNEL, self._schedules_notified)
        except BaseException:
            connection.terminate()
            raise
        connection.add_termination_listener(lambda _: self.wake.set())
        self.connection = connection
        self.connects += 1
        self.connected_at = time.monotonic()
        log.info("listening", channels=[JOBS_CHANNEL, CANCEL_CHANNEL, SCHEDULES_CHANNEL],
                 reconnect=self.connects > 1)
        self.on_jobs()  # catch up on anything enqueued while we were not listening
        self.on_schedules()

    def _jobs_notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        if payload in self.queues:
            self.on_jobs()

    def _schedules_notified(self, _conn: object, _pid: int, _channel: str, _payload: object) -> None:
        self.on_schedules()

    def _cancel_notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            job_id = int(str(payload))
        except ValueError:
            return
        self.on_cancel(job_id)

    async def _close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None and not connection.is_closed():
            try:
                await asyncio.wait_for(connection.close(), 2)
            except (TimeoutError, OSError, asyncpg.PostgresError):
                connection.terminate()

    async def on_stop(self) -> None:
        await self._close()
