"""The consensus tables, through the worker's one pool (each call borrows a connection for database work
only; no chain call ever happens while one is held)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from runner.batching import GroupCommit
from runner.db import Database
from runner.errors import LeaseLost, UsageError
from runner.jobs.consensus import sql
from runner.jobs.consensus.model import Submission, apply_patch, canonical_json, short_hash
from runner.jobs.consensus.validators import Validator
from runner.logs import get_logger

log = get_logger("runner.jobs.consensus.store")

FINALITY_LOCK_KEY = 0x72756E6E6572_0003  # "runner" + migration 0003
EVENT_KINDS = ("activated", "proposed", "committed", "revealed", "decided", "finalized")


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _list(value: Any) -> list[Any]:
    """A jsonb list column as a list (text without a codec, decoded with one, NULL)."""
    decoded = json.loads(value) if isinstance(value, str) else value
    return decoded if isinstance(decoded, list) else []


@dataclass
class Claimed:
    """A transaction this worker holds, with the lease epoch every write must carry."""

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
    def __init__(self, db: Database, owner: str, lease_s: float) -> None:
        self.db = db
        self.owner = owner
        self.lease_s = lease_s
        self._transition_writer: GroupCommit[tuple[Any, ...], bool] | None = None
        self._release_writer: GroupCommit[tuple[str, int, str], bool] | None = None

    # --- submit ---------------------------------------------------------------------------------
    async def insert(self, submissions: Sequence[Submission]) -> list[str]:
        async with self.db.connection() as connection:
            await connection.execute(
                sql.INSERT_MANY,
                [s.hash for s in submissions], [s.from_address for s in submissions],
                [s.to_address for s in submissions], [canonical_json(s.input) for s in submissions],
            )
        return [s.hash for s in submissions]

    # --- the pending loop -----------------------------------------------------------------------
    async def claim(self, limit: int) -> list[Claimed]:
        rows = await self.db.fetch(sql.CLAIM, limit, self.owner, self.lease_s)
        return in_seq_order(rows)

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
        rows = await self.db.fetch(sql.TRANSITION, *columns, self.lease_s, self.owner)
        moved = {r["hash"] for r in rows}
        return [row[0] in moved for row in batch]

    async def _write_releases(self, batch: Sequence[tuple[str, int, str]]) -> list[bool]:
        hashes, epochs, events = (list(c) for c in zip(*batch, strict=True))
        rows = await self.db.fetch(sql.RELEASE_DECIDED, hashes, epochs, events, self.owner)
        released = {r["hash"] for r in rows}
        return [h in released for h in hashes]

    async def close(self) -> None:
        for writer in (self._transition_writer, self._release_writer):
            if writer is not None:
                await writer.close()

    async def abandon(self, tx: Claimed, reason: str | None) -> str | None:
        ev = tx.events
        return await self.db.fetchval(  # type: ignore[no-any-return]
            sql.ABANDON, tx.hash, tx.epoch, reason, self.owner,
            ev.get("activated"), ev.get("proposed"), ev.get("committed"), ev.get("revealed"),
        )

    # --- the recovery loop ----------------------------------------------------------------------
    async def renew(self, held: Sequence[tuple[str, int]]) -> set[str]:
        if not held:
            return set()
        # The control lane, as the core's heartbeat: a renewal never queues behind the transitions of the
        # transactions it keeps alive (with a small pool under CPU load they took the leases of live tasks)
        rows = await self.db.fetch(sql.RENEW, [h for h, _ in held], [e for _, e in held], self.lease_s, self.owner,
                                   lane="control")
        return {r["hash"] for r in rows}

    async def held(self, fences: Sequence[tuple[str, int]]) -> set[tuple[str, int]]:
        """Those of ``fences`` (hash, epoch) whose lease this worker still holds (the control lane, as
        renewals: an emit's check never queues behind transitions)."""
        rows = await self.db.fetch(sql.HELD, [h for h, _ in fences], [e for _, e in fences], self.owner,
                                   lane="control")
        return {(r["hash"], r["lease_epoch"]) for r in rows}

    async def recover_expired(self, max_recoveries: int, limit: int = 500) -> list[asyncpg.Record]:
        return await self.db.fetch(sql.RECOVER_EXPIRED, max_recoveries, limit, lane="control")

    async def recover_own(self, held: Sequence[tuple[str, int]], max_recoveries: int, why: str) -> list[asyncpg.Record]:
        if not held:
            return []
        return await self.db.fetch(sql.RECOVER_OWN, max_recoveries, [h for h, _ in held], [e for _, e in held],
                                   self.owner, why)

    async def claim_owed_decided(self, limit: int = 100) -> list[Claimed]:
        rows = await self.db.fetch(sql.CLAIM_OWED_DECIDED, limit, self.owner, self.lease_s)
        return in_seq_order(rows)

    async def claim_owed_finalized(self, limit: int = 100) -> list[Claimed]:
        """A prefix per contract of the owed TransactionFinalized events, in submission order; none while
        another worker finalizes (its claim and ours must not interleave: see CLAIM_OWED_FINALIZED)."""
        async with self.db.transaction() as connection:
            if not await connection.fetchval(sql.FINALITY_LOCK, FINALITY_LOCK_KEY):
                return []
            rows = await connection.fetch(sql.CLAIM_OWED_FINALIZED, limit, self.owner, self.lease_s)
        return in_seq_order(rows)

    # --- the finality loop ----------------------------------------------------------------------
    async def finalize_ready(self, window_s: float, limit: int, shrink: float = 1.0) -> FinalizedBatch | None:
        """Move the next finalizable prefix of each contract to FINALIZED and write the finalized states,
        in one database transaction (None when another worker is finalizing right now)."""
        async with self.db.transaction() as connection:
            if not await connection.fetchval(sql.FINALITY_LOCK, FINALITY_LOCK_KEY):
                return None
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
            moved = await connection.fetch(sql.FINALIZE, [r["hash"] for r in rows], self.owner, self.lease_s)
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
        rows = await self.db.fetch(sql.RELEASE_FINALIZED, list(hashes), list(epochs), event_tx, self.owner)
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
        kind = await self.db.fetchval(sql.REQUEST_APPEAL, row["hash"], window_s, shrink)
        if kind is not None:
            log.info("appeal requested", tx=short_hash(row["hash"]), kind=kind)
            return str(row["hash"]), str(kind)
        state = await self.db.fetchrow(sql.APPEAL_STATE, row["hash"], window_s, shrink)
        assert state is not None
        raise UsageError(_why_not_appealable(short_hash(row["hash"]), dict(state)))

    async def claim_appeals(self, limit: int) -> list[Claimed]:
        return in_seq_order(await self.db.fetch(sql.CLAIM_APPEALS, limit, self.owner, self.lease_s))

    async def state_before(self, tx: Claimed) -> dict[str, Any]:
        """The contract's state just before ``tx`` (what its validators execute against)."""
        row = await self.db.fetchrow(sql.STATE_BEFORE, tx.to_address, tx.seq)
        assert row is not None
        return _replayed(row)[0]

    async def appeal_failed(self, tx: Claimed, record: dict[str, Any], votes: list[dict[str, Any]]) -> None:
        # jsonb parameters as Python values: the pool's codec encodes them
        moved = await self.db.fetchval(sql.APPEAL_FAILED, tx.hash, tx.epoch, self.owner, [record], votes, tx.round)
        if moved is None:
            raise LeaseLost(f"consensus transaction {short_hash(tx.hash)}: lease lost before its appeal failed")

    async def appeal_abandoned(self, tx: Claimed, why: str) -> None:
        """The appeal's settlement failed (an error, not a crash): the request ends, recorded with the
        reason; the decision and its window stand."""
        record = {"kind": tx.appeal, "round": tx.round, "outcome": "abandoned", "reason": why}
        await self.db.fetchval(sql.APPEAL_ABANDONED, tx.hash, tx.epoch, self.owner, [record], tx.round)
        log.warning("appeal abandoned", tx=short_hash(tx.hash), reason=why)

    async def rollback(self, tx: Claimed, record: dict[str, Any], reason: str, rerun_round: int) -> list[str]:
        """Return ``tx`` (to run again in ``rerun_round``) and every newer transaction of its contract that
        ran (each in its next round) to PENDING, and restore the contract's accepted state to what it was
        before ``tx``, in one database transaction (under the finality lock: finality neither moves those
        rows nor the state meanwhile). Their lease epochs are bumped: an in-flight owner's writes and
        emits are refused. Returns the hashes, in submission order."""
        async with self.db.transaction() as connection:
            await connection.execute(sql.FINALITY_WAIT_LOCK, FINALITY_LOCK_KEY)
            before = await connection.fetchrow(sql.STATE_BEFORE, tx.to_address, tx.seq)
            moved = await connection.fetch(sql.ROLLBACK, tx.hash, tx.epoch, self.owner, rerun_round,
                                           [record], reason)
            if not moved:
                raise LeaseLost(f"consensus transaction {short_hash(tx.hash)}: lease lost before its rollback")
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
            reset = [r["status"] for r in await connection.fetch(sql.CHAIN_RESET)]
        log.warning("chain reset: the events of the old ConsensusMain are not on this chain; re-emitting",
                    restarted=sum(s == "PENDING" for s in reset),
                    owed_decided=sum(s not in ("PENDING", "FINALIZED") for s in reset),
                    owed_finalized=sum(s == "FINALIZED" for s in reset))
        return True
