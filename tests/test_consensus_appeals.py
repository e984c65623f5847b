"""Appeals (issue 13) on the in-process chain and a real PostgreSQL: validator appeals that fail (the window
shortens) and succeed (rollback of the newer transactions of the contract), leader appeals, the fenced
rollback, and the CLI's refusals."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import asyncpg
import pytest
from eth_utils import to_checksum_address

from runner.errors import LeaseLost
from runner.jobs.consensus import appeal
from runner.jobs.consensus import contract as cm
from runner.jobs.consensus.contract import DecodedEvent
from runner.jobs.consensus.model import short_hash
from runner.jobs.consensus.settings import growth_terms
from runner.jobs.consensus.store import ConsensusStore, Holder
from tests.conftest import run_cli
from tests.consensus_helpers import (
    all_settled,
    check_finalized_order,
    consensus_app,
    contract_address,
    drain,
    engine_of,
    rows,
    running_job,
    running_worker,
    submit,
)
from tests.pg import wait_until

WINDOW = {"RUNNER_CONSENSUS_FINALITY_WINDOW": "3600"}  # nothing finalizes until a test backdates it
ALICE = to_checksum_address("0x00000000000000000000000000000000000a11ce")


async def row_of(conn: asyncpg.Connection, tx_hash: str) -> asyncpg.Record:
    found = {r["hash"]: r for r in await rows(conn)}
    return found[tx_hash]


async def appeals_done(conn: asyncpg.Connection, tx_hash: str, count: int) -> bool:
    row = await row_of(conn, tx_hash)
    return len(row["appeals"]) == count and await all_settled(conn, [tx_hash])


def event_key(event: DecodedEvent) -> tuple[Any, ...]:
    """What ConsensusMain emits once: the transition, the transaction, the validator for votes, the round."""
    actor = event.args[0] if event.name.startswith("Vote") else None
    return event.name, event.tx_id, actor, event.args[-1]


def counts_by_round(events: list[DecodedEvent], tx_hash: str) -> dict[str, Counter[int]]:
    by_name: dict[str, Counter[int]] = {}
    for event in events:
        if event.tx_id == tx_hash:
            by_name.setdefault(event.name, Counter())[event.args[-1]] += 1
    return by_name


async def backdate(conn: asyncpg.Connection, seconds: float) -> None:
    await conn.execute("UPDATE runner_consensus_transactions SET timestamp_awaiting_finalization = "
                       "timestamp_awaiting_finalization - make_interval(secs => $1) "
                       "WHERE timestamp_awaiting_finalization IS NOT NULL", seconds)
    # as if that time had passed for the finality jobs enqueued for the ends of those windows too
    await conn.execute("UPDATE runner_jobs SET run_at = run_at - make_interval(secs => $1) "
                       "WHERE kind = 'consensus.finality' AND status = 'pending'", seconds)


def test_appeal_growth_terms() -> None:
    assert growth_terms("n+2,n+1,2n") == [(1, 2), (1, 1), (2, 0)]
    assert growth_terms(" 7 , 3n ") == [(0, 7), (3, 0)]
    for bad in ("", "n2", "x", "n+", "2n3", "n,,n"):
        with pytest.raises(ValueError, match="appeal growth term"):
            growth_terms(bad)


async def test_a_validator_appeal_that_changes_nothing_fails_and_shortens_the_window(
    runner_env: dict[str, str], conn: asyncpg.Connection,
) -> None:
    """Two validator appeals of an ACCEPTED transaction: 7 then 6 new validators (n+2, n+1 for n=5) vote
    on the leader's receipt, agree, and the appeal fails; each failure restarts the window shorter (3600 s
    x 0.8^2 = 2304 s), so 2400 s after the last one it is closed (exit 2) and the transaction finalizes,
    where the full window would still hold it. Each appeal's events are new events of its own round."""
    cli = dict(WINDOW)
    async with consensus_app(**WINDOW) as app:
        tx = await submit(app, contract_address(20), {"op": "set", "key": "a", "value": 1})
        async with running_worker(app):
            await wait_until(lambda: all_settled(conn, [tx]), 60)
        first = await asyncio.to_thread(run_cli, runner_env, "appeal", tx[:12], **cli)  # a prefix will do
        assert first.returncode == 0 and first.stdout.strip() == f"{tx} validator appeal requested", first.stderr
        again = await asyncio.to_thread(run_cli, runner_env, "appeal", tx, **cli)
        assert again.returncode == 2 and again.stderr.strip().splitlines() == [
            f"error: {short_hash(tx)} has an appeal under way (validator)"]
        async with running_worker(app):
            await wait_until(lambda: appeals_done(conn, tx, 1), 60)
            assert await appeal(app, tx) == (tx, "validator")
            await wait_until(lambda: appeals_done(conn, tx, 2), 60)
        row = await row_of(conn, tx)
        assert (row["status"], row["appeal_failed"], row["round"]) == ("ACCEPTED", 2, 2)
        appeals = row["appeals"]
        assert [(a["kind"], a["round"], a["outcome"], len(a["validators"])) for a in appeals] == [
            ("validator", 1, "failed", 7), ("validator", 2, "failed", 6)]
        assert all(v["vote"] == "agree" for a in appeals for v in a["votes"])
        merged = [v["validator"] for v in row["votes"]]
        assert len(merged) == 5 + 7 + 6 and len(set(merged)) == len(merged)  # every appeal brings new nodes

        await backdate(conn, 2400)  # inside the full window, past the twice-shortened one
        closed = await asyncio.to_thread(run_cli, runner_env, "appeal", tx, **cli)
        assert closed.returncode == 2 and f"{short_hash(tx)}: its appeal window closed at" in closed.stderr
        assert len(closed.stderr.strip().splitlines()) == 1
        await drain(app, 60)
        late = await asyncio.to_thread(run_cli, runner_env, "appeal", tx, **cli)
        assert late.returncode == 2 and f"{short_hash(tx)} is FINALIZED" in late.stderr
        events = await engine_of(app).contract.logs()
    keys = [event_key(e) for e in events]
    assert len(keys) == len(set(keys))
    by_round = counts_by_round(events, tx)
    assert by_round["VoteCommitted"] == {0: 5, 1: 7, 2: 6} and by_round["VoteRevealed"] == {0: 5, 1: 7, 2: 6}
    assert by_round["AppealStarted"] == {1: 1, 2: 1} and by_round["TransactionAccepted"] == {0: 1}
    assert by_round["TransactionFinalized"] == {2: 1}
    assert {e.args[0] for e in events if e.name == "AppealStarted"} == {cm.APPEAL_KINDS["validator"]}
    shown = json.loads((await asyncio.to_thread(run_cli, runner_env, "tx", tx, "--json")).stdout)
    assert [(a["kind"], a["outcome"], len(a["votes"])) for a in shown["appeals"]] == [
        ("validator", "failed", 7), ("validator", "failed", 6)]


async def test_a_successful_validator_appeal_rolls_back_the_newer_transactions_of_its_contract(
    runner_env: dict[str, str], conn: asyncpg.Connection,
) -> None:
    """The appeal's 7 validators disagree with the leader: the appealed transaction and the 3 newer ones of
    its contract go back to PENDING in one statement and run again (the appealed one in round 2, after
    the appeal's round 1; the others in round 1), in submission order, to the same accepted state; the
    other contract's transaction is untouched. Every (event, transaction, validator, round) is on chain
    once, and all four finalize in submission order."""
    async with consensus_app(**WINDOW) as app:
        x, y = contract_address(21), contract_address(22)
        appealed = await submit(app, x, {"op": "set", "key": "a", "value": 1, "consensus": {"appeal_disagree": 7}})
        newer = [await submit(app, x, {"op": "mint", "amount": 100}),
                 await submit(app, x, {"op": "transfer", "to": ALICE, "amount": 30}),
                 await submit(app, x, {"op": "set", "key": "b", "value": 2})]
        other = await submit(app, y, {"op": "set", "key": "z", "value": 9})
        everything = [appealed, *newer, other]
        async with running_worker(app):
            await wait_until(lambda: all_settled(conn, everything), 60)
        before = {r["hash"]: r for r in await rows(conn)}
        state_before = (await engine_of(app).store.contract_state(x))["accepted"]
        assert await appeal(app, appealed) == (appealed, "validator")
        async with running_worker(app):
            await wait_until(lambda: all_settled(conn, [appealed], min_round=2), 60)
            await wait_until(lambda: all_settled(conn, newer, min_round=1), 60)
        after = {r["hash"]: r for r in await rows(conn)}
        assert (await engine_of(app).store.contract_state(x))["accepted"] == state_before
        record = after[appealed]["appeals"][0]
        assert (record["kind"], record["round"], record["outcome"]) == ("validator", 1, "succeeded")
        assert "no majority" in record["merged"] and after[appealed]["round"] == 2
        assert after[appealed]["reason"].startswith("validator appeal succeeded (round 1)")
        for tx_hash in newer:
            assert after[tx_hash]["round"] == 1 and after[tx_hash]["status"] == "ACCEPTED"
            assert after[tx_hash]["reason"].startswith("rolled back: an appeal of an older transaction")
            assert after[tx_hash]["lease_epoch"] > before[tx_hash]["lease_epoch"]
            assert after[tx_hash]["activated_event_tx"] != before[tx_hash]["activated_event_tx"]
        assert after[other]["round"] == 0 and after[other]["lease_epoch"] == before[other]["lease_epoch"]
        assert after[appealed]["leader"] != before[appealed]["leader"]  # round 2's ring position

        await backdate(conn, 3601)
        await drain(app, 60)
        events = await engine_of(app).contract.logs()
        txs = await rows(conn)
    assert {t["status"] for t in txs} == {"FINALIZED"}
    keys = [event_key(e) for e in events]
    assert len(keys) == len(set(keys))
    check_finalized_order(txs, events)
    mine = counts_by_round(events, appealed)
    assert mine["TransactionActivated"] == {0: 1, 2: 1} and mine["AppealStarted"] == {1: 1}
    assert mine["VoteCommitted"] == {0: 5, 1: 7, 2: 5} and mine["TransactionAccepted"] == {0: 1, 2: 1}
    assert mine["TransactionFinalized"] == {2: 1}
    for tx_hash in newer:
        theirs = counts_by_round(events, tx_hash)
        assert theirs["TransactionActivated"] == {0: 1, 1: 1} and theirs["TransactionAccepted"] == {0: 1, 1: 1}
        assert theirs["TransactionFinalized"] == {1: 1} and "AppealStarted" not in theirs
    assert counts_by_round(events, other)["TransactionActivated"] == {0: 1}


async def contract_jobs(conn: asyncpg.Connection, contract: str) -> int:
    """The contract's waiting jobs."""
    return int(await conn.fetchval("SELECT count(*) FROM runner_jobs WHERE fifo_key = $1 AND status = 'pending'",
                                   f"consensus:{contract}"))


async def test_a_rollback_restores_the_state_before_and_fences_the_old_owners(
    runner_env: dict[str, str], conn: asyncpg.Connection,
) -> None:
    """Store level: appealing b of a, b, c (c in flight at another job: a frozen worker's, say) rolls b and c
    back to PENDING in one transaction, puts the accepted state back to a's, enqueues a contract job for
    each, and bumps the epochs: the other job's next transition and its event emit are refused, and so is
    a second rollback under the old take."""
    async with consensus_app(**WINDOW) as app:
        engine = engine_of(app)
        x = contract_address(23)
        a = await submit(app, x, {"op": "set", "key": "a", "value": 1})
        b = await submit(app, x, {"op": "set", "key": "b", "value": 2})
        async with running_worker(app):
            await wait_until(lambda: all_settled(conn, [a, b]), 60)
        c = await submit(app, x, {"op": "set", "key": "c", "value": 3})
        elsewhere = ConsensusStore(app)
        in_flight = await elsewhere.take_next(x, Holder(await running_job(conn), 1))
        assert in_flight is not None
        assert in_flight.hash == c and in_flight.accepted_state["storage"] == {"a": 1, "b": 2}
        a_before = await row_of(conn, a)

        await engine.store.request_appeal(b, 3600, 0.8)
        held = await engine.store.take_next(x, Holder(await running_job(conn), 1))
        assert held is not None and held.hash == b and held.appeal == "validator"
        record = {"kind": "validator", "round": held.round + 1, "outcome": "succeeded"}
        assert await engine.store.rollback(held, record, "test rollback", rerun_round=held.round + 2) == [b, c]
        assert await contract_jobs(conn, x) == 1  # c's, which the rollback's join

        state = await engine.store.contract_state(x)
        assert state["accepted"]["storage"] == {"a": 1}
        assert await conn.fetchval("SELECT tx_hash FROM runner_consensus_accepted_states WHERE address = $1", x) == a
        by_hash = {r["hash"]: r for r in await rows(conn)}
        assert dict(by_hash[a]) == dict(a_before)  # the older one is not touched
        for tx_hash, epoch, round_ in ((b, held.epoch, 2), (c, in_flight.epoch, 1)):
            row = by_hash[tx_hash]
            assert (row["status"], row["round"], row["job_id"]) == ("PENDING", round_, None)
            assert row["lease_epoch"] == epoch + 1 and row["activated_event_tx"] is None and row["votes"] is None
        assert by_hash[b]["appeals"] == [record] and by_hash[b]["appeal_requested"] is None

        with pytest.raises(LeaseLost):
            await elsewhere.transition(in_flight, to="PROPOSING", leader=engine.nodes[0], result={"ok": True})
        proposal = cm.Event(cm.PROPOSED, c, x, engine.nodes[0], cm.word(1), round=0)
        other_emitter = type(engine.emitter)(engine.contract, receipt_timeout_s=30, fence_check=elsewhere.held)
        try:
            with pytest.raises(LeaseLost):
                await other_emitter.emit([proposal], [(c, in_flight.epoch)])
        finally:
            await other_emitter.close()
        with pytest.raises(LeaseLost):
            await engine.store.rollback(held, record, "again", rerun_round=held.round + 2)
        await elsewhere.close()
        assert c not in {e.tx_id for e in await engine.contract.logs()}
        assert (await row_of(conn, c))["status"] == "PENDING"


async def test_a_leader_appeal_proposes_again_with_a_new_leader(
    runner_env: dict[str, str], conn: asyncpg.Connection,
) -> None:
    """UNDETERMINED (no majority, no rotations left): a leader appeal opens round 1 (AppealStarted, kind 2)
    with the next leader of the ring, which reaches a majority; the newer transaction of the contract
    runs again after it."""
    env = dict(WINDOW, RUNNER_CONSENSUS_ROTATIONS="0")
    async with consensus_app(**env) as app:
        x = contract_address(24)
        tx = await submit(app, x, {"op": "set", "key": "a", "value": 1,
                                   "consensus": {"disagree": 3, "disagree_rounds": 1}})
        later = await submit(app, x, {"op": "set", "key": "b", "value": 2})
        async with running_worker(app):
            await wait_until(lambda: all_settled(conn, [tx, later]), 60)
        before = await row_of(conn, tx)
        assert before["status"] == "UNDETERMINED"
        done = await asyncio.to_thread(run_cli, runner_env, "appeal", tx, **env)
        assert done.returncode == 0 and done.stdout.strip() == f"{tx} leader appeal requested", done.stderr
        async with running_worker(app):
            await wait_until(lambda: all_settled(conn, [tx, later], min_round=1), 60)
        after = await row_of(conn, tx)
        assert (after["status"], after["round"]) == ("ACCEPTED", 1)
        assert [(a["kind"], a["round"], a["outcome"]) for a in after["appeals"]] == [("leader", 1, "succeeded")]
        assert after["leader"] != before["leader"]
        assert (await engine_of(app).store.contract_state(x))["accepted"]["storage"] == {"a": 1, "b": 2}
        events = await engine_of(app).contract.logs()
    keys = [event_key(e) for e in events]
    assert len(keys) == len(set(keys))
    mine = counts_by_round(events, tx)
    assert mine["AppealStarted"] == {1: 1} and mine["TransactionUndetermined"] == {0: 1}
    assert mine["TransactionAccepted"] == {1: 1} and mine["ReceiptProposed"] == {0: 1, 1: 1}
    leaders = {to_checksum_address(e.args[0]) for e in events if e.tx_id == tx and e.name == "ReceiptProposed"}
    assert len(leaders) == 2
    assert [e.args[0] for e in events if e.name == "AppealStarted"] == [cm.APPEAL_KINDS["leader"]]


async def test_appeals_that_cannot_be_made_are_one_line_and_exit_2(
    runner_env: dict[str, str], conn: asyncpg.Connection,
) -> None:
    async with consensus_app(**WINDOW) as app:
        x = contract_address(25)
        pending = await submit(app, x, {"op": "set", "key": "a", "value": 1})
        cancelled = await submit(app, x, {"op": "set", "key": "b", "value": 2})
        await engine_of(app).store.cancel(cancelled, "test")
    cases = {
        pending: f"{short_hash(pending)} is PENDING: not decided yet, nothing to appeal",
        cancelled: f"{short_hash(cancelled)} is CANCELED: only a decided transaction inside its appeal window",
        "0x" + "ab" * 32: "no consensus transaction with hash",
        "0xnothex": "transaction hash",
    }
    for tx_hash, message in cases.items():
        result = await asyncio.to_thread(run_cli, runner_env, "appeal", tx_hash, **WINDOW)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], (tx_hash, result.stderr)
    bad = await asyncio.to_thread(run_cli, runner_env, "appeal", pending, RUNNER_CONSENSUS_APPEAL_GROWTH="n+x")
    assert bad.returncode == 2 and "RUNNER_CONSENSUS_APPEAL_GROWTH" in bad.stderr, bad.stderr
    assert {r["status"] for r in await rows(conn)} == {"PENDING", "CANCELED"}
    assert all(r["appeal_requested"] is None for r in await rows(conn))


async def test_an_appeal_that_raises_is_abandoned_alone_and_the_decision_stands(
    runner_env: dict[str, str], conn: asyncpg.Connection,
) -> None:
    """A poisoned appeal (its settlement raises) ends once, recorded as abandoned with the reason; it is
    not claimed again and again, the transaction stays ACCEPTED and still finalizes, and the appeal of
    another contract's transaction beside it is settled."""
    async with consensus_app(**WINDOW) as app:
        poisoned = await submit(app, contract_address(26), {"op": "set", "key": "a", "value": 1,
                                                            "consensus": {"appeal_error": True}})
        healthy = await submit(app, contract_address(27), {"op": "set", "key": "b", "value": 2})
        async with running_worker(app):
            await wait_until(lambda: all_settled(conn, [poisoned, healthy]), 60)
            for tx_hash in (poisoned, healthy):
                await appeal(app, tx_hash)
            await wait_until(lambda: appeals_done(conn, poisoned, 1), 60)
            await wait_until(lambda: appeals_done(conn, healthy, 1), 60)
        row = await row_of(conn, poisoned)
        [record] = row["appeals"]
        assert (record["outcome"], record["round"]) == ("abandoned", 1)
        assert record["reason"] == "RuntimeError: appeal_error: the test fault"
        assert (row["status"], row["round"], row["appeal_failed"]) == ("ACCEPTED", 1, 0)
        assert (await row_of(conn, healthy))["appeals"][0]["outcome"] == "failed"
        await backdate(conn, 3601)
        await drain(app, 60)
        events = await engine_of(app).contract.logs()
    assert {r["status"] for r in await rows(conn)} == {"FINALIZED"}
    assert Counter(e.tx_id for e in events if e.name == "AppealStarted") == {poisoned: 1, healthy: 1}
