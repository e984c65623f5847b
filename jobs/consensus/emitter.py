"""Group commit for ConsensusMain events: many transitions' events ride in one chain transaction.

``emit(events)`` queues the events of one transition and waits until the chain transaction carrying
them is mined, returning its hash, or None when ConsensusMain skipped them: they were emitted before (by
a stale worker's late batch, a resend after a receipt timeout), and the contract emits each once. While
a batch is in flight, later requests queue up and leave together in the next one (up to MAX_BATCH_EVENTS;
one request's events are never split), so the number of chain transactions grows with time, not with the
number of transitions. Within a batch, events keep the order they were queued in.

Fenced: a request may carry the leases ``(hash, epoch)`` it is sent under. Right before a batch leaves,
one query (``fence_check``) asks which of them this worker still holds; a request whose lease was taken
(a rollback bumped its epoch, another worker recovered it) is refused with LeaseLost and never reaches
the chain. What the check cannot stop is a lease lost in the seconds between that query and the block:
such an event is still its own round's only one (the contract emits each once), never a duplicate.

Lanes: a vote (VoteCommitted, VoteRevealed) of a validator whose key this process holds (``signers``) is
signed by that validator, in a batch of that validator's own votes (``emitVotes``); everything else goes
in the worker's batches (``emitBatch``). Each lane is one sender, so each key's nonces stay contiguous
(runner.chain's per-sender nonce lane); a request spanning lanes resolves when every part is mined.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from runner.chain import ChainError
from runner.errors import LeaseLost
from runner.jobs.consensus import metrics
from runner.jobs.consensus.contract import (
    EVENT_NAMES,
    VOTE_KINDS,
    ConsensusMain,
    Event,
    batch_gas,
    carried,
    encode_batch,
    encode_votes,
)
from runner.logs import get_logger

log = get_logger("runner.jobs.consensus.emitter")

MAX_BATCH_EVENTS = 400

Fence = tuple[str, int]  # (consensus transaction hash, lease epoch)
FenceCheck = Callable[[Sequence[Fence]], Awaitable[set[Fence]]]
Request = tuple[list[Event], Sequence[Fence], "asyncio.Future[str | None]"]
Lane = str | None  # a validator's address (its own votes), or None: the worker's own batches


class EmitterClosed(ChainError):
    pass


class ContractMissing(ChainError):
    """The batch was mined without its events: no ConsensusMain behind the address any more (the node
    was reset to a fresh chain). The engine deploys again."""


class EventEmitter:
    def __init__(self, contract: ConsensusMain, *, receipt_timeout_s: float, max_inflight: int = 2,
                 fence_check: FenceCheck | None = None) -> None:
        self.contract = contract
        self.receipt_timeout_s = receipt_timeout_s
        self.max_inflight = max_inflight
        self.fence_check = fence_check
        self.signers: frozenset[str] = frozenset()  # validators whose votes they sign themselves
        self._queues: dict[Lane, deque[Request]] = {}
        self._inflight: dict[Lane, set[asyncio.Task[None]]] = {}
        self._closed = False
        self.batches = 0
        self.events = 0

    async def emit(self, events: list[Event], fences: Sequence[Fence] = ()) -> str | None:
        """Send ``events`` (one transition's) in the next batch; with ``fences``, only while this worker
        still holds each of those leases (LeaseLost otherwise)."""
        if self._closed:
            raise EmitterClosed("the event emitter is closed")
        parts = self.lanes(events)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[str | None]] = []
        for lane, part in parts.items():
            future: asyncio.Future[str | None] = loop.create_future()
            self._queues.setdefault(lane, deque()).append((part, fences, future))
            futures.append(future)
            self._kick(lane)
        results = await asyncio.gather(*futures)
        return next((r for r in results if r is not None), None)  # the worker's lane first, when it has a part

    def lanes(self, events: list[Event]) -> dict[Lane, list[Event]]:
        """The events by the lane that sends them, each lane's in the order given; the worker's first."""
        parts: dict[Lane, list[Event]] = {}
        for event in events:
            lane = event.actor if event.kind in VOTE_KINDS and event.actor in self.signers else None
            parts.setdefault(lane, []).append(event)
        if None in parts:
            parts = {None: parts.pop(None), **parts}
        return parts

    def _kick(self, lane: Lane) -> None:
        queue, inflight = self._queues.get(lane), self._inflight.setdefault(lane, set())
        while queue and len(inflight) < self.max_inflight and not self._closed:
            batch = self._take(queue)
            if not batch:
                continue
            task = asyncio.create_task(self._send(lane, batch), name="consensus-emit")
            inflight.add(task)
            task.add_done_callback(functools.partial(self._done, lane))

    @staticmethod
    def _take(queue: deque[Request]) -> list[Request]:
        batch: list[Request] = []
        count = 0
        while queue:
            events, fences, future = queue[0]
            if batch and count + len(events) > MAX_BATCH_EVENTS:
                break
            queue.popleft()
            if future.done():  # its task was cancelled before we got to it: nothing to send
                continue
            batch.append((events, fences, future))
            count += len(events)
        return batch

    async def _fenced(self, batch: list[Request]) -> list[Request]:
        """The requests whose leases are all still held; the others fail with LeaseLost."""
        fences = [f for _, entry_fences, _ in batch for f in entry_fences]
        if not fences or self.fence_check is None:
            return batch
        held = await self.fence_check(fences)
        kept: list[Request] = []
        for request in batch:
            lost = [f for f in request[1] if f not in held]
            if not lost:
                kept.append(request)
                continue
            metrics.CONSENSUS_EVENTS_FENCED.inc(len(request[0]))
            if not request[2].done():
                request[2].set_exception(LeaseLost(f"events of {len(lost)} transaction(s) not sent: their lease "
                                                   "was taken (rolled back or recovered)"))
        return kept

    def _done(self, lane: Lane, task: asyncio.Task[None]) -> None:
        self._inflight[lane].discard(task)
        self._kick(lane)

    async def _send(self, lane: Lane, batch: list[Request]) -> None:
        started = time.monotonic()
        try:
            batch = await self._fenced(batch)
            events = [e for entry, _, _ in batch for e in entry]
            if not events:
                return
            chain = self.contract.chain
            data = encode_batch(events) if lane is None else encode_votes(events)
            tx_hash = await chain.send_transaction(to=self.contract.address, data=data, gas=batch_gas(len(events)),
                                                   sender=lane)
            sent = time.monotonic()
            receipt = await chain.wait_receipt(tx_hash, self.receipt_timeout_s, sender=lane)
            if receipt.logs != len(events) and not await chain.code_at(self.contract.address):
                raise ContractMissing(f"ConsensusMain at {self.contract.address} emitted {receipt.logs} of "
                                      f"{len(events)} events in {tx_hash}: no code behind the address")
        except BaseException as error:
            failure = error if isinstance(error, Exception) else EmitterClosed("event emission was cancelled")
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(failure)
            if not isinstance(error, Exception):
                raise
            log.warning("event batch failed", events=sum(len(entry) for entry, _, _ in batch), error=repr(error))
            return
        skipped = [entry for entry, _, _ in batch if receipt.logs != len(events)
                   and not carried(entry, receipt.log_keys, self.contract.address)]
        skipped_ids = {id(entry) for entry in skipped}
        if skipped:
            log.info("ConsensusMain skipped events it had emitted before", events=sum(map(len, skipped)),
                     chain_tx=tx_hash)
        self.batches += 1
        self.events += len(events) - sum(map(len, skipped))
        log.debug("event batch mined", events=len(events), requests=len(batch), send_s=round(sent - started, 4),
                  receipt_s=round(time.monotonic() - sent, 4), signer=lane or "worker",
                  queued=len(self._queues.get(lane) or ()))
        metrics.CONSENSUS_EVENT_BATCH.observe(len(events))
        for entry, _, future in batch:
            repeated = id(entry) in skipped_ids
            for event in entry:
                counter = metrics.CONSENSUS_EVENTS_SKIPPED if repeated else metrics.CONSENSUS_EVENTS
                counter.labels(EVENT_NAMES[event.kind]).inc()
            if not future.done():
                future.set_result(None if repeated else tx_hash)

    async def close(self) -> None:
        self._closed = True
        for queue in self._queues.values():
            while queue:
                _, _, future = queue.popleft()
                if not future.done():
                    future.set_exception(EmitterClosed("the event emitter closed"))
        tasks = [task for inflight in self._inflight.values() for task in inflight]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
