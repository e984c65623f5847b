"""Group commit for ConsensusMain events: many transitions' events ride in one chain transaction.

``emit(events)`` queues the events of one transition and waits until the chain transaction carrying
them is mined, returning its hash, or None when ConsensusMain skipped them: they were emitted before (by
a stale worker's late batch, a resend after a receipt timeout), and the contract emits each once. While
a batch is in flight, later requests queue up and leave together in the next one (up to MAX_BATCH_EVENTS;
one request's events are never split), so the number of chain transactions grows with time, not with the
number of transitions. Within a batch, events keep the order they were queued in.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from runner.chain import ChainError
from runner.jobs.consensus import metrics
from runner.jobs.consensus.contract import EVENT_NAMES, ConsensusMain, Event, batch_gas, carried, encode_batch
from runner.logs import get_logger

log = get_logger("runner.jobs.consensus.emitter")

MAX_BATCH_EVENTS = 400


class EmitterClosed(ChainError):
    pass


class ContractMissing(ChainError):
    """The batch was mined without its events: no ConsensusMain behind the address any more (the node
    was reset to a fresh chain). The engine deploys again."""


class EventEmitter:
    def __init__(self, contract: ConsensusMain, *, receipt_timeout_s: float, max_inflight: int = 2) -> None:
        self.contract = contract
        self.receipt_timeout_s = receipt_timeout_s
        self.max_inflight = max_inflight
        self._queue: deque[tuple[list[Event], asyncio.Future[str | None]]] = deque()
        self._inflight: set[asyncio.Task[None]] = set()
        self._closed = False
        self.batches = 0
        self.events = 0

    async def emit(self, events: list[Event]) -> str | None:
        if self._closed:
            raise EmitterClosed("the event emitter is closed")
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._queue.append((events, future))
        self._kick()
        return await future

    def _kick(self) -> None:
        while self._queue and len(self._inflight) < self.max_inflight and not self._closed:
            batch = self._take()
            if not batch:
                continue
            task = asyncio.create_task(self._send(batch), name="consensus-emit")
            self._inflight.add(task)
            task.add_done_callback(self._done)

    def _take(self) -> list[tuple[list[Event], asyncio.Future[str | None]]]:
        batch: list[tuple[list[Event], asyncio.Future[str | None]]] = []
        count = 0
        while self._queue:
            events, future = self._queue[0]
            if batch and count + len(events) > MAX_BATCH_EVENTS:
                break
            self._queue.popleft()
            if future.done():  # its task was cancelled before we got to it: nothing to send
                continue
            batch.append((events, future))
            count += len(events)
        return batch

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._kick()

    async def _send(self, batch: list[tuple[list[Event], asyncio.Future[str | None]]]) -> None:
        events = [e for entry, _ in batch for e in entry]
        started = time.monotonic()
        try:
            chain = self.contract.chain
            tx_hash = await chain.send_transaction(to=self.contract.address, data=encode_batch(events),
                                                   gas=batch_gas(len(events)))
            sent = time.monotonic()
            receipt = await chain.wait_receipt(tx_hash, self.receipt_timeout_s)
            if receipt.logs != len(events) and not await chain.code_at(self.contract.address):
                raise ContractMissing(f"ConsensusMain at {self.contract.address} emitted {receipt.logs} of "
                                      f"{len(events)} events in {tx_hash}: no code behind the address")
        except BaseException as error:
            failure = error if isinstance(error, Exception) else EmitterClosed("event emission was cancelled")
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)
            if not isinstance(error, Exception):
                raise
            log.warning("event batch failed", events=len(events), error=repr(error))
            return
        skipped = [entry for entry, _ in batch if receipt.logs != len(events)
                   and not carried(entry, receipt.log_keys, self.contract.address)]
        skipped_ids = {id(entry) for entry in skipped}
        if skipped:
            log.info("ConsensusMain skipped events it had emitted before", events=sum(map(len, skipped)),
                     chain_tx=tx_hash)
        self.batches += 1
        self.events += len(events) - sum(map(len, skipped))
        log.debug("event batch mined", events=len(events), requests=len(batch), send_s=round(sent - started, 4),
                  receipt_s=round(time.monotonic() - sent, 4), queued=len(self._queue))
        metrics.CONSENSUS_EVENT_BATCH.observe(len(events))
        for entry, future in batch:
            repeated = id(entry) in skipped_ids
            for event in entry:
                counter = metrics.CONSENSUS_EVENTS_SKIPPED if repeated else metrics.CONSENSUS_EVENTS
                counter.labels(EVENT_NAMES[event.kind]).inc()
            if not future.done():
                future.set_result(None if repeated else tx_hash)

    async def close(self) -> None:
        self._closed = True
        while self._queue:
            _, future = self._queue.popleft()
            if not future.done():
                future.set_exception(EmitterClosed("the event emitter closed"))
        tasks = list(self._inflight)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
