"""``--drain``: ask the worker to stop once nothing is runnable or running (and plugins are idle)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from runner.executor import Executor
from runner.loops.completer import Completer
from runner.loops.fetcher import Fetcher
from runner.service import Service

if TYPE_CHECKING:
    from runner.app import App


class DrainWatcher(Service):
    name = "drain"

    def __init__(
        self, app: App, executor: Executor, completer: Completer, fetcher: Fetcher,
        queues: Sequence[str], request_stop: Callable[[], None],
    ) -> None:
        super().__init__(interval_s=min(0.5, app.settings.poll_interval), timeout_s=30.0)
        self.app = app
        self.executor = executor
        self.completer = completer
        self.fetcher = fetcher
        self.queues = list(queues)
        self.request_stop = request_stop

    async def run_once(self) -> None:
        if self.fetcher.backlog:
            return
        # Wait (briefly) for the last jobs and their completions rather than a whole interval.
        if not await self.executor.wait_idle(self.interval_s):
            return
        try:
            async with asyncio.timeout(self.interval_s):
                await self.completer.empty.wait()
        except TimeoutError:
            return
        if self.executor.active or self.completer.pending():
            return
        if await self.app.queue.job_has_runnable_or_running(self.queues, self.fetcher.kinds):
            return
        for plugin in self.app.plugins:
            if plugin.has_pending_work is not None and await plugin.has_pending_work(self.app):
                return
        self.request_stop()
