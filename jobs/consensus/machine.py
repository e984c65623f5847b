"""One claimed transaction through the state machine.

ACTIVATED --leader executes--> PROPOSING --validators execute and commit--> COMMITTING --reveal-->
REVEALING --majority?--> ACCEPTED | UNDETERMINED | VALIDATORS_TIMEOUT; a leader timeout goes from
ACTIVATED straight to LEADER_TIMEOUT. Each transition is ONE fenced statement; then its event is
emitted and its receipt awaited (no connection is held meanwhile); the event's chain tx hash is stored
by the next transition (or the release). An event whose hash is stored, or which the chain logs already
hold (checked when the transaction was held before), is never emitted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from runner.chain import ChainError
from runner.jobs.consensus import contract as cm
from runner.jobs.consensus import metrics
from runner.jobs.consensus.executor import Execution, TxView
from runner.jobs.consensus.model import (
    ACCEPTED,
    ACTIVATED,
    COMMITTING,
    LEADER_TIMEOUT,
    OUTCOME_CODES,
    PROPOSING,
    REVEALING,
    UNDETERMINED,
    VALIDATORS_TIMEOUT,
    VOTE_CODES,
    Faults,
    diff_state,
    hash_hex,
    short_hash,
    strip_faults,
)
from runner.jobs.consensus.store import Claimed
from runner.jobs.consensus.validators import Draw
from runner.logs import get_logger

if TYPE_CHECKING:
    from runner.jobs.consensus.engine import Engine

log = get_logger("runner.jobs.consensus.machine")
FOREVER_S = 10**6


@dataclass(frozen=True)
class Vote:
    validator: str
    vote: str  # agree | disagree | timeout
    salt: str

    @property
    def commit(self) -> str:
        return hash_hex(f"{self.vote}:{self.salt}")

    def committed(self) -> dict[str, str]:
        return {"validator": self.validator, "commit": self.commit}

    def revealed(self) -> dict[str, str]:
        return {"validator": self.validator, "vote": self.vote, "salt": self.salt, "commit": self.commit}


def decide(votes: list[Vote]) -> tuple[str, str | None]:
    """A majority agreeing accepts; timeouts that kept a majority from forming are VALIDATORS_TIMEOUT."""
    agree = sum(v.vote == "agree" for v in votes)
    timeouts = sum(v.vote == "timeout" for v in votes)
    cancelled = sum(v.vote == "cancelled" for v in votes)
    majority = len(votes) // 2 + 1
    if agree >= majority:
        return ACCEPTED, None
    tally = (f"{agree} agree, {len(votes) - agree - timeouts - cancelled} disagree, {timeouts} timed out"
             + (f", {cancelled} cancelled" if cancelled else "") + f" of {len(votes)}")
    if timeouts and agree + timeouts >= majority:
        return VALIDATORS_TIMEOUT, f"validators timed out: {tally}"
    return UNDETERMINED, f"no majority: {tally}"


def settled_early(votes: list[Vote], total: int) -> bool:
    """Whether ``votes`` (of ``total``) already decide: a majority agrees, or a majority disagrees (then
    neither ACCEPTED nor VALIDATORS_TIMEOUT can come of the rest). The rest cannot change the outcome."""
    majority = total // 2 + 1
    return sum(v.vote == "agree" for v in votes) >= majority or sum(v.vote == "disagree" for v in votes) >= majority


async def gather_votes(validators: list[str], ballots: list[Coroutine[Any, Any, Vote]],
                       prior: Sequence[Vote] = ()) -> list[Vote]:
    """Run the ballots concurrently; once ``prior`` and the votes in decide the outcome (early quorum),
    the validators still running are cancelled and recorded as "cancelled" (their slots free at once)."""
    tasks = [asyncio.ensure_future(ballot) for ballot in ballots]
    total = len(prior) + len(tasks)
    try:
        pending = set(tasks)
        while pending:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            votes = [*prior, *(t.result() for t in tasks if t.done())]
            if pending and settled_early(votes, total):
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                metrics.CONSENSUS_VALIDATORS_CANCELLED.inc(len(pending))
                break
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return [t.result() if not t.cancelled() else Vote(v, "cancelled", secrets.token_hex(16))
            for t, v in zip(tasks, validators, strict=True)]


def receipt_of(execution: Execution) -> dict[str, Any]:
    return {"output": execution.output, "receipt_hash": execution.receipt_hash, "state_hash": execution.state_hash}


class TxTask:
    """Runs one transaction; ``last_progress`` is what the engine's watchdog judges it by."""

    def __init__(self, engine: Engine, tx: Claimed) -> None:
        self.engine = engine
        self.tx = tx
        self.last_progress = time.monotonic()
        self.chain_waits = 0  # RPCs and receipt waits under way: bounded by their own timeouts, and progress
        self.task: asyncio.Task[None] | None = None
        self.draw: Draw | None = None  # this run's committee (drawn when it starts)

    def progress(self) -> None:
        self.last_progress = time.monotonic()

    @property
    def stalled_for(self) -> float:
        """Seconds without progress; 0 while it waits on the chain (a slow block is not a stuck task)."""
        return 0.0 if self.chain_waits else time.monotonic() - self.last_progress

    @contextlib.asynccontextmanager
    async def on_chain(self) -> AsyncIterator[None]:
        self.chain_waits += 1
        try:
            yield
        finally:
            self.chain_waits -= 1
            self.progress()

    # --- events ---------------------------------------------------------------------------------
    async def emit_once(self, column: str, events: list[cm.Event]) -> str:
        """Emit the events of one transition of this round (all carry ``tx.round``) unless they are
        known to be on chain; return the chain tx that carried them."""
        stored = self.tx.events.get(column)
        kinds, round = cm.COLUMN_KINDS[column], self.tx.round
        async with self.on_chain():
            # held before: its events may be on chain already; the logs tell, when one chain transaction
            # carries them all (votes signed by several validators may be on chain in part: sent again,
            # ConsensusMain skips those it has)
            if stored is None and self.tx.claimed_before and len(self.engine.emitter.lanes(events)) == 1:
                stored = await self.engine.contract.find_event(kinds, self.tx.hash, round)
            if stored is not None:
                for kind in {e.kind for e in events}:
                    metrics.CONSENSUS_EVENTS_SKIPPED.labels(cm.EVENT_NAMES[kind]).inc()
            else:
                stored = await self.engine.emitter.emit(events, [(self.tx.hash, self.tx.epoch)])
            if stored is None:  # ConsensusMain had them already (emitted once, whoever sent them): where?
                stored = await self.engine.contract.find_event(kinds, self.tx.hash, round)
        if stored is None:
            raise ChainError(f"ConsensusMain skipped the {column} events of {short_hash(self.tx.hash)} "
                             "as emitted, but no log of them was found")
        self.tx.events[column] = stored
        return stored

    def _draw_record(self) -> dict[str, Any]:
        assert self.draw is not None
        return self.draw.record(self.engine.stakes)

    def event(self, kind: int, actor: str = cm.ZERO_ADDRESS, data: bytes = cm.ZERO_WORD) -> cm.Event:
        return cm.Event(kind, self.tx.hash, self.tx.to_address, actor, data, round=self.tx.round)

    async def _transition(self, to: str, **fields: Any) -> None:
        await self.engine.store.transition(self.tx, to=to, **fields)
        metrics.CONSENSUS_TRANSITIONS.labels(to).inc()
        self.progress()

    # --- nodes ----------------------------------------------------------------------------------
    async def _run_leader(self, view: TxView, faults: Faults) -> Execution:
        if faults.leader_delay:
            await asyncio.sleep(faults.leader_delay)
        return await self.engine.execute(view, self.tx.accepted_state)

    async def _run_validator(self, index: int, view: TxView, faults: Faults, state: dict[str, Any] | None,
                             appeal: bool) -> Execution:
        if not appeal and index < faults.validator_timeouts:
            await asyncio.sleep(FOREVER_S)
        delay = faults.validator_delay + (faults.appeal_delay if appeal else 0.0)
        if delay:
            await asyncio.sleep(delay)
        execution = await self.engine.execute(view, self.tx.accepted_state if state is None else state)
        rate = self.engine.consensus.disagree_rate
        if appeal:
            disagrees = index < faults.appeal_disagree
        else:
            in_rounds = not faults.disagree_rounds or self.tx.round < faults.disagree_rounds
            disagrees = index < faults.disagree and in_rounds
        if disagrees or (rate and random.random() < rate):
            return Execution({"divergent": index, "output": execution.output}, execution.state)
        return execution

    async def _validate(self, index: int, validator: str, view: TxView, faults: Faults, leader_hash: str,
                        state: dict[str, Any] | None = None, appeal: bool = False) -> Vote:
        async with self.engine.validator_slots:
            try:
                execution = await asyncio.wait_for(self._run_validator(index, view, faults, state, appeal),
                                                   self.engine.consensus.validator_timeout)
                vote = "agree" if execution.receipt_hash == leader_hash else "disagree"
            except TimeoutError:
                vote = "timeout"
            except Exception as error:  # a crashing validator votes against
                log.warning("validator failed", tx=short_hash(self.tx.hash), validator=validator, error=repr(error))
                vote = "disagree"
        self.progress()
        return Vote(validator, vote, secrets.token_hex(16))

    # --- the machine ----------------------------------------------------------------------------
    async def run(self) -> None:
        tx, engine = self.tx, self.engine
        faults = Faults.parse(tx.input)
        view = TxView(tx.hash, tx.from_address, tx.to_address, strip_faults(tx.input))
        self.draw = engine.draw_for(tx)
        tx.leader = self.draw.leader(tx.rotation_count)
        if tx.rotation_count:  # taken back up in a round a rotation opened (its worker died in it)
            await self.emit_once("rotated", [self.event(cm.LEADER_ROTATED, tx.leader)])
        else:
            await self.emit_once("activated", [self.event(cm.ACTIVATED, tx.leader)])
        while True:
            decided = await self._round(view, faults)
            if decided is None:
                return  # the leader timed out
            outcome, reason, execution = decided
            if outcome != UNDETERMINED or tx.rotation_count >= engine.consensus.rotations:
                break
            await self._rotate(reason)
        if outcome == ACCEPTED:
            await self._transition(ACCEPTED, reason=reason, state_patch=diff_state(tx.accepted_state, execution.state),
                                   accepted_state=execution.state)
        else:
            await self._transition(outcome, reason=reason)
        await self._finish(outcome, execution.receipt_hash)

    async def _round(self, view: TxView, faults: Faults) -> tuple[str, str | None, Execution] | None:
        """One proposal and its votes: the outcome they decide (None: the leader timed out, and the
        transaction is decided LEADER_TIMEOUT)."""
        tx, engine = self.tx, self.engine
        leader = tx.leader
        assert leader is not None
        try:
            execution = await asyncio.wait_for(self._run_leader(view, faults), engine.consensus.leader_timeout)
        except TimeoutError:
            timeout_reason = f"leader {leader} did not answer within {engine.consensus.leader_timeout:g}s"
            await self._transition(LEADER_TIMEOUT, leader=leader, reason=timeout_reason, draw=self._draw_record())
            await self._finish(LEADER_TIMEOUT, None)
            return None
        self.progress()
        receipt = receipt_of(execution)
        await self._transition(PROPOSING, leader=leader, result=receipt, draw=self._draw_record())
        await self.emit_once("proposed", [self.event(cm.PROPOSED, leader, cm.word(receipt["receipt_hash"]))])

        assert self.draw is not None
        validators = self.draw.validators(tx.rotation_count)
        votes = await gather_votes(validators, [self._validate(i, v, view, faults, receipt["receipt_hash"])
                                                for i, v in enumerate(validators)])
        await self._transition(COMMITTING, votes=[v.committed() for v in votes])
        await self.emit_once("committed", [self.event(cm.COMMITTED, v.validator, cm.word(v.commit)) for v in votes])

        await self._transition(REVEALING, votes=[v.revealed() for v in votes])
        await self.emit_once("revealed", [self.event(cm.REVEALED, v.validator, cm.word(VOTE_CODES[v.vote]))
                                          for v in votes])
        outcome, reason = decide(votes)
        return outcome, reason, execution

    async def _rotate(self, reason: str | None) -> None:
        """No majority, rotations left: the next node that has not led this transaction proposes again,
        in a new round (its events are new events; the last round's stay on chain)."""
        tx = self.tx
        tx.round += 1
        tx.rotation_count += 1
        assert self.draw is not None
        tx.leader = self.draw.leader(tx.rotation_count)
        for column in ("proposed", "committed", "revealed", "rotated"):
            tx.events.pop(column, None)
        await self._transition(ACTIVATED, leader=tx.leader, new_round=True,
                               reason=f"leader rotated ({tx.rotation_count} of {self.engine.consensus.rotations}): "
                                      f"{reason}")
        await self.emit_once("rotated", [self.event(cm.LEADER_ROTATED, tx.leader)])
        metrics.CONSENSUS_ROTATIONS.inc()
        log.info("leader rotated", tx=short_hash(tx.hash), round=tx.round, leader=tx.leader)

    # --- appeals ----------------------------------------------------------------------------------
    async def appeal(self) -> None:
        """Settle the appeal this transaction was claimed for, in a new round (AppealStarted).

        Validator appeal (of ACCEPTED): more validators, new to this transaction, re-execute it against the
        state before it and vote on the leader's receipt; their votes are merged with the earlier ones. A
        majority still agreeing: the appeal failed (recorded; the window restarts, shorter). Otherwise it
        succeeded, and so does a leader appeal (of UNDETERMINED or a timeout) at once: the transaction and
        every newer one of its contract go back to PENDING (store.rollback) and run again, the appealed one
        with the next leader of the ring (the old one dropped)."""
        tx, engine = self.tx, self.engine
        kind = tx.appeal
        assert kind in cm.APPEAL_KINDS
        number = len(tx.appeals)
        tx.round += 1
        for column in ("committed", "revealed", "appealed"):
            tx.events.pop(column, None)
        started = await self.emit_once("appealed", [self.event(cm.APPEAL_STARTED, data=cm.word(cm.APPEAL_KINDS[kind]))])
        faults = Faults.parse(tx.input)
        if faults.appeal_error:
            raise RuntimeError("appeal_error: the test fault")
        metrics.CONSENSUS_APPEALS.labels(kind).inc()
        record: dict[str, Any] = {"kind": kind, "round": tx.round, "started_event_tx": started}
        if kind == "leader":  # its leader is dropped: the re-run's draw leaves it out
            record.update(validators=[], votes=[], outcome="succeeded", leader=tx.leader)
            # the appeal's round is the new proposal's: AppealStarted opens it, a new leader proposes in it
            await engine.store.rollback(tx, record, f"leader appeal (round {tx.round}): proposing again, new leader",
                                        rerun_round=tx.round)
            return
        record["seed"], validators = engine.appeal_draw(tx, number)
        view = TxView(tx.hash, tx.from_address, tx.to_address, strip_faults(tx.input))
        before = await engine.store.state_before(tx)
        leader_hash = (tx.result or {}).get("receipt_hash") or ""
        earlier = [Vote(o["validator"], o["vote"], o["salt"]) for o in tx.votes if "vote" in o]
        ballots = [self._validate(i, v, view, faults, leader_hash, state=before, appeal=True)
                   for i, v in enumerate(validators)]
        votes = await gather_votes(validators, ballots, prior=earlier)
        if votes:
            record["committed_event_tx"] = await self.emit_once(
                "committed", [self.event(cm.COMMITTED, v.validator, cm.word(v.commit)) for v in votes])
            record["revealed_event_tx"] = await self.emit_once(
                "revealed", [self.event(cm.REVEALED, v.validator, cm.word(VOTE_CODES[v.vote])) for v in votes])
        merged = earlier + votes
        outcome, reason = decide(merged)
        record.update(validators=validators, votes=[v.revealed() for v in votes], merged=reason or "majority agrees")
        if not validators:  # every validator of the table voted on it already: the decision stands
            record["merged"] = "no validator left to draw: every one has voted on this transaction"
        if outcome == ACCEPTED:
            record["outcome"] = "failed"
            await engine.store.appeal_failed(tx, record, [v.revealed() for v in merged])
            log.info("appeal failed: the decision stands", tx=short_hash(tx.hash), round=tx.round)
        else:
            record["outcome"] = "succeeded"
            # the appeal's round holds its votes: the re-run proposes in the next one
            await engine.store.rollback(tx, record, f"validator appeal succeeded (round {tx.round}): {reason}",
                                        rerun_round=tx.round + 1)
        self.progress()

    async def _finish(self, outcome: str, receipt_hash: str | None) -> None:
        tx = self.tx
        event = decided_event(tx, outcome, receipt_hash)
        event_tx = await self.emit_once("decided", [event])
        await self.engine.store.release_decided(tx, event_tx)
        self.progress()
        log.debug("transaction decided", tx=short_hash(tx.hash), outcome=outcome)


def decided_event(tx: Claimed, outcome: str, receipt_hash: str | None) -> cm.Event:
    if outcome == ACCEPTED:
        return cm.Event(cm.ACCEPTED, tx.hash, tx.to_address, tx.leader or cm.ZERO_ADDRESS,
                        cm.word(receipt_hash or 0), round=tx.round)
    return cm.Event(cm.UNDETERMINED, tx.hash, tx.to_address, tx.leader or cm.ZERO_ADDRESS,
                    cm.word(OUTCOME_CODES.get(outcome, OUTCOME_CODES[UNDETERMINED])), round=tx.round)
