"""The consensus engine of one worker process and its three loops.

* :class:`PendingLoop` claims (set-based, SKIP LOCKED) the oldest PENDING transaction of each contract
  with nothing in flight, up to RUNNER_CONSENSUS_CONCURRENCY, and runs each in a task (machine.py).
* :class:`RecoveryLoop` renews the leases of tasks that made progress recently, and only those; cancels
  a task with no progress for RUNNER_CONSENSUS_TX_STUCK_AFTER and recovers its transaction; recovers transactions
  whose lease expired elsewhere (PENDING with recovery_count + 1; UNDETERMINED past
  RUNNER_MAX_RECOVERIES, with the reason); settles decided events left owed by a crash.
* :class:`FinalityLoop` finalizes decided transactions whose window passed and whose predecessors on
  the same contract are finalized, writes the finalized state, and emits TransactionFinalized.

All three share the worker's pool (app.db), the process's one chain (app.resources["chain"]) and
the worker's shutdown (they are runner.service.Service loops).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from runner.chain import Chain, ChainError
from runner.errors import LeaseLost, UsageError
from runner.jobs.consensus import contract as cm
from runner.jobs.consensus import metrics
from runner.jobs.consensus.contract import ConsensusMain, ensure_deployed
from runner.jobs.consensus.emitter import ContractMissing, EventEmitter
from runner.jobs.consensus.executor import ContractExecutor, Execution, TxView
from runner.jobs.consensus.machine import TxTask, decided_event
from runner.jobs.consensus.model import IN_MACHINE, short_hash
from runner.jobs.consensus.settings import consensus_settings
from runner.jobs.consensus.store import Claimed, ConsensusStore
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
from runner.service import Service

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
        self.settings = settings = app.settings
        self.consensus = consensus = consensus_settings(app)  # RUNNER_CONSENSUS_*
        self.chain = chain
        self.contract = contract
        self.emitter = emitter
        self.executor = executor
        self.store = ConsensusStore(app.db, settings.worker_id, settings.lease_timeout)
        emitter.fence_check = self.store.held  # every emit is fenced on the leases it is sent under
        self.validators: list[Validator] = synthetic_validators()  # until load_validators reads the table
        # bounds executions across all in-flight transactions (a real GenVM would be CPU-heavy)
        self.validator_slots = asyncio.Semaphore(consensus.validators * consensus.concurrency)
        self.tasks: dict[str, TxTask] = {}
        self.chain_failures = 0
        self.paused_until = 0.0
        self.pending: PendingLoop | None = None
        self.finality: FinalityLoop | None = None
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

    # --- tasks ----------------------------------------------------------------------------------
    def start(self, tx: Claimed) -> TxTask:
        stale = self.tasks.get(tx.hash)
        if stale is not None and stale.task is not None:  # its lease was taken (a rollback) and claimed again
            stale.task.cancel()
        task = TxTask(self, tx)
        self.tasks[tx.hash] = task
        task.task = asyncio.create_task(self._run(task), name=f"consensus-{tx.hash[:10]}")
        return task

    async def _run(self, task: TxTask) -> None:
        tx = task.tx
        try:
            await (task.appeal() if tx.appeal else task.run())
            self.chain_failures = 0
        except LeaseLost as error:
            log.info("consensus lease lost; dropping the transaction", tx=short_hash(tx.hash), error=str(error))
        except ChainError as error:
            self._pause(error)
            await self._quietly(self.store.abandon(tx, f"released after a chain error: {error}"[:500]))
            await self._quietly(self.after_chain_error(error))
        except Exception as error:  # a bug or a database outage: count it as a recovery (capped)
            log.error("consensus task failed", tx=short_hash(tx.hash), status=tx.status, error=repr(error))
            if tx.appeal:  # the decision stands; the appeal ends, recorded (an operator may appeal again)
                await self._quietly(self.store.appeal_abandoned(tx, f"{type(error).__name__}: {error}"[:300]))
                return
            await self._quietly(self.store.recover_own([(tx.hash, tx.epoch)], self.settings.max_recoveries,
                                                       f"task error {type(error).__name__}"))
        finally:
            if self.tasks.get(tx.hash) is task:  # a rolled-back run's stale task may outlive its re-claim
                del self.tasks[tx.hash]
            if self.pending is not None:
                self.pending.wake.set()

    async def _quietly(self, coro: Any) -> None:
        try:
            await coro
        except Exception as error:  # the lease expires and the recovery loop takes over
            log.warning("could not release a consensus transaction", error=repr(error))

    def _pause(self, error: BaseException) -> None:
        self.chain_failures += 1
        pause = min(MAX_PAUSE_S, 0.5 * 2 ** min(self.chain_failures, 5))
        self.paused_until = time.monotonic() + pause
        log.warning("chain error; pausing claims", error=str(error)[:300], pause_s=pause)

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

    def on_decided(self) -> None:
        if self.finality is not None:
            self.finality.wake.set()

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

    async def settle_owed_decided(self) -> int:
        txs = await self.store.claim_owed_decided(OWED_BATCH)
        if not txs:
            return 0
        events = [decided_event(tx, tx.status, (tx.result or {}).get("receipt_hash")) for tx in txs]
        try:
            hashes = await self.settle(txs, "decided", events)
        except ChainError as error:
            for tx in txs:
                await self._quietly(self.store.abandon(tx, None))
            await self._quietly(self.after_chain_error(error))
            raise
        for tx, event_tx in zip(txs, hashes, strict=True):
            await self._quietly(self.store.release_decided(tx, event_tx or ""))
        log.info("owed decided events settled", count=len(txs))
        self.on_decided()
        return len(txs)

    async def settle_owed_finalized(self) -> int:
        txs = await self.store.claim_owed_finalized(OWED_BATCH)
        if not txs:
            return 0
        events = [cm.Event(cm.FINALIZED, tx.hash, tx.to_address, data=cm.word((tx.result or {}).get("receipt_hash")
                                                                                or 0), round=tx.round) for tx in txs]
        try:
            hashes = await self.settle(txs, "finalized", events)
        except ChainError as error:
            await self.store.release_finalized([t.hash for t in txs], [t.epoch for t in txs], None)
            await self._quietly(self.after_chain_error(error))
            raise
        for tx, event_tx in zip(txs, hashes, strict=True):
            await self.store.release_finalized([tx.hash], [tx.epoch], event_tx)
        log.info("owed finalized events settled", count=len(txs))
        return len(txs)


class PendingLoop(Service):
    name = "consensus-pending"

    def __init__(self, engine: Engine) -> None:
        super().__init__(interval_s=engine.settings.poll_interval)
        self.engine = engine
        engine.pending = self

    async def run_once(self) -> None:
        engine = self.engine
        free = engine.consensus.concurrency - len(engine.tasks)
        if free <= 0 or engine.paused():
            return
        for tx in await engine.store.claim_appeals(free):  # settled first: their contracts wait for them
            engine.start(tx)
            free -= 1
        if free <= 0:
            return
        for tx in await engine.store.claim(free):
            engine.start(tx)
            metrics.CONSENSUS_TRANSITIONS.labels("ACTIVATED").inc()

    async def on_stop(self) -> None:
        """Let running transactions finish within the grace; give the rest back (no recovery counted)."""
        tasks = list(self.engine.tasks.values())
        if not tasks:
            return
        running = [t.task for t in tasks if t.task is not None]
        _, late = await asyncio.wait(running, timeout=self.engine.settings.shutdown_grace)
        stopped = [t for t in tasks if t.task in late]
        for task in stopped:
            assert task.task is not None
            task.task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        for task in stopped:
            await self.engine._quietly(self.engine.store.abandon(task.tx, "released: worker shutdown"))
        if stopped:
            log.info("consensus transactions given back at shutdown", count=len(stopped))


class RecoveryLoop(Service):
    name = "consensus-recovery"

    def __init__(self, engine: Engine) -> None:
        super().__init__(interval_s=engine.settings.heartbeat_interval)
        self.engine = engine

    async def run_once(self) -> None:
        engine, settings = self.engine, self.engine.settings
        tasks = [t for t in engine.tasks.values() if t.task is not None and not t.task.done()]
        stuck = [t for t in tasks if t.stalled_for > engine.consensus.tx_stuck_after]
        live = [t for t in tasks if t not in stuck]
        renewed = await engine.store.renew([(t.tx.hash, t.tx.epoch) for t in live])
        for task in live:
            if task.tx.hash not in renewed and task.task is not None and not task.task.done() \
                    and task.tx.status in IN_MACHINE:
                log.warning("consensus lease taken over; cancelling our task", tx=short_hash(task.tx.hash))
                task.task.cancel()
        if stuck:
            await self._recover_stuck(stuck)
        for row in await engine.store.recover_expired(settings.max_recoveries):
            self._log_recovered(row, "lease_expired")
        await engine.settle_owed_decided()

    async def _recover_stuck(self, stuck: list[TxTask]) -> None:
        engine, settings = self.engine, self.engine.settings
        for task in stuck:
            assert task.task is not None
            task.task.cancel()
        await asyncio.gather(*(t.task for t in stuck if t.task is not None), return_exceptions=True)
        why = f"no progress for {engine.consensus.tx_stuck_after:g}s (task cancelled by {settings.worker_id})"
        rows = await engine.store.recover_own([(t.tx.hash, t.tx.epoch) for t in stuck], settings.max_recoveries, why)
        for row in rows:
            self._log_recovered(row, "stuck")
        recovered = {r["hash"] for r in rows}
        for task in stuck:  # decided but stuck emitting its event: release it; the event stays owed
            if task.tx.hash not in recovered:
                await engine._quietly(engine.store.abandon(task.tx, None))

    def _log_recovered(self, row: Any, why: str) -> None:
        metrics.CONSENSUS_RECOVERED.labels(row["status"], why).inc()
        log.warning("consensus transaction recovered", tx=short_hash(row["hash"]), to=row["status"],
                    recovery_count=row["recovery_count"], reason=row["reason"])


class FinalityLoop(Service):
    name = "consensus-finality"

    def __init__(self, engine: Engine) -> None:
        interval = engine.settings.poll_interval
        if engine.consensus.finality_window > 0:
            interval = min(interval, max(0.05, engine.consensus.finality_window / 2))
        super().__init__(interval_s=interval)
        self.engine = engine
        engine.finality = self

    async def run_once(self) -> None:
        engine = self.engine
        await engine.settle_owed_finalized()
        while True:
            batch = await engine.store.finalize_ready(engine.consensus.finality_window, FINALITY_BATCH,
                                                      engine.consensus.appeal_window_factor)
            if not batch or not batch.hashes:
                return
            events = [cm.Event(cm.FINALIZED, r["hash"], r["to_address"], data=cm.word(r["receipt_hash"] or 0),
                               round=r["round"]) for r in batch.rows]
            try:
                event_tx = await engine.emitter.emit(events, list(zip(batch.hashes, batch.epochs, strict=True)))
                if event_tx is None:  # every one emitted before (ConsensusMain skipped them): where
                    first = batch.rows[0]
                    event_tx = await engine.contract.find_event((cm.FINALIZED,), first["hash"], first["round"])
            except ChainError as error:
                await engine.store.release_finalized(batch.hashes, batch.epochs, None)
                await engine._quietly(engine.after_chain_error(error))
                raise
            await engine.store.release_finalized(batch.hashes, batch.epochs, event_tx)
            metrics.CONSENSUS_TRANSITIONS.labels("FINALIZED").inc(len(batch.hashes))
            if len(batch.hashes) < FINALITY_BATCH:
                return
