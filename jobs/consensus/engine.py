"""The consensus engine of one worker process: what its two job kinds do (runner.jobs.consensus.work).

* :meth:`Engine.advance` (a ``consensus.contract`` job): recovers what a dead run left in the machine
  (PENDING with recovery_count + 1; UNDETERMINED at RUNNER_MAX_RECOVERIES, with the reason), settles the
  contract's owed decided events, then runs one unit: an appeal asked for, else the oldest PENDING
  transaction through the state machine (machine.py), under a watchdog that recovers it after
  RUNNER_CONSENSUS_TX_STUCK_AFTER seconds without progress; with more left, the job snoozes (its next turn).
* :meth:`Engine.finalize_due` (the ``consensus.finality`` job): emits owed TransactionFinalized events,
  then finalizes decided transactions whose window passed and whose predecessors on the same contract are
  finalized, writes the finalized state, and emits TransactionFinalized.

The core claims, heartbeats, rescues and fences those jobs; the engine shares the worker's pool (app.db)
and the process's one chain (app.resources["chain"]).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from runner.chain import Chain, ChainError
from runner.errors import LeaseLost, Snooze, UsageError
from runner.jobs.consensus import contract as cm
from runner.jobs.consensus import metrics
from runner.jobs.consensus.contract import ConsensusMain, ensure_deployed
from runner.jobs.consensus.emitter import ContractMissing, EventEmitter
from runner.jobs.consensus.executor import ContractExecutor, Execution, TxView
from runner.jobs.consensus.machine import TxTask, decided_event
from runner.jobs.consensus.model import short_hash
from runner.jobs.consensus.settings import consensus_settings
from runner.jobs.consensus.store import Claimed, ConsensusStore, Holder
from runner.jobs.consensus.validators import (
    Draw,
    Validator,
    draw,
    draw_order,
    draw_seed,
    resolve_key,
    synthetic_validators,
)
from runner.logs import get_logger

if TYPE_CHECKING:
    from runner.app import App

log = get_logger("runner.jobs.consensus")
FINALITY_BATCH = 500
OWED_BATCH = 100
MAX_PAUSE_S = 10.0


class Engine:
    def __init__(self, app: App, chain: Chain, contract: ConsensusMain, emitter: EventEmitter,
                 executor: ContractExecutor) -> None:
        self.app = app
        self.settings = app.settings
        self.consensus = consensus = consensus_settings(app)  # RUNNER_CONSENSUS_*
        self.chain = chain
        self.contract = contract
        self.emitter = emitter
        self.executor = executor
        self.store = ConsensusStore(app)
        emitter.fence_check = self.store.held  # every emit is fenced on the leases it is sent under
        self.validators: list[Validator] = synthetic_validators()  # until load_validators reads the table
        # bounds executions across all in-flight transactions (a real GenVM would be CPU-heavy)
        self.validator_slots = asyncio.Semaphore(consensus.validators * consensus.concurrency)
        self.chain_failures = 0
        self.paused_until = 0.0
        self._redeploying = asyncio.Lock()

    # --- validators ---------------------------------------------------------------------------
    async def load_validators(self) -> None:
        """The validators table (empty: SYNTHETIC_POOL unkeyed nodes of equal stake). Each keyed validator's
        key is resolved and checked against its address, becomes a signer of the one chain, and is
        registered on ConsensusMain; a key that cannot be found, or too few validators, is a UsageError."""
        rows = await self.store.validators()
        if not rows:
            return
        size = self.consensus.validators + 1
        if len(rows) < size:
            raise UsageError(f"the validators table has {len(rows)} validator(s); RUNNER_CONSENSUS_VALIDATORS="
                             f"{self.consensus.validators} needs {size} (a leader and {size - 1} validators)")
        keyed = [self._add_signer(v) for v in rows if v.key_ref is not None]
        for address in keyed:  # it pays for its own votes: without funds every one of them would fail
            if not await self.chain.w3.eth.get_balance(address):  # type: ignore[arg-type]
                raise UsageError(f"validator {address} has no funds on chain {self.chain.chain_id} to pay for "
                                 "its votes: fund it, or remove its key reference")
        self.validators = rows
        self.emitter.signers = frozenset(keyed)
        await self.register_validators()
        log.info("validators loaded", validators=len(rows), signing=len(keyed), stake=sum(self.stakes.values()))

    @property
    def nodes(self) -> list[str]:
        return [v.address for v in self.validators]

    @property
    def stakes(self) -> dict[str, int]:
        return {v.address: v.stake for v in self.validators}

    def _add_signer(self, validator: Validator) -> str:
        assert validator.key_ref is not None
        address = self.chain.add_signer(resolve_key(validator.key_ref))
        if address.lower() != validator.address.lower():
            raise UsageError(f"validator {validator.address}: its key reference {validator.key_ref} holds the "
                             f"key of {address}")
        return address

    async def register_validators(self) -> None:
        signers = sorted(self.emitter.signers)
        if signers:
            await self.contract.register_validators(signers, self.emitter.receipt_timeout_s)

    def draw_for(self, tx: Claimed) -> Draw:
        """This run's committee: seeded by the round the run began in (rotations keep it), without the
        leaders that leader appeals dropped."""
        dropped = frozenset(a["leader"] for a in tx.appeals if a.get("kind") == "leader" and a.get("leader"))
        return draw(self.validators, tx.hash, tx.round - tx.rotation_count, self.consensus.validators + 1, dropped)

    def appeal_draw(self, tx: Claimed, number: int) -> tuple[str, list[str]]:
        """Appeal ``number``'s seed and validators: new to the transaction (neither its leader nor any
        earlier voter), drawn by stake with the seed of the appeal's round; fewer when the table runs out."""
        seed = draw_seed(tx.hash, tx.round)
        voted = frozenset({o["validator"] for o in tx.votes} | ({tx.leader} if tx.leader else set()))
        return seed, draw_order(self.validators, seed, voted)[:self.consensus.appeal_validators(number)]

    # --- a contract job ---------------------------------------------------------------------------
    async def advance(self, contract: str, holder: Holder) -> dict[str, Any]:
        """One run of the contract's job: leftovers first, then one unit of work (see the module doc). With
        more work left, the job snoozes: its next turn comes behind the other contracts' waiting jobs."""
        done: dict[str, Any] = {"contract": contract, "transactions": 0, "appeals": 0, "settled": 0}
        if self.paused():  # the chain failed just now: back off before touching it
            # a new job for later, not a retry: a long outage must not use up this one's attempts
            await self.store.postpone(contract, self.paused_until - time.monotonic())
            return done | {"postponed": "the chain failed just now"}
        blocked, tx = await self.store.take_next_if_clear(contract, holder)
        if blocked:  # what a dead run left first: its transactions recovered, its owed decided events emitted
            for row in await self.store.recover_leftovers(contract, self.settings.max_recoveries):
                _log_recovered(row, "holder_lost")
            settled = await self._settle_owed_decided(contract, holder)
            if settled is None:
                return done | {"postponed": "the chain failed"}
            done["settled"] = settled
            tx = await self.store.take_next(contract, holder)
        if tx is None:
            return done
        if not tx.appeal:
            metrics.CONSENSUS_TRANSITIONS.labels("ACTIVATED").inc()
        done["appeals" if tx.appeal else "transactions"] = 1
        if await self._run(TxTask(self, tx)) and tx.more:
            # no new job and no attempt used: the contracts take turns in the worker's slots
            raise Snooze(0.0, "the contract's next unit waits its turn")
        return done  # nothing left, or its transaction was left to a new job of its contract

    async def _run(self, task: TxTask) -> bool:
        """Run ``task`` to its end: True when it ended as it should (decided, appeal settled, rolled back),
        False when its transaction was left to a new job of its contract (given back, recovered, lost: each
        of those enqueues one). When even that write fails, the error reaches the core, which retries this
        job: its next run finds the transaction left over."""
        tx = task.tx
        try:
            await self._watched(task)
            self.chain_failures = 0
            return True
        except LeaseLost as error:  # recovered, rolled back or reset under us: its new job has it
            log.info("consensus lease lost; dropping the transaction", tx=short_hash(tx.hash), error=str(error))
            return False
        except ChainError as error:  # not the transaction's fault: given back, uncounted, for after a pause
            pause = self._pause(error)
            await self._quietly(self.after_chain_error(error))
            await self.store.abandon(tx, f"released after a chain error: {error}"[:500], again_after=pause)
            return False
        except StuckTask as stuck:
            await self._recover(task, str(stuck), "stuck")
            return False
        except asyncio.CancelledError:  # shutdown, a cancelled job, a lost job lease: given back, uncounted
            await asyncio.shield(self._quietly(self.store.abandon(tx, "released: its job was stopped")))
            raise
        except Exception as error:  # a bug or a database outage: count it as a recovery (capped)
            log.error("consensus task failed", tx=short_hash(tx.hash), status=tx.status, error=repr(error))
            if tx.appeal:  # the decision stands; the appeal ends, recorded (an operator may appeal again)
                await self.store.appeal_abandoned(tx, f"{type(error).__name__}: {error}"[:300])
                return True
            await self._recover(task, f"task error {type(error).__name__}", "error")
            return False

    async def _watched(self, task: TxTask) -> None:
        """The task, cancelled after RUNNER_CONSENSUS_TX_STUCK_AFTER seconds without progress (a wait on the
        chain, bounded by its own timeouts, is not counted): StuckTask."""
        stuck_after = self.consensus.tx_stuck_after
        run = asyncio.ensure_future(task.appeal() if task.tx.appeal else task.run())
        task.task = run
        try:
            while True:
                done, _ = await asyncio.wait({run}, timeout=max(0.05, stuck_after - task.stalled_for))
                if done:
                    return run.result()
                if task.stalled_for > stuck_after:
                    run.cancel()
                    await asyncio.gather(run, return_exceptions=True)
                    raise StuckTask(f"no progress for {stuck_after:g}s (task cancelled by {self.settings.worker_id})")
        finally:
            if not run.done():
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)

    async def _recover(self, task: TxTask, why: str, label: str) -> None:
        tx = task.tx
        again = min(MAX_PAUSE_S, 0.2 * 2 ** min(tx.recovery_count, 5))  # a failing transaction backs off
        try:
            row = await self.store.recover_own(tx, self.settings.max_recoveries, why, again_after=again)
            if row is not None:
                _log_recovered(row, label)
            else:  # decided but stuck emitting its event: released; the event stays owed
                await self.store.abandon(tx, None, again_after=again)
        except Exception as error:  # the core retries this job; its next run finds the transaction left over
            log.warning("could not recover a consensus transaction", tx=short_hash(tx.hash), error=repr(error))
            raise

    async def _quietly(self, coro: Any) -> None:
        try:
            await coro
        except Exception as error:  # what it left is taken over by the contract's next job
            log.warning("consensus clean-up failed", error=repr(error))

    def _pause(self, error: BaseException) -> float:
        self.chain_failures += 1
        pause = min(MAX_PAUSE_S, 0.5 * 2 ** min(self.chain_failures, 5))
        self.paused_until = time.monotonic() + pause
        log.warning("chain error; pausing consensus work", error=str(error)[:300], pause_s=pause)
        return pause

    async def after_chain_error(self, error: BaseException) -> None:
        if isinstance(error, ContractMissing):
            await self.redeploy()

    async def redeploy(self) -> None:
        """Deploy ConsensusMain again when the node lost it (one task does it; the others find it done)."""
        async with self._redeploying:
            if await self.chain.code_at(self.contract.address):
                return
            contract = await ensure_deployed(self.chain, self.store, self.emitter.receipt_timeout_s)
            self.contract = contract
            self.emitter.contract = contract
            await self.register_validators()
            log.warning("ConsensusMain deployed again after the node lost it", address=contract.address)

    def paused(self) -> bool:
        return time.monotonic() < self.paused_until

    async def execute(self, view: TxView, state: dict[str, Any]) -> Execution:
        """Run the executor; an exception is a deterministic failed receipt, not a crash."""
        try:
            return await self.executor.execute(view, state)
        except Exception as error:
            return Execution({"ok": False, "error": f"{type(error).__name__}: {error}"}, state)

    # --- owed events ----------------------------------------------------------------------------
    async def settle(self, txs: list[Claimed], column: str, events: list[cm.Event]) -> list[str | None]:
        """Emit (once) the owed ``column`` event of each transaction: the logs first, then one batch."""
        kinds = cm.COLUMN_KINDS[column]
        found: list[str | None] = [await self.contract.find_event(kinds, tx.hash, tx.round) for tx in txs]
        missing = [e for e, f in zip(events, found, strict=True) if f is None]
        fences = [(tx.hash, tx.epoch) for tx, f in zip(txs, found, strict=True) if f is None]
        emitted = await self.emitter.emit(missing, fences) if missing else None
        if missing and emitted is None:  # all emitted meanwhile (ConsensusMain skipped them): where
            return [f or await self.contract.find_event(kinds, tx.hash, tx.round)
                    for tx, f in zip(txs, found, strict=True)]
        return [f or emitted for f in found]

    async def _settle_owed_decided(self, contract: str, holder: Holder) -> int | None:
        """The contract's owed decided events (left by a crash, the recovery cap or a chain reset), emitted
        once each; on a chain error they stay owed and None says so (a new job of the contract, enqueued for
        after the chain pause, comes back for them)."""
        txs = await self.store.take_owed_decided(contract, holder)
        if not txs:
            return 0
        events = [decided_event(tx, tx.status, (tx.result or {}).get("receipt_hash")) for tx in txs]
        try:
            hashes = await self.settle(txs, "decided", events)
        except ChainError as error:  # still owed: the next take (a new epoch of this job) has them again
            pause = self._pause(error)
            await self._quietly(self.after_chain_error(error))
            await self.store.postpone(contract, pause)
            return None
        for tx, event_tx in zip(txs, hashes, strict=True):
            await self.store.release_decided(tx, event_tx or "")
        log.info("owed decided events settled", count=len(txs))
        return len(txs)

    # --- the finality job -------------------------------------------------------------------------
    async def finalize_due(self, holder: Holder) -> dict[str, Any]:
        """Owed TransactionFinalized events first, then every finalizable prefix, in batches. On a chain
        error they stay owed, and a new finality job comes back for them after the chain pause (a new job,
        not a retry: a long outage must not use up this one's attempts)."""
        try:
            settled = await self._settle_owed_finalized(holder)
            finalized = await self._finalize_batches(holder)
        except ChainError as error:
            pause = self._pause(error)
            await self._quietly(self.after_chain_error(error))
            await self.store.enqueue_finality(pause)
            return {"did": "postponed: the chain failed"}
        after = await self.store.next_finality_due()
        if after is not None:  # the next run, for the earliest window still open
            await self.store.enqueue_finality(after)
        return {"finalized": finalized, "settled": settled, "next_in_s": after}

    async def _finalize_batches(self, holder: Holder) -> int:
        finalized = 0
        while True:
            batch = await self.store.finalize_ready(holder, FINALITY_BATCH)
            if not batch.hashes:
                return finalized
            events = [cm.Event(cm.FINALIZED, r["hash"], r["to_address"], data=cm.word(r["receipt_hash"] or 0),
                               round=r["round"]) for r in batch.rows]
            try:
                event_tx = await self.emitter.emit(events, list(zip(batch.hashes, batch.epochs, strict=True)))
                if event_tx is None:  # every one emitted before (ConsensusMain skipped them): where
                    first = batch.rows[0]
                    event_tx = await self.contract.find_event((cm.FINALIZED,), first["hash"], first["round"])
            except ChainError:
                await self.store.release_finalized(batch.hashes, batch.epochs, None)
                raise
            await self.store.release_finalized(batch.hashes, batch.epochs, event_tx)
            metrics.CONSENSUS_TRANSITIONS.labels("FINALIZED").inc(len(batch.hashes))
            finalized += len(batch.hashes)

    async def _settle_owed_finalized(self, holder: Holder) -> int:
        txs = await self.store.take_owed_finalized(holder, OWED_BATCH)
        if not txs:
            return 0
        events = [cm.Event(cm.FINALIZED, tx.hash, tx.to_address, data=cm.word((tx.result or {}).get("receipt_hash")
                                                                                or 0), round=tx.round) for tx in txs]
        try:
            hashes = await self.settle(txs, "finalized", events)
        except ChainError:
            await self.store.release_finalized([t.hash for t in txs], [t.epoch for t in txs], None)
            raise
        for tx, event_tx in zip(txs, hashes, strict=True):
            await self.store.release_finalized([tx.hash], [tx.epoch], event_tx)
        log.info("owed finalized events settled", count=len(txs))
        return len(txs)


class StuckTask(Exception):
    """A transaction made no progress for RUNNER_CONSENSUS_TX_STUCK_AFTER seconds."""


def _log_recovered(row: Any, why: str) -> None:
    metrics.CONSENSUS_RECOVERED.labels(row["status"], why).inc()
    log.warning("consensus transaction recovered", tx=short_hash(row["hash"]), to=row["status"],
                recovery_count=row["recovery_count"], reason=row["reason"])
