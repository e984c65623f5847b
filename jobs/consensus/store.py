"""The consensus tables, through the worker's one pool (each call borrows a connection for database work
only; no chain call ever happens while one is held).

Every write that leaves work for a contract (a submission, an appeal asked for, a transaction given back,
recovered or rolled back, a chain reset) enqueues the job that will do it in the same transaction
(runner.jobs.consensus.work): no work without its job, whatever crashes when."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg

from runner.batching import GroupCommit
from runner.db import Database
from runner.errors import LeaseLost, UsageError
from runner.jobs.consensus import sql, work
from runner.jobs.consensus.model import Submission, apply_patch, canonical_json, short_hash
from runner.jobs.consensus.validators import Validator
from runner.logs import get_logger

if TYPE_CHECKING:
    from runner.app import App
    from runner.queue import NewJob

log = get_logger("runner.jobs.consensus.store")

FINALITY_LOCK_KEY = 0x72756E6E6572_0003  # "runner" + migration 0003
EVENT_KINDS = ("activated", "proposed", "committed", "revealed", "decided", "finalized")


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _list(value: Any) -> list[Any]:
    """A jsonb list column as a list (text without a codec, decoded with one, NULL)."""
    decoded = json.loads(value) if isinstance(value, str) else value
    return decoded if isinstance(decoded, list) else []


@dataclass(frozen=True)
class Holder:
    """The job attempt that takes transactions: its id and its lease epoch (the core's claim bumped it)."""

    job_id: int
    job_epoch: int


@dataclass
class Claimed:
    """A transaction a job holds, with the epoch of its take that every write must carry."""

    hash: str
    seq: int
    epoch: int
    status: str
    from_address: str
    to_address: str
    input: dict[str, Any]
    leader: str | None
    result: dict[str, Any] | None
    recovery_count: int
    round: int = 0  # the round its events carry: one more per leader rotation
    rotation_count: int = 0  # leaders rotated in this run (RUNNER_CONSENSUS_ROTATIONS caps it)
    events: dict[str, str | None] = field(default_factory=dict)  # kind -> chain tx hash already stored
    accepted_state: dict[str, Any] = field(default_factory=dict)
    # claimed to settle an appeal: its kind ('validator' or 'leader'), the votes so far, earlier appeals
    appeal: str | None = None
    votes: list[dict[str, Any]] = field(default_factory=list)
    appeals: list[dict[str, Any]] = field(default_factory=list)
    appeal_failed: int = 0  # failed appeals so far: each shortens its finality window
    more: bool = False  # taken as its contract's next unit, with another unit after it

    @classmethod
    def from_record(cls, row: asyncpg.Record) -> Claimed:
        keys = set(row.keys())  # an iterator: `in` would consume it
        return cls(
            hash=row["hash"], seq=row["seq"], epoch=row["lease_epoch"], status=row["status"],
            from_address=row["from_address"], to_address=row["to_address"], input=row["input"],
            leader=row["leader"], result=row["result"], recovery_count=row["recovery_count"],
            round=row["round"], rotation_count=row["rotation_count"],
            events={kind: row[f"{kind}_event_tx"] for kind in EVENT_KINDS},
            accepted_state=(row["accepted_state"] if "accepted_state" in keys else None) or {},
            appeal=row["appeal_requested"] if "appeal_requested" in keys else None,
            votes=_list(row["votes"] if "votes" in keys else None),
            appeals=_list(row["appeals"] if "appeals" in keys else None),
            appeal_failed=row["appeal_failed"],
            more=bool(row["more"]) if "more" in keys else False,
        )

    @property
    def claimed_before(self) -> bool:
        """Held by someone before: its events may already be on chain without their hash stored."""
        return self.epoch > 1


@dataclass(frozen=True)
class FinalizedBatch:
    hashes: list[str]
    epochs: list[int]
    rows: list[asyncpg.Record]


def _replayed(row: asyncpg.Record) -> tuple[dict[str, Any], str | None]:
    """STATE_BEFORE's finalized state with the patches replayed, and the transaction that produced it
    (None: no transaction did; the contract has no state yet)."""
    def decoded(value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    state = decoded(row["finalized"]) or {}
    produced_by = row["finalized_tx"]
    for tx_hash, patch in decoded(row["patches"]) or []:
        state = apply_patch(state, decoded(patch) or {})
        produced_by = tx_hash
    return state, produced_by


def _why_not_appealable(tx: str, state: dict[str, Any]) -> str:
    status = state["status"]
    if status in ("FINALIZED", "CANCELED"):
        return f"{tx} is {status}: only a decided transaction inside its appeal window can be appealed"
    if state["appeal_requested"] is not None:
        return f"{tx} has an appeal under way ({state['appeal_requested']})"
    if status not in ("ACCEPTED", "UNDETERMINED", "LEADER_TIMEOUT", "VALIDATORS_TIMEOUT"):
        return f"{tx} is {status}: not decided yet, nothing to appeal"
    if not state["decided_on_chain"]:
        return f"{tx} is {status} but its decision is not on chain yet; try again in a moment"
    return f"{tx}: its appeal window closed at {state['window_ends'].isoformat()}"


def in_seq_order(rows: Sequence[asyncpg.Record]) -> list[Claimed]:
    """An UPDATE's RETURNING has no order: the events of claimed rows are emitted in submission order."""
    return sorted((Claimed.from_record(r) for r in rows), key=lambda tx: tx.seq)


class ConsensusStore:
    def __init__(self, app: App) -> None:
        self.app = app
        self.db: Database = app.db
        self._transition_writer: GroupCommit[tuple[Any, ...], bool] | None = None
        self._release_writer: GroupCommit[tuple[str, int, str], bool] | None = None

    @property
    def finality_window(self) -> tuple[float, float]:
        """RUNNER_CONSENSUS_FINALITY_WINDOW and the factor each failed appeal shortens it by."""
        from runner.jobs.consensus.settings import consensus_settings

        settings = consensus_settings(self.app)
        return settings.finality_window, settings.appeal_window_factor

    async def _enqueue(self, jobs: Sequence[NewJob], connection: asyncpg.Connection) -> None:
        """Enqueue in the caller's transaction; a contract's jobs coalesce (into one, and into its waiting
        one), so each distinct job is sent once."""
        distinct = list({(job.kind, job.fifo_key, job.delay_s): job for job in jobs}.values())
        if distinct:
            await self.app.enqueue_jobs(distinct, connection=connection)

    def _finality_after(self, appeal_failed: int) -> float:
        window, shrink = self.finality_window
        return window * shrink ** appeal_failed

    # --- submit ---------------------------------------------------------------------------------
    async def insert(self, submissions: Sequence[Submission]) -> list[str]:
        async with self.db.transaction() as connection:
            await connection.execute(
                sql.INSERT_MANY,
                [s.hash for s in submissions], [s.from_address for s in submissions],
                [s.to_address for s in submissions], [canonical_json(s.input) for s in submissions],
            )
            await self._enqueue([work.contract_job(s.to_address) for s in submissions], connection)
        return [s.hash for s in submissions]

    # --- a contract job's work ------------------------------------------------------------------
    async def recover_leftovers(self, contract: str, max_recoveries: int) -> list[asyncpg.Record]:
        """The contract's transactions a dead holder left in the machine, recovered (see RECOVER_LEFTOVERS)."""
        return await self.db.fetch(sql.RECOVER_LEFTOVERS, contract, max_recoveries)

    async def take_owed_decided(self, contract: str, holder: Holder) -> list[Claimed]:
        return in_seq_order(await self.db.fetch(sql.TAKE_OWED_DECIDED, contract, holder.job_id, holder.job_epoch))

    async def take_next(self, contract: str, holder: Holder) -> Claimed | None:
        """The contract's next unit of work: an appeal asked for, else its oldest PENDING transaction."""
        row = await self.db.fetchrow(sql.TAKE_NEXT, contract, holder.job_id, holder.job_epoch)
        return None if row is None else Claimed.from_record(row)

    async def take_next_if_clear(self, contract: str, holder: Holder) -> tuple[bool, Claimed | None]:
        """(blocked, unit): the next unit as :meth:`take_next`, in the same round trip as the check that the
        contract has nothing left over in the machine and no decided event owed (blocked: it has, and
        nothing was taken)."""
        row = await self.db.fetchrow(sql.TAKE_NEXT_IF_CLEAR, contract, holder.job_id, holder.job_epoch)
        assert row is not None  # one row always: the check's
        return bool(row["blocked"]), None if row["hash"] is None else Claimed.from_record(row)

    async def transition(
        self, tx: Claimed, *, to: str, leader: str | None = None, result: Any = None, votes: Any = None,
        reason: str | None = None, state_patch: Any = None, accepted_state: dict[str, Any] | None = None,
        new_round: bool = False, draw: dict[str, Any] | None = None,
    ) -> None:
        """One fenced transition (group-committed with other tasks'); raises LeaseLost when the
        transaction is no longer ours. ``new_round``: a leader rotation, stored with ``tx.round`` and
        ``tx.rotation_count`` (already moved on); the last round's proposal and vote events are cleared."""
        ev = tx.events
        row = (tx.hash, tx.epoch, tx.status, to, leader, _json(result), _json(votes), reason, _json(state_patch),
               ev.get("activated"), ev.get("proposed"), ev.get("committed"), ev.get("revealed"),
               _json(accepted_state), tx.round if new_round else None, tx.rotation_count if new_round else None,
               _json(draw))
        if not await self._transitions().submit(row):
            raise LeaseLost(f"consensus transaction {short_hash(tx.hash)}: lease lost before {tx.status} -> {to}")
        tx.status = to

    async def release_decided(self, tx: Claimed, event_tx: str) -> None:
        if not await self._releases().submit((tx.hash, tx.epoch, event_tx)):
            raise LeaseLost(f"consensus transaction {short_hash(tx.hash)}: lease lost before release")

    def _transitions(self) -> GroupCommit[tuple[Any, ...], bool]:
        if self._transition_writer is None:
            self._transition_writer = GroupCommit(self._write_transitions, name="consensus-transitions")
        return self._transition_writer

    def _releases(self) -> GroupCommit[tuple[str, int, str], bool]:
        if self._release_writer is None:
            self._release_writer = GroupCommit(self._write_releases, name="consensus-releases")
        return self._release_writer

    async def _write_transitions(self, batch: Sequence[tuple[Any, ...]]) -> list[bool]:
        columns = [list(c) for c in zip(*batch, strict=True)]
        rows = await self.db.fetch(sql.TRANSITION, *columns)
        moved = {r["hash"] for r in rows}
        return [row[0] in moved for row in batch]

    async def _write_releases(self, batch: Sequence[tuple[str, int, str]]) -> list[bool]:
        """Release decided transactions, and enqueue the finality job for the end of each window."""
        hashes, epochs, events = (list(c) for c in zip(*batch, strict=True))
        async with self.db.transaction() as connection:
            rows = await connection.fetch(sql.RELEASE_DECIDED, hashes, epochs, events)
            windows = sorted({self._finality_after(r["appeal_failed"]) for r in rows})
            await self._enqueue([work.finality_job(after) for after in windows], connection)
        released = {r["hash"] for r in rows}
        return [h in released for h in hashes]

    async def close(self) -> None:
        for writer in (self._transition_writer, self._release_writer):
            if writer is not None:
                await writer.close()

    async def abandon(self, tx: Claimed, reason: str | None, *, again_after: float = 0.0) -> str | None:
        """Give ``tx`` back without counting a recovery, and enqueue the contract job that takes it up again
        ``again_after`` seconds from now (None when the take is no longer held: nothing is written)."""
        ev = tx.events
        async with self.db.transaction() as connection:
            status: str | None = await connection.fetchval(
                sql.ABANDON, tx.hash, tx.epoch, reason,
                ev.get("activated"), ev.get("proposed"), ev.get("committed"), ev.get("revealed"),
            )
            if status is not None:
                await self._enqueue([work.contract_job(tx.to_address, again_after)], connection)
        return status

    async def postpone(self, contract: str, after: float) -> None:
        """A new job for the contract's work, ``after`` seconds from now (this one ends without it)."""
        async with self.db.transaction() as connection:
            await self._enqueue([work.contract_job(contract, max(0.0, after))], connection)

    async def held(self, fences: Sequence[tuple[str, int]]) -> set[tuple[str, int]]:
        """Those of ``fences`` (hash, epoch) whose take is still held (the control lane, as the core's
        heartbeat: an emit's check never queues behind transitions)."""
        rows = await self.db.fetch(sql.STILL_HELD, [h for h, _ in fences], [e for _, e in fences], lane="control")
        return {(r["hash"], r["lease_epoch"]) for r in rows}

    async def recover_own(self, tx: Claimed, max_recoveries: int, why: str,
                          again_after: float = 0.0) -> asyncpg.Record | None:
        """Recover ``tx`` (stuck or failed in the machine; the cap applies) and enqueue the contract job that
        runs it again (or settles its decided event, when capped). None: not held any more."""
        async with self.db.transaction() as connection:
            row = await connection.fetchrow(sql.RECOVER_OWN, tx.hash, tx.epoch, why, max_recoveries)
            if row is not None:
                await self._enqueue([work.contract_job(tx.to_address, again_after)], connection)
        return row

    async def enqueue_orphaned(self) -> tuple[list[str], bool]:
        """Enqueue the jobs of work whose job is gone (see ORPHANED_WORK): (the contracts, finality)."""
        async with self.db.transaction() as connection:
            row = await connection.fetchrow(sql.ORPHANED_WORK, work.CONTRACT_KEY_PREFIX, work.FINALITY_KEY)
            assert row is not None
            contracts, finality = list(row["contracts"]), bool(row["finality"])
            jobs = [work.contract_job(address) for address in contracts] + ([work.finality_job()] if finality else [])
            await self._enqueue(jobs, connection)
        return contracts, finality

    # --- the finality job -----------------------------------------------------------------------
    async def take_owed_finalized(self, holder: Holder, limit: int = 100) -> list[Claimed]:
        """A prefix per contract of the owed TransactionFinalized events, in submission order (see
        TAKE_OWED_FINALIZED)."""
        async with self.db.transaction() as connection:
            await connection.execute(sql.FINALITY_WAIT_LOCK, FINALITY_LOCK_KEY)
            rows = await connection.fetch(sql.TAKE_OWED_FINALIZED, limit, holder.job_id, holder.job_epoch)
        return in_seq_order(rows)

    async def next_finality_due(self) -> float | None:
        """Seconds until the next decided transaction's window ends (None: no window is open)."""
        window_s, shrink = self.finality_window
        due = await self.db.fetchval(sql.NEXT_FINALITY_DUE, window_s, shrink)
        return None if due is None else float(due)

    async def enqueue_finality(self, after: float) -> None:
        async with self.db.transaction() as connection:
            await self._enqueue([work.finality_job(after)], connection)

    async def finalize_ready(self, holder: Holder, limit: int) -> FinalizedBatch:
        """Move the next finalizable prefix of each contract to FINALIZED and write the finalized states,
        in one database transaction (under the finality lock, which a rollback takes too)."""
        window_s, shrink = self.finality_window
        async with self.db.transaction() as connection:
            await connection.execute(sql.FINALITY_WAIT_LOCK, FINALITY_LOCK_KEY)
            rows = await connection.fetch(sql.FINALITY_READY, window_s, limit, shrink)
            if not rows:
                return FinalizedBatch([], [], [])
            addresses = sorted({r["to_address"] for r in rows})
            states = {r["address"]: r["state"] for r in await connection.fetch(sql.FINALIZED_STATES_FOR, addresses)}
            last_tx: dict[str, str] = {}
            for row in rows:  # ordered by seq: patches apply in submission order
                if row["status"] == "ACCEPTED":
                    address = row["to_address"]
                    states[address] = apply_patch(states.get(address) or {}, row["state_patch"])
                    last_tx[address] = row["hash"]
            moved = await connection.fetch(sql.FINALIZE, [r["hash"] for r in rows], holder.job_id, holder.job_epoch)
            if last_tx:
                changed = sorted(last_tx)
                await connection.execute(
                    sql.UPSERT_FINALIZED_STATES, changed, [json.dumps(states[a]) for a in changed],
                    [last_tx[a] for a in changed],
                )
        epochs = {r["hash"]: r["lease_epoch"] for r in moved}
        kept = [r for r in rows if r["hash"] in epochs]
        return FinalizedBatch([r["hash"] for r in kept], [epochs[r["hash"]] for r in kept], kept)

    async def release_finalized(self, hashes: Sequence[str], epochs: Sequence[int], event_tx: str | None) -> int:
        rows = await self.db.fetch(sql.RELEASE_FINALIZED, list(hashes), list(epochs), event_tx)
        return len(rows)

    # --- reads ----------------------------------------------------------------------------------
    async def counts(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in await self.db.fetch(sql.COUNTS)}

    async def has_work(self) -> bool:
        return bool(await self.db.fetchval(sql.HAS_WORK))

    async def get(self, tx_hash: str) -> dict[str, Any] | None:
        """By full hash, or by a unique prefix (raises UsageError when it matches several)."""
        if len(tx_hash) == 66:
            row = await self.db.fetchrow(sql.GET, tx_hash)
            return dict(row) if row is not None else None
        found = await self.db.fetch(sql.GET_BY_PREFIX, tx_hash)
        if len(found) > 1:
            raise UsageError(f"{tx_hash} matches several transactions; give more digits")
        return dict(found[0]) if found else None

    # --- appeals --------------------------------------------------------------------------------
    async def request_appeal(self, tx_hash: str, window_s: float, shrink: float) -> tuple[str, str]:
        """Ask for an appeal (full hash or unique prefix): (full hash, 'validator' or 'leader'). Raises
        UsageError with the reason when it cannot be appealed now."""
        row = await self.get(tx_hash)
        if row is None:
            raise UsageError(f"no consensus transaction with hash {short_hash(tx_hash)}")
        async with self.db.transaction() as connection:
            kind = await connection.fetchval(sql.REQUEST_APPEAL, row["hash"], window_s, shrink)
            if kind is not None:  # the contract job that settles it
                await self._enqueue([work.contract_job(row["to_address"])], connection)
        if kind is not None:
            log.info("appeal requested", tx=short_hash(row["hash"]), kind=kind)
            return str(row["hash"]), str(kind)
        state = await self.db.fetchrow(sql.APPEAL_STATE, row["hash"], window_s, shrink)
        assert state is not None
        raise UsageError(_why_not_appealable(short_hash(row["hash"]), dict(state)))

    async def state_before(self, tx: Claimed) -> dict[str, Any]:
        """The contract's state just before ``tx`` (what its validators execute against)."""
        row = await self.db.fetchrow(sql.STATE_BEFORE, tx.to_address, tx.seq)
        assert row is not None
        return _replayed(row)[0]

    async def appeal_failed(self, tx: Claimed, record: dict[str, Any], votes: list[dict[str, Any]]) -> None:
        # jsonb parameters as Python values: the pool's codec encodes them. Its window restarts, shorter: the
        # finality job for its end is enqueued with it.
        async with self.db.transaction() as connection:
            failed = await connection.fetchval(sql.APPEAL_FAILED, tx.hash, tx.epoch, [record], votes, tx.round)
            if failed is None:
                raise LeaseLost(f"consensus transaction {short_hash(tx.hash)}: lease lost before its appeal failed")
            await self._enqueue([work.finality_job(self._finality_after(failed))], connection)

    async def appeal_abandoned(self, tx: Claimed, why: str) -> None:
        """The appeal's settlement failed (an error, not a crash): the request ends, recorded with the
        reason; the decision and its window stand."""
        record = {"kind": tx.appeal, "round": tx.round, "outcome": "abandoned", "reason": why}
        async with self.db.transaction() as connection:  # its window may have passed meanwhile: finality looks
            if await connection.fetchval(sql.APPEAL_ABANDONED, tx.hash, tx.epoch, [record], tx.round) is not None:
                await self._enqueue([work.finality_job(0.0)], connection)
        log.warning("appeal abandoned", tx=short_hash(tx.hash), reason=why)

    async def rollback(self, tx: Claimed, record: dict[str, Any], reason: str, rerun_round: int) -> list[str]:
        """Return ``tx`` (to run again in ``rerun_round``) and every newer transaction of its contract that
        ran (each in its next round) to PENDING, and restore the contract's accepted state to what it was
        before ``tx``, in one database transaction (under the finality lock: finality neither moves those
        rows nor the state meanwhile). Their lease epochs are bumped: an in-flight owner's writes and
        emits are refused. The contract's job is enqueued with them (coalesced: it runs them one by one).
        Returns the hashes, in submission order."""
        async with self.db.transaction() as connection:
            await connection.execute(sql.FINALITY_WAIT_LOCK, FINALITY_LOCK_KEY)
            before = await connection.fetchrow(sql.STATE_BEFORE, tx.to_address, tx.seq)
            moved = await connection.fetch(sql.ROLLBACK, tx.hash, tx.epoch, rerun_round, [record], reason)
            if not moved:
                raise LeaseLost(f"consensus transaction {short_hash(tx.hash)}: lease lost before its rollback")
            await self._enqueue([work.contract_job(tx.to_address)], connection)
            assert before is not None
            state, produced_by = _replayed(before)
            if produced_by is None:
                await connection.execute(sql.DROP_ACCEPTED_STATE, tx.to_address)
            else:
                await connection.execute(sql.RESTORE_ACCEPTED_STATE, tx.to_address, state, produced_by)
        hashes = [r["hash"] for r in sorted(moved, key=lambda r: r["seq"])]
        log.warning("appeal succeeded: transactions rolled back", tx=short_hash(tx.hash), rolled_back=len(hashes))
        return hashes

    async def cancel(self, tx_hash: str, reason: str) -> str:
        """Cancel a PENDING transaction (by full hash or unique prefix); returns its full hash.

        Raises UsageError when there is no such transaction or it is past PENDING (it ran, or is running:
        its events may be on chain; an appeal, not a cancel, undoes a decided transaction)."""
        row = await self.get(tx_hash)
        if row is None:
            raise UsageError(f"no consensus transaction with hash {short_hash(tx_hash)}")
        if await self.db.fetchval(sql.CANCEL, row["hash"], reason) is not None:
            log.info("consensus transaction cancelled", tx=short_hash(row["hash"]), reason=reason)
            return str(row["hash"])
        now = await self.get(row["hash"])
        status = now["status"] if now else row["status"]
        raise UsageError(f"only a PENDING transaction can be cancelled; {short_hash(row['hash'])} is {status}")

    async def contract_state(self, address: str) -> dict[str, Any]:
        row = await self.db.fetchrow(sql.STATE_OF, address)
        assert row is not None
        return {"accepted": row["accepted"], "finalized": row["finalized"]}

    # --- the ConsensusMain deployment -----------------------------------------------------------
    # --- validators -----------------------------------------------------------------------------
    async def validators(self) -> list[Validator]:
        rows = await self.db.fetch(sql.VALIDATORS_ALL)
        return [Validator(r["address"], int(r["stake"]), r["key_ref"]) for r in rows]

    async def validator_rows(self) -> list[dict[str, Any]]:
        return [dict(r) for r in await self.db.fetch(sql.VALIDATORS_ALL)]

    async def put_validator(self, validator: Validator) -> bool:
        """Add a validator, or change its stake and key reference; True when it was new."""
        row = await self.db.fetchrow(sql.UPSERT_VALIDATOR, validator.address, validator.stake, validator.key_ref)
        return bool(row and row["added"])

    async def remove_validator(self, address: str) -> bool:
        return await self.db.fetchrow(sql.DELETE_VALIDATOR, address) is not None

    async def deployment(self, chain_id: int, contract: str) -> tuple[str, int] | None:
        row = await self.db.fetchrow(sql.DEPLOYMENT, chain_id, contract)
        return (row["address"], row["block_number"]) if row else None

    async def save_deployment(self, chain_id: int, contract: str, address: str, block: int,
                              replaces: str | None) -> bool:
        """Store a new deployment; False when another worker stored (or replaced) one first."""
        if replaces is None:
            stored = await self.db.fetchval(sql.INSERT_DEPLOYMENT, chain_id, contract, address, block)
            return stored is not None
        async with self.db.transaction() as connection:  # the new deployment and what the reset undid
            stored = await connection.fetchval(sql.REPLACE_DEPLOYMENT, chain_id, contract, address, block, replaces)
            if stored is None:
                return False
            rows = await connection.fetch(sql.CHAIN_RESET)
            reset = [r["status"] for r in rows]
            owing = [work.contract_job(r["to_address"]) for r in rows if r["status"] != "FINALIZED"]
            await self._enqueue(owing + ([work.finality_job(0.0)] if rows else []), connection)
        log.warning("chain reset: the events of the old ConsensusMain are not on this chain; re-emitting",
                    restarted=sum(s == "PENDING" for s in reset),
                    owed_decided=sum(s not in ("PENDING", "FINALIZED") for s in reset),
                    owed_finalized=sum(s == "FINALIZED" for s in reset))
        return True
