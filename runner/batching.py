"""Group commit, the one batcher shape: many tasks' requests leave together in one set-based call.

``submit(item)`` queues an item and waits for the flush that carries it. While ``max_inflight`` flushes
are under way, later items queue up and leave together in the next one (up to ``max_batch``, counted by
``weight``: an item is never split), so under load the number of statements or chain transactions grows
with time, not with the number of tasks; alone, an item leaves at once. Each item gets its own answer,
or its own exception when the flush returns one in its place (a fenced write whose lease was lost); a
flush that raises fails every item it carried.

Used by the consensus loops for fenced transitions, releases and ConsensusMain event batches (one per
signing key). The job queue's completions (``runner.loops.completer``) are the one batcher of another
shape: submitting does not wait (a handler's completion is fire-and-forget), a batch's outcomes stay
leased until written, and rows another transaction holds locked go to the next flush.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from runner.errors import RunnerError

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosed(RunnerError):
    """The batcher was closed (shutdown) before it wrote the item, or its flush was cancelled."""


class GroupCommit(Generic[T, R]):
    def __init__(self, flush: Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]], *,
                 max_batch: int = 500, max_inflight: int = 2, weight: Callable[[T], int] | None = None,
                 name: str = "group-commit") -> None:
        self._flush = flush
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self.weight = weight or (lambda _: 1)
        self.name = name
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._inflight: set[asyncio.Task[None]] = set()
        self._closed = False
        self.flushes = 0
        self.items = 0

    async def submit(self, item: T) -> R:
        if self._closed:
            raise BatcherClosed(f"{self.name} is closed")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._kick()
        return await future

    def queued(self) -> int:
        return len(self._queue)

    def _kick(self) -> None:
        while self._queue and len(self._inflight) < self.max_inflight and not self._closed:
            batch = self._take()
            if not batch:
                continue
            task = asyncio.create_task(self._run(batch), name=self.name)
            self._inflight.add(task)
            task.add_done_callback(self._done)

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        size = 0
        while self._queue:
            item, future = self._queue[0]
            weight = self.weight(item)
            if batch and size + weight > self.max_batch:
                break
            self._queue.popleft()
            if future.done():  # its task was cancelled while queued: nothing to write
                continue
            batch.append((item, future))
            size += weight
        return batch

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._kick()

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._flush([item for item, _ in batch])
        except BaseException as error:
            failure = error if isinstance(error, Exception) else BatcherClosed(f"{self.name} flush cancelled")
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)
            if not isinstance(error, Exception):
                raise
            return
        self.flushes += 1
        self.items += len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def close(self) -> None:
        self._closed = True
        while self._queue:
            _, future = self._queue.popleft()
            if not future.done():
                future.set_exception(BatcherClosed(f"{self.name} closed"))
        tasks = list(self._inflight)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
