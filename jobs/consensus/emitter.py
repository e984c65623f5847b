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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from runner.batching import BatcherClosed, GroupCommit
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
Lane = str | None  # a validator's address (its own votes), or None: the worker's own batches


class EmitterClosed(ChainError):
    pass


class ContractMissing(ChainError):
    """The batch was mined without its events: no ConsensusMain behind the address any more (the node
    was reset to a fresh chain). The engine deploys again."""


@dataclass(frozen=True, eq=False)
class Request:
    events: list[Event]  # one transition's, never split across batches
    fences: Sequence[Fence]


class EventEmitter:
    def __init__(self, contract: ConsensusMain, *, receipt_timeout_s: float, max_inflight: int = 2,
                 fence_check: FenceCheck | None = None) -> None:
        self.contract = contract
        self.receipt_timeout_s = receipt_timeout_s
        self.max_inflight = max_inflight
        self.fence_check = fence_check
        self.signers: frozenset[str] = frozenset()  # validators whose votes they sign themselves
        self._lanes: dict[Lane, GroupCommit[Request, str | None]] = {}
        self._closed = False
        self.batches = 0
        self.events = 0

    async def emit(self, events: list[Event], fences: Sequence[Fence] = ()) -> str | None:
        """Send ``events`` (one transition's) in the next batch; with ``fences``, only while this worker
        still holds each of those leases (LeaseLost otherwise)."""
        if self._closed:
            raise EmitterClosed("the event emitter is closed")
        parts = [self._lane(lane).submit(Request(part, fences)) for lane, part in self.lanes(events).items()]
        try:
            results = [await parts[0]] if len(parts) == 1 else await asyncio.gather(*parts)
        except BatcherClosed as error:
            raise EmitterClosed(str(error)) from None
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

    def _lane(self, lane: Lane) -> GroupCommit[Request, str | None]:
        batcher = self._lanes.get(lane)
        if batcher is None:
            batcher = self._lanes[lane] = GroupCommit(
                functools.partial(self._send, lane), max_batch=MAX_BATCH_EVENTS, max_inflight=self.max_inflight,
                weight=lambda request: len(request.events), name="consensus-emit")
        return batcher

    async def _fenced(self, batch: Sequence[Request]) -> dict[int, LeaseLost]:
        """The requests (by position) whose leases are no longer all held, each with its LeaseLost."""
        fences = [f for request in batch for f in request.fences]
        if not fences or self.fence_check is None:
            return {}
        held = await self.fence_check(fences)
        refused: dict[int, LeaseLost] = {}
        for i, request in enumerate(batch):
            lost = [f for f in request.fences if f not in held]
            if lost:
                metrics.CONSENSUS_EVENTS_FENCED.inc(len(request.events))
                refused[i] = LeaseLost(f"events of {len(lost)} transaction(s) not sent: their lease was taken "
                                       "(rolled back or recovered)")
        return refused

    async def _send(self, lane: Lane, batch: Sequence[Request]) -> list[str | BaseException | None]:
        """One chain transaction for the batch's requests still fenced in; each request's answer: the
        chain tx, None (ConsensusMain skipped its events: emitted before), or its LeaseLost."""
        started = time.monotonic()
        try:
            refused = await self._fenced(batch)
            sending = [r for i, r in enumerate(batch) if i not in refused]
            events = [e for request in sending for e in request.events]
            if not events:
                return [refused.get(i) for i in range(len(batch))]
            chain = self.contract.chain
            data = encode_batch(events) if lane is None else encode_votes(events)
            tx_hash = await chain.send_transaction(to=self.contract.address, data=data, gas=batch_gas(len(events)),
                                                   sender=lane)
            sent = time.monotonic()
            receipt = await chain.wait_receipt(tx_hash, self.receipt_timeout_s, sender=lane)
            if receipt.logs != len(events) and not await chain.code_at(self.contract.address):
                raise ContractMissing(f"ConsensusMain at {self.contract.address} emitted {receipt.logs} of "
                                      f"{len(events)} events in {tx_hash}: no code behind the address")
        except Exception as error:  # every request of the batch fails with it (GroupCommit)
            log.warning("event batch failed", events=sum(len(r.events) for r in batch), error=repr(error))
            raise
        skipped = {id(r) for r in sending if receipt.logs != len(events)
                   and not carried(r.events, receipt.log_keys, self.contract.address)}
        if skipped:
            log.info("ConsensusMain skipped events it had emitted before",
                     events=sum(len(r.events) for r in sending if id(r) in skipped), chain_tx=tx_hash)
        self.batches += 1
        self.events += sum(len(r.events) for r in sending if id(r) not in skipped)
        log.debug("event batch mined", events=len(events), requests=len(sending), send_s=round(sent - started, 4),
                  receipt_s=round(time.monotonic() - sent, 4), signer=lane or "worker",
                  queued=self._lanes[lane].queued())
        metrics.CONSENSUS_EVENT_BATCH.observe(len(events))
        answers: list[str | BaseException | None] = []
        for i, request in enumerate(batch):
            if i in refused:
                answers.append(refused[i])
                continue
            repeated = id(request) in skipped
            for event in request.events:
                counter = metrics.CONSENSUS_EVENTS_SKIPPED if repeated else metrics.CONSENSUS_EVENTS
                counter.labels(EVENT_NAMES[event.kind]).inc()
            answers.append(None if repeated else tx_hash)
        return answers

    async def close(self) -> None:
        self._closed = True
        for batcher in self._lanes.values():
            await batcher.close()
