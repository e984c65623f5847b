"""Group commit: many tasks' requests leave together in one set-based call.

``submit(item)`` queues an item and waits for the flush that carries it. While a flush is in flight,
later items queue up and leave together in the next one (up to ``max_batch``), so under load the
number of statements grows with time, not with the number of transactions; alone, an item leaves at
once. Each item still gets its own answer (for a fenced write: did this row match its epoch?).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    def __init__(self, flush: Callable[[Sequence[T]], Awaitable[Sequence[R]]], *, max_batch: int = 500,
                 max_inflight: int = 2, name: str = "group-commit") -> None:
        self._flush = flush
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self.name = name
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._inflight: set[asyncio.Task[None]] = set()
        self.flushes = 0
        self.items = 0

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._kick()
        return await future

    def _kick(self) -> None:
        while self._queue and len(self._inflight) < self.max_inflight:
            batch: list[tuple[T, asyncio.Future[R]]] = []
            while self._queue and len(batch) < self.max_batch:
                entry = self._queue.popleft()
                if not entry[1].done():  # its task was cancelled while queued: nothing to write
                    batch.append(entry)
            if not batch:
                continue
            task = asyncio.create_task(self._run(batch), name=self.name)
            self._inflight.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._kick()

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._flush([item for item, _ in batch])
        except BaseException as error:
            failure = error if isinstance(error, Exception) else RuntimeError(f"{self.name} flush cancelled")
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)
            if not isinstance(error, Exception):
                raise
            return
        self.flushes += 1
        self.items += len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def close(self) -> None:
        while self._queue:
            _, future = self._queue.popleft()
            if not future.done():
                future.set_exception(RuntimeError(f"{self.name} closed"))
        tasks = list(self._inflight)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
