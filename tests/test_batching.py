"""runner.batching.GroupCommit, the one batcher shape: batches by weight, per-item answers and
exceptions, a failed flush failing its items only, close."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from runner.batching import BatcherClosed, GroupCommit


async def test_items_queued_during_a_flush_leave_together_and_each_gets_its_answer() -> None:
    gate = asyncio.Event()
    batches: list[list[int]] = []

    async def flush(items: Sequence[int]) -> list[int | BaseException]:
        batches.append(list(items))
        await gate.wait()
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    batcher: GroupCommit[int, int] = GroupCommit(flush, max_inflight=1, max_batch=100)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0)  # the first flush is under way
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 7)]
    gate.set()
    assert await first == 0
    results = await asyncio.gather(*rest, return_exceptions=True)
    assert batches == [[0], [1, 2, 3, 4, 5, 6]]
    assert [r if isinstance(r, int) else str(r) for r in results] == ["odd 1", 20, "odd 3", 40, "odd 5", 60]


async def test_a_batch_is_bounded_by_weight_and_never_splits_an_item() -> None:
    batches: list[list[str]] = []
    gate = asyncio.Event()

    async def flush(items: Sequence[str]) -> list[str]:
        batches.append(list(items))
        await gate.wait()
        return list(items)

    batcher: GroupCommit[str, str] = GroupCommit(flush, max_inflight=1, max_batch=5, weight=len)
    blocker = asyncio.ensure_future(batcher.submit("x"))
    await asyncio.sleep(0)
    items = ["aaa", "bb", "cccccccc", "d", "ee"]
    waiting = [asyncio.ensure_future(batcher.submit(i)) for i in items]
    gate.set()
    await asyncio.gather(blocker, *waiting)
    assert batches == [["x"], ["aaa", "bb"], ["cccccccc"], ["d", "ee"]]  # the heavy one alone, whole


async def test_a_failed_flush_fails_its_items_and_the_next_flush_goes_on() -> None:
    calls = 0

    async def flush(items: Sequence[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database down")
        return list(items)

    batcher: GroupCommit[int, int] = GroupCommit(flush)
    with pytest.raises(ConnectionError):
        await batcher.submit(1)
    assert await batcher.submit(2) == 2


async def test_close_fails_what_is_queued_and_refuses_more() -> None:
    async def flush(items: Sequence[int]) -> list[int]:
        await asyncio.sleep(3600)
        return list(items)

    batcher: GroupCommit[int, int] = GroupCommit(flush, max_inflight=1)
    in_flight = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0)
    queued = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0)
    await batcher.close()
    for future in (in_flight, queued):
        with pytest.raises(BatcherClosed):
            await future
    with pytest.raises(BatcherClosed):
        await batcher.submit(3)
