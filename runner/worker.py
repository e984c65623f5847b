"""The worker: the loops under one TaskGroup, and the two-stage shutdown.

SIGTERM/SIGINT: stop claiming; let running jobs finish for up to RUNNER_SHUTDOWN_GRACE seconds; cancel
the rest (their leases go back to pending without using an attempt); write the last completions
shielded; then stop the heartbeat and the other loops. Last, every job still leased to this worker (a
claim in flight when the signal came, a handler that would not stop) is handed back, no attempt used.
A second signal skips the grace.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from runner.app import App
from runner.errors import UsageError
from runner.executor import Executor
from runner.logs import get_logger
from runner.loops.canceller import CancelWatcher
from runner.loops.cleaner import Cleaner
from runner.loops.completer import Completer
from runner.loops.depth import DepthSampler
from runner.loops.drain import DrainWatcher
from runner.loops.fetcher import Fetcher
from runner.loops.heartbeat import Heartbeat
from runner.loops.listener import Listener
from runner.loops.rescuer import Rescuer
from runner.loops.scheduler import Scheduler
from runner.loops.vacuum import Vacuumer
from runner.queue import WorkerIdentity
from runner.schedules import ScheduleStore
from runner.service import Service

if TYPE_CHECKING:  # runner.http pulls in aiohttp (0.15 s): imported when the server starts
    from runner.http import HttpServer, Liveness, WorkerState

log = get_logger("runner.worker")
CANCEL_WAIT_S = 10.0
HAND_BACK_TIMEOUT_S = 5.0


class Worker:
    def __init__(
        self,
        app: App,
        *,
        concurrency: int | None = None,
        queues: Sequence[str] | None = None,
        drain: bool = False,
        install_signal_handlers: bool = True,
        serve_http: bool | None = None,  # None: RUNNER_HTTP_ENABLED; False when the caller serves it (demo)
    ) -> None:
        settings = app.settings
        self.app = app
        kinds = [kind for kind in app.registry.kinds.values() if kind.claimable(app)]
        self.queues = list(queues or settings.queues)
        # a plugin's own kinds (runs_here) come from their queue wherever they can run
        self.queues += sorted({k.queue for k in kinds if k.runs_here and k.queue and k.queue not in self.queues})
        self.concurrency = concurrency or settings.concurrency
        self.identity = WorkerIdentity(settings.worker_id, tuple(self.queues), self.concurrency)
        self.install_signal_handlers = install_signal_handlers
        self.serve_http = settings.http_enabled if serve_http is None else serve_http
        self.stop_requested = asyncio.Event()
        self._signals = 0
        self.state: WorkerState = "starting"
        self.http: HttpServer | None = None  # /healthz /readyz /metrics /pool when RUNNER_HTTP_ENABLED
        self._tasks: dict[int, asyncio.Task[None]] = {}  # id(service) -> its task, for liveness

        self.completer = Completer(app.queue, settings)
        self.executor = Executor(app, self.concurrency, self.completer, settings.worker_id)
        caps = {kind.name: cap for kind in kinds if (cap := kind.running_cap(app)) is not None}
        self.fetcher = Fetcher(app.queue, self.executor, settings, self.queues, [k.name for k in kinds], caps)
        self.heartbeat = Heartbeat(app.queue, self.executor, settings, self.identity)
        self.rescuer = Rescuer(app.queue, settings, on_rescued=self.fetcher.wake.set)
        self.canceller = CancelWatcher(app.queue, self.executor, settings)
        listen_dsn = settings.listen_database_url.get_secret_value() if settings.listen_database_url else None
        # Periodic jobs: not in a drain (it would never end on a schedule), nor where turned off.
        self.scheduler: Scheduler | None = Scheduler(
            ScheduleStore(app.db, app.queue.max_attempts_for), settings, []
        ) if settings.schedules_enabled and not drain else None
        self.listener = Listener(app.db, self.queues, self.fetcher.wake.set, self.canceller.notified, listen_dsn,
                                 on_schedules=self.scheduler.wake.set if self.scheduler else lambda: None)
        self.depth = DepthSampler(app.queue, settings.depth_sample_interval)
        self.cleaner = Cleaner(app.queue, settings)
        self.vacuumer = Vacuumer(app.queue, settings)
        self.plugin_services: list[Service] = [
            service for plugin in app.plugins if plugin.services for service in plugin.services(app)
        ]
        self.drain: DrainWatcher | None = (
            DrainWatcher(app, self.executor, self.completer, self.fetcher, self.queues, self.request_stop)
            if drain else None
        )
        if self.drain is not None:
            # A short claim may mean the queue is empty: check at once rather than on the next tick.
            self.fetcher.on_short_claim = self.drain.wake.set

    @property
    def services(self) -> list[Service]:
        core: list[Service] = [self.listener, self.fetcher, self.completer, self.heartbeat, self.rescuer,
                               self.canceller, self.depth, self.cleaner, self.vacuumer]
        if self.scheduler is not None:
            core.append(self.scheduler)
        return core + self.plugin_services + ([self.drain] if self.drain else [])

    def request_stop(self) -> None:
        if self.state in ("starting", "running"):
            self.state = "stopping"
        self.stop_requested.set()

    def liveness(self) -> Liveness:
        from runner.http import Liveness, LoopStatus

        """Each loop is alive while its task runs (a cancelled or ended loop is dead); served on /healthz."""
        now = time.monotonic()
        loops = []
        for service in self.services:
            task = self._tasks.get(id(service))
            loops.append(LoopStatus(
                name=service.name,
                alive=task is not None and not task.done(),
                last_success_age_s=round(now - service.last_success, 3) if service.last_success else None,
                failures_in_a_row=service.failures_in_a_row,
            ))
        return Liveness(self.state, loops, self.heartbeat.lag_s())

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        log.info("signal received; shutting down", signal=signal.Signals(signum).name, count=self._signals)
        if self._signals > 1:
            self.executor.stop_all("shutdown")
        self.request_stop()

    async def run(self) -> None:
        # Leases are owned by worker id: a second live process with ours would take its jobs at shutdown.
        other = await self.app.queue.worker_id_in_use(self.identity, self.app.settings.lease_timeout)
        if other is not None:
            raise UsageError(f"RUNNER_WORKER_ID {self.identity.id!r} is in use by {other}; worker ids must be unique")
        if self.scheduler is not None:  # the code's schedules, checked as enqueues are: a bad one stops the start
            self.scheduler.declared = [await self.app.checked_schedule(spec) for spec in self.app.schedules.values()]
        if self.serve_http:
            from runner.http import HttpServer

            self.http = await HttpServer(self.app, self).start()
        try:
            await self._run()
        finally:
            self.state = "stopped"
            if self.http is not None:
                await self.http.stop()

    async def _run(self) -> None:
        # Everything imported and opened so far lives as long as the process: keep the cyclic collector
        # from rescanning it on every collection while jobs churn short-lived objects (and at exit).
        gc.freeze()
        budget = self.app.settings.pool_budget()
        log.info("worker starting", worker_id=self.identity.id, queues=self.queues, concurrency=self.concurrency,
                 lease_s=self.app.settings.lease_timeout, pool_min=budget.min_size, pool_max=budget.max_size,
                 pool_derived=budget.derived, pool_formula=budget.formula(),
                 db_max_connections=budget.db_max_connections, worker_replicas=budget.worker_replicas)
        await self.heartbeat.run_once()  # registers the worker row; fails fast on a broken database
        loop = asyncio.get_running_loop()
        if self.install_signal_handlers:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            async with asyncio.TaskGroup() as group:
                for service in self.services:
                    self._tasks[id(service)] = group.create_task(service.run(), name=service.name)
                group.create_task(self._supervise(), name="supervisor")
                if self.state == "starting":
                    self.state = "running"
        finally:
            self.executor.stop_all("shutdown")
            if self.install_signal_handlers:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(signum)
            await self._hand_back_all()
            try:
                await asyncio.wait_for(self.app.queue.worker_unregister(self.identity.id), 5)
            except Exception as error:
                log.warning("could not remove worker row", error=repr(error))
        log.info("worker stopped", worker_id=self.identity.id)

    async def _hand_back_all(self) -> None:
        try:
            released = await asyncio.wait_for(
                self.app.queue.job_release_owned_except(self.identity.id, []), HAND_BACK_TIMEOUT_S)
        except Exception as error:  # the rescuer takes them after one lease
            log.warning("could not hand back leases at shutdown", error=repr(error))
            return
        if released:
            log.info("leases handed back at shutdown", count=len(released))

    async def _supervise(self) -> None:
        await self.stop_requested.wait()
        grace = self.app.settings.shutdown_grace
        log.info("stopping: no new claims", running=len(self.executor.active), grace_s=grace)
        self.fetcher.stop()
        for service in self.plugin_services:
            service.stop()
        if not await self.executor.wait_idle(grace):
            log.warning("grace over; cancelling running jobs", running=len(self.executor.active))
            self.executor.stop_all("shutdown")
            await self.executor.wait_idle(CANCEL_WAIT_S)
        self.completer.stop()
        await self.completer.flushed.wait()
        for service in self.services:
            service.stop()
