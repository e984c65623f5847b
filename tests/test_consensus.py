"""The consensus loops on the in-process chain (eth-tester) and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import asyncpg
import pytest
from eth_utils import to_checksum_address

from runner import chain
from runner.app import App
from runner.config import load_settings
from runner.errors import UsageError
from runner.jobs.consensus import contract as cm
from runner.jobs.consensus.executor import KeyValueExecutor, TxView
from runner.jobs.consensus.machine import Vote, decide
from runner.jobs.consensus.model import (
    DEV_KEY_IN_PROCESS,
    DEV_KEY_NODE,
    address_of_key,
    apply_patch,
    default_sender,
    diff_state,
    parse_address,
    parse_input,
    parse_tx_hash,
    short_hash,
)
from runner.worker import Worker
from tests.conftest import run_cli
from tests.consensus_helpers import (
    SENDER,
    check_events,
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

ALICE = to_checksum_address("0x00000000000000000000000000000000000a11ce")
BOB = to_checksum_address("0x0000000000000000000000000000000000000b0b")


# --- the executor, patches and the vote ------------------------------------------------------------
async def test_key_value_executor_is_deterministic() -> None:
    kv = KeyValueExecutor()
    contract = contract_address(1)

    async def run(state: dict, data: dict, sender: str = ALICE) -> tuple[dict, dict]:
        kv.validate(data)
        execution = await kv.execute(TxView("0x" + "00" * 32, sender, contract, data), state)
        return execution.output, execution.state

    out, state = await run({}, {"op": "set", "key": "a", "value": {"x": [1, 2]}})
    assert out == {"ok": True} and state["storage"] == {"a": {"x": [1, 2]}}
    out, state = await run(state, {"op": "delete", "key": "a"})
    assert out == {"ok": True, "existed": True} and state["storage"] == {}
    out, state = await run(state, {"op": "transfer", "to": BOB, "amount": 5})
    assert out == {"ok": False, "error": "insufficient balance: 0 < 5"} and state["balances"] == {}
    out, state = await run(state, {"op": "mint", "amount": 10})
    out, state = await run(state, {"op": "transfer", "to": BOB.lower(), "amount": 4})
    assert out == {"ok": True} and state["balances"] == {ALICE: 6, BOB: 4}
    first = await kv.execute(TxView("0x" + "00" * 32, ALICE, contract, {"op": "set", "key": "k", "value": 1}), {})
    second = await kv.execute(TxView("0x" + "00" * 32, ALICE, contract, {"op": "set", "key": "k", "value": 1}), {})
    assert first.receipt_hash == second.receipt_hash

    for bad in ({"op": "nope"}, {"op": "set", "key": "a"}, {"op": "set", "key": "", "value": 1},
                {"op": "delete", "key": "a", "value": 1}, {"op": "transfer", "to": "0x12", "amount": 1},
                {"op": "transfer", "to": BOB, "amount": -1}, {"op": "mint", "amount": True},
                {"op": "set", "key": "a", "value": 1, "consensus": {"disagree": -1}},
                {"op": "set", "key": "a", "value": 1, "consensus": {"explode": 1}}):
        with pytest.raises(UsageError):
            kv.validate(bad)


def test_state_patches_replay_to_the_same_state() -> None:
    old = {"storage": {"a": 1, "b": {"c": 2, "d": 3}, "gone": None}, "balances": {ALICE: 5}}
    new = {"storage": {"a": 1, "b": {"c": 4}, "e": None}, "balances": {ALICE: 5.0, BOB: 1}}
    assert apply_patch(old, diff_state(old, new)) == new
    assert apply_patch({}, diff_state({}, new)) == new
    assert diff_state(new, new) == {"set": [], "del": []}


def test_majority_decides() -> None:
    def votes(*kinds: str) -> list[Vote]:
        return [Vote(f"v{i}", kind, "s") for i, kind in enumerate(kinds)]

    assert decide(votes("agree", "agree", "agree", "disagree", "disagree"))[0] == "ACCEPTED"
    assert decide(votes("agree", "agree", "disagree", "disagree", "disagree"))[0] == "UNDETERMINED"
    assert decide(votes("agree", "agree", "timeout", "disagree", "disagree"))[0] == "VALIDATORS_TIMEOUT"
    assert decide(votes("timeout", "timeout", "timeout", "timeout", "timeout"))[0] == "VALIDATORS_TIMEOUT"
    assert decide(votes("agree", "timeout", "disagree", "disagree", "disagree"))[0] == "UNDETERMINED"


# --- the loops, end to end on the in-process chain -------------------------------------------------
async def test_contracts_finalize_in_submission_order_with_every_event(
    runner_env: dict[str, str], conn: asyncpg.Connection,
) -> None:
    async with consensus_app(RUNNER_CONSENSUS_FINALITY_WINDOW="0.2", RUNNER_CONSENSUS_CONCURRENCY="3") as app:
        plan = []
        for c in range(3):
            to = contract_address(c)
            plan += [(to, {"op": "mint", "amount": 100}), (to, {"op": "set", "key": "a", "value": c}),
                     (to, {"op": "transfer", "to": BOB, "amount": 30}), (to, {"op": "delete", "key": "a"}),
                     (to, {"op": "set", "key": "b", "value": [c, "x"]})]
        for to, data in plan:
            await submit(app, to, data)
        await drain(app)
        txs = await rows(conn)
        assert [t["status"] for t in txs] == ["FINALIZED"] * 15
        assert {t["outcome"] for t in txs} == {"ACCEPTED"}
        assert all(t["job_id"] is None and t["recovery_count"] == 0 for t in txs)
        check_events(txs, await engine_of(app).contract.logs())
        for c in range(3):
            to = contract_address(c)
            ordered = [t for t in txs if t["to_address"] == to]
            assert [t["seq"] for t in ordered] == sorted(t["seq"] for t in ordered)
            finalized_at = [t["finalized_at"] for t in ordered]
            assert finalized_at == sorted(finalized_at)
            expected = {"storage": {"b": [c, "x"]}, "balances": {SENDER: 70, BOB: 30}}
            states = await engine_of(app).store.contract_state(to)
            assert states == {"accepted": expected, "finalized": expected}


async def test_disagreement_and_timeouts_end_in_their_states(
    runner_env: dict[str, str], conn: asyncpg.Connection,
) -> None:
    async with consensus_app(RUNNER_CONSENSUS_FINALITY_WINDOW="0", RUNNER_CONSENSUS_LEADER_TIMEOUT="0.3",
                             RUNNER_CONSENSUS_VALIDATOR_TIMEOUT="0.3", RUNNER_CONSENSUS_ROTATIONS="0") as app:
        to = contract_address(7)
        cases = [
            ({"op": "set", "key": "a", "value": 1}, "ACCEPTED"),
            ({"op": "set", "key": "a", "value": 2, "consensus": {"disagree": 3}}, "UNDETERMINED"),
            ({"op": "set", "key": "a", "value": 3, "consensus": {"disagree": 2}}, "ACCEPTED"),
            ({"op": "set", "key": "a", "value": 4, "consensus": {"leader_delay": 2}}, "LEADER_TIMEOUT"),
            ({"op": "set", "key": "a", "value": 5, "consensus": {"validator_timeouts": 3}}, "VALIDATORS_TIMEOUT"),
            ({"op": "set", "key": "a", "value": 6, "consensus": {"validator_timeouts": 1, "disagree": 5}},
             "UNDETERMINED"),
        ]
        for data, _ in cases:
            await submit(app, to, data)
        await drain(app)
        txs = await rows(conn)
        assert [t["status"] for t in txs] == ["FINALIZED"] * len(cases)
        assert [t["outcome"] for t in txs] == [outcome for _, outcome in cases]
        assert "no majority: 2 agree, 3 disagree" in txs[1]["reason"]
        assert "did not answer within 0.3s" in txs[3]["reason"]
        assert txs[3]["votes"] is None and txs[3]["proposed_event_tx"] is None
        assert "validators timed out: 2 agree, 0 disagree, 3 timed out of 5" in txs[4]["reason"]
        assert [v["vote"] for v in txs[4]["votes"]].count("timeout") == 3
        # only accepted transactions changed the state
        states = await engine_of(app).store.contract_state(to)
        assert states["accepted"]["storage"] == {"a": 3} == states["finalized"]["storage"]
        events = await engine_of(app).contract.logs()
        check_events(txs, events)
        codes = {e.tx_id: e.args[0] for e in events if e.name == "TransactionUndetermined"}
        assert [codes.get(t["hash"]) for t in txs] == [None, 1, None, 2, 3, 1]


async def test_disagree_rate_makes_every_transaction_undetermined(
    runner_env: dict[str, str], conn: asyncpg.Connection,
) -> None:
    async with consensus_app(RUNNER_CONSENSUS_FINALITY_WINDOW="0", RUNNER_CONSENSUS_DISAGREE_RATE="1",
                             RUNNER_CONSENSUS_ROTATIONS="0") as app:
        for i in range(4):
            await submit(app, contract_address(i), {"op": "set", "key": "k", "value": i})
        await drain(app)
        txs = await rows(conn)
        assert [(t["status"], t["outcome"]) for t in txs] == [("FINALIZED", "UNDETERMINED")] * 4
        assert all([v["vote"] for v in t["votes"]] == ["disagree"] * 5 for t in txs)


async def test_a_stuck_task_is_cancelled_recovered_and_capped(
    runner_env: dict[str, str], conn: asyncpg.Connection,
) -> None:
    """The seed's 8-day COMMITTING: a task that makes no progress must not keep its lease alive."""
    async with consensus_app(RUNNER_CONSENSUS_FINALITY_WINDOW="0", RUNNER_CONSENSUS_TX_STUCK_AFTER="0.6",
                             RUNNER_MAX_RECOVERIES="2",
                             RUNNER_CONSENSUS_LEADER_TIMEOUT="3600") as app:
        stuck = await submit(app, contract_address(1), {"op": "set", "key": "a", "value": 1,
                                                        "consensus": {"leader_delay": 3600}})
        after = await submit(app, contract_address(1), {"op": "set", "key": "a", "value": 2})
        other = await submit(app, contract_address(2), {"op": "set", "key": "a", "value": 3})
        await drain(app, timeout_s=60)
        txs = {t["hash"]: t for t in await rows(conn)}
        assert txs[stuck]["status"] == "FINALIZED" and txs[stuck]["outcome"] == "UNDETERMINED"
        assert txs[stuck]["recovery_count"] == 2
        assert "recovery cap reached: no progress for 0.6s" in txs[stuck]["reason"]
        assert "RUNNER_MAX_RECOVERIES=2" in txs[stuck]["reason"]
        assert txs[after]["outcome"] == "ACCEPTED" and txs[other]["outcome"] == "ACCEPTED"
        # claimed three times, yet one TransactionActivated: the re-runs found it in the logs
        events = await engine_of(app).contract.logs()
        assert [e.name for e in events if e.tx_id == stuck] == [
            "TransactionActivated", "TransactionUndetermined", "TransactionFinalized"]


async def test_expired_leases_elsewhere_are_recovered_without_duplicate_events(
    runner_env: dict[str, str], conn: asyncpg.Connection,
) -> None:
    async with consensus_app(RUNNER_CONSENSUS_FINALITY_WINDOW="0", RUNNER_MAX_RECOVERIES="3") as app:
        engine = engine_of(app)
        crashed = await submit(app, contract_address(1), {"op": "set", "key": "a", "value": 1})
        capped = await submit(app, contract_address(2), {"op": "set", "key": "a", "value": 2})
        # A dead holder (a job no longer running) held both; it had emitted `crashed`'s TransactionActivated
        # without storing the hash. `capped` was recovered twice before: this recovery is its third, the cap.
        await conn.execute(
            "UPDATE runner_consensus_transactions SET status = 'COMMITTING', job_id = -1, job_epoch = 1, "
            "lease_epoch = 1, recovery_count = CASE WHEN hash = $2 THEN 2 ELSE 0 END WHERE hash IN ($1, $2)",
            crashed, capped)
        await engine.emitter.emit([cm.Event(cm.ACTIVATED, crashed, contract_address(1), engine.nodes[0])])
        await drain(app)
        txs = {t["hash"]: t for t in await rows(conn)}
        assert (txs[crashed]["status"], txs[crashed]["outcome"], txs[crashed]["recovery_count"]) == \
            ("FINALIZED", "ACCEPTED", 1)
        assert (txs[capped]["status"], txs[capped]["outcome"], txs[capped]["recovery_count"]) == \
            ("FINALIZED", "UNDETERMINED", 3)
        assert "recovery cap reached: its holder (job -1) ended or lost its lease in COMMITTING, recovery 3 " \
            "(RUNNER_MAX_RECOVERIES=3)" \
            in txs[capped]["reason"]
        events = await engine.contract.logs()
        assert [e.name for e in events if e.tx_id == crashed].count("TransactionActivated") == 1
        assert [e.name for e in events if e.tx_id == capped] == ["TransactionUndetermined", "TransactionFinalized"]


async def test_a_codeless_stored_address_means_deploy_again(runner_env: dict[str, str],
                                                             conn: asyncpg.Connection) -> None:
    async with consensus_app() as app:
        first = engine_of(app).contract
    before = await conn.fetchrow("SELECT address, deployed_at FROM runner_consensus_deployments")
    assert before["address"] == first.address
    async with consensus_app() as app:  # a new process: a new in-process chain without that contract
        second = engine_of(app).contract
        assert await second.chain.code_at(second.address)
    after = await conn.fetchrow("SELECT address, deployed_at FROM runner_consensus_deployments")
    assert after["deployed_at"] > before["deployed_at"]
    assert await conn.fetchval("SELECT count(*) FROM runner_consensus_deployments") == 1


async def test_a_contract_gone_from_the_node_is_detected_and_deployed_again(
    runner_env: dict[str, str], conn: asyncpg.Connection,
) -> None:
    """A batch sent to an address without ConsensusMain is mined without its events (a node reset to a
    fresh chain looks like this): the worker notices, deploys again, and finishes with every event."""
    async with consensus_app(RUNNER_CONSENSUS_FINALITY_WINDOW="0") as app:
        engine = engine_of(app)
        real = engine.contract
        gone = cm.ConsensusMain(engine.chain, contract_address(404), real.deploy_block)
        engine.contract = engine.emitter.contract = gone
        await submit(app, contract_address(1), {"op": "set", "key": "a", "value": 1})
        await drain(app)
        assert engine.contract == real and engine.emitter.contract == real
        txs = await rows(conn)
        assert [(t["status"], t["outcome"]) for t in txs] == [("FINALIZED", "ACCEPTED")]
        assert "released after a chain error: ConsensusMain at" in txs[0]["reason"]
        check_events(txs, await real.logs())


# --- the command line ------------------------------------------------------------------------------
def test_submission_checks() -> None:
    to = contract_address(1)
    assert parse_address(to.lower(), "--to") == to
    for bad, message in ((to.lower()[:-1] + "g", "is not an address"), ("0x1234", "'0x1234' is not an address"),
                         (to[:-1] + ("a" if to[-1] != "a" else "b"), "checksum if mixed case"), ("alice", "alice")):
        with pytest.raises(UsageError, match=message):
            parse_address(bad, "--from")
    for text, message in (("{bad json", "not valid JSON"), ("[1, 2]", "must be a JSON object, got list"),
                          ('"x"' * 30_000, "the input is 90,000 bytes; at most 65,536"),
                          ('{"a":' * 5000 + "1" + "}" * 5000, "nest"),
                          ('{"op": "set", "key": "a\\u0000", "value": 1}', "NUL character")):
        with pytest.raises(UsageError, match=message):
            parse_input(text)
    with pytest.raises(UsageError, match="is not a transaction hash"):
        parse_tx_hash("0x1234")
    assert default_sender(load_settings(database_url="postgresql://u@h/d")) == SENDER
    assert address_of_key(DEV_KEY_NODE) == "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
    assert (DEV_KEY_NODE, DEV_KEY_IN_PROCESS) == (chain.DEV_KEY_NODE, chain.DEV_KEY_IN_PROCESS)


def test_submit_rejects_bad_input_and_inserts_nothing(runner_env: dict[str, str]) -> None:
    to = contract_address(1)
    cases = [
        (["--to", "0x1234", "--input", '{"op":"set","key":"a","value":1}'], "--to: '0x1234' is not an address"),
        (["--to", to, "--input", "{bad json"], "--input: not valid JSON"),
        (["--to", to, "--input", '{"op":"set","key":"a"}'], "'set' needs value"),
        # nested 5,000 deep (a RecursionError traceback once), a NUL (a failed insert, exit 1, once)
        (["--to", to, "--input", '{"a":' * 5000 + "1" + "}" * 5000], "--input: the input"),
        (["--to", to, "--input", '{"op":"set","key":"a","value":"x\\u0000y"}'], "--input: the input contains a NUL"),
    ]
    for args, message in cases:
        result = run_cli(runner_env, "submit", *args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, lines)
        assert result.stdout == ""
    status = json.loads(run_cli(runner_env, "status", "--json").stdout)
    assert status["consensus"] == {"transactions": {}, "total": 0}
    result = run_cli(runner_env, "tx", "0x" + "ab" * 32)
    assert result.returncode == 2 and "no consensus transaction with hash" in result.stderr


def test_submit_then_worker_drain_finalizes_on_the_in_process_chain(runner_env: dict[str, str]) -> None:
    """The done-when check: `runner submit` needs no chain; `runner worker --drain` deploys and finalizes."""
    to = contract_address(3)
    hashes = []
    for i in range(3):
        result = run_cli(runner_env, "submit", "--to", to.lower(), "--input", json.dumps(
            {"op": "set", "key": f"k{i}", "value": i}))
        assert result.returncode == 0, result.stderr
        hashes.append(result.stdout.strip())
    pending = json.loads(run_cli(runner_env, "tx", hashes[0], "--json").stdout)
    assert pending["status"] == "PENDING" and pending["to_address"] == to

    result = run_cli(runner_env, "worker", "--drain", RUNNER_CONSENSUS_FINALITY_WINDOW="0.2",
                     RUNNER_CONSENSUS_ENABLED="true")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ConsensusMain deployed" in result.stderr
    for tx_hash in hashes:
        shown = json.loads(run_cli(runner_env, "tx", tx_hash, "--json").stdout)
        assert shown["status"] == "FINALIZED" and shown["outcome"] == "ACCEPTED"
        assert all(str(h).startswith("0x") and len(h) == 66 for h in shown["events"].values()), shown["events"]
        assert [v["vote"] for v in shown["votes"]] == ["agree"] * 5
    text = run_cli(runner_env, "tx", hashes[0]).stdout
    assert "status          FINALIZED (outcome ACCEPTED)" in text and "event finalized 0x" in text
    status = json.loads(run_cli(runner_env, "status", "--json").stdout)
    assert status["consensus"] == {"transactions": {"FINALIZED": 3}, "total": 3}


def test_batch_calldata_matches_eth_abi() -> None:
    import os
    import random

    for n in (0, 1, 7, 300):
        events = [cm.Event(random.randrange(7), "0x" + os.urandom(32).hex(), "0x" + os.urandom(20).hex(),
                           "0x" + os.urandom(20).hex(), os.urandom(32)) for _ in range(n)]
        assert cm.encode_batch(events) == cm.encode_batch_abi(events)


async def test_a_finalized_predecessor_whose_event_is_not_on_chain_holds_its_successors(
        app: App, conn: asyncpg.Connection) -> None:
    """TransactionFinalized reaches the chain in submission order: while the first transaction's event is
    in flight elsewhere (or owed after a chain error), the second is not finalizable."""
    from runner.jobs.consensus.model import new_submission
    from runner.jobs.consensus.store import ConsensusStore, Holder

    store, holder = ConsensusStore(app), Holder(-1, 1)
    to = contract_address(1)
    first, second = await store.insert([new_submission(SENDER, to, {"op": "set", "key": "a", "value": v})
                                        for v in (1, 2)])
    await conn.execute(
        "UPDATE runner_consensus_transactions SET status = CASE WHEN hash = $1 THEN 'FINALIZED' ELSE 'ACCEPTED' END, "
        "outcome = 'ACCEPTED', decided_event_tx = '0x01', state_patch = '{\"set\": [], \"del\": []}'::jsonb, "
        "timestamp_awaiting_finalization = now() - interval '1 hour', job_id = NULL "
        "WHERE hash IN ($1, $2)", first, second)
    held = await store.finalize_ready(holder, 100)
    assert held.hashes == []
    await conn.execute("UPDATE runner_consensus_transactions SET finalized_event_tx = '0x02' WHERE hash = $1", first)
    ready = await store.finalize_ready(holder, 100)
    assert ready.hashes == [second]


async def test_owed_finalized_events_are_taken_in_submission_order_and_never_from_a_live_holder(
        app: App, conn: asyncpg.Connection) -> None:
    """After a chain reset every FINALIZED transaction owes its TransactionFinalized: a finality job takes a
    prefix per contract in submission order (whatever order the UPDATE returns its rows in); another must
    not split a contract's owed events with it (their batches would race to the chain), and what a dead
    job held is taken again."""
    from runner.jobs.consensus.model import new_submission
    from runner.jobs.consensus.store import ConsensusStore, Holder

    store = ConsensusStore(app)
    plan = [new_submission(SENDER, contract_address(c), {"op": "set", "key": "a", "value": v})
            for v in range(6) for c in (1, 2)]
    hashes = await store.insert(plan)
    await conn.execute("UPDATE runner_consensus_transactions SET status = 'FINALIZED', outcome = 'ACCEPTED', "
                       "finalized_event_tx = NULL, job_id = NULL WHERE hash = ANY($1)", hashes)
    live = Holder(await running_job(conn), 1)
    taken = await store.take_owed_finalized(live, limit=5)
    assert [tx.seq for tx in taken] == sorted(tx.seq for tx in taken)
    assert [tx.hash for tx in taken] == hashes[:5]
    other = Holder(await running_job(conn), 1)  # the rest follow what the live holder has in flight
    assert await store.take_owed_finalized(other, limit=100) == []
    await conn.execute("UPDATE runner_jobs SET status = 'pending', lease_owner = NULL WHERE id = $1", live.job_id)
    third = Holder(await running_job(conn), 1)  # the first holder's job was rescued: its rows are owed again
    assert [tx.hash for tx in await store.take_owed_finalized(third, limit=100)] == hashes
    assert await store.release_finalized([t.hash for t in taken], [t.epoch for t in taken], "0x01") == 0


async def test_a_cancelled_pending_transaction_never_runs_and_its_contract_moves_on(
    runner_env: dict[str, str], conn: asyncpg.Connection,
) -> None:
    """`runner tx cancel HASH`: only a PENDING transaction, one line and exit 2 otherwise; the contract's
    next transaction runs after the one before it, and nothing of the cancelled one reaches a state or
    the chain."""
    async with consensus_app(RUNNER_CONSENSUS_FINALITY_WINDOW="0.2") as app:
        to = contract_address(1)
        first = await submit(app, to, {"op": "set", "key": "a", "value": 1})
        second = await submit(app, to, {"op": "set", "key": "b", "value": 2})
        third = await submit(app, to, {"op": "set", "key": "c", "value": 3})
        done = run_cli(runner_env, "tx", "cancel", second[:12])  # a unique prefix will do
        assert done.returncode == 0 and done.stdout.strip() == f"{second} CANCELED", done.stderr
        again = run_cli(runner_env, "tx", "cancel", second)
        assert again.returncode == 2 and again.stderr.strip().splitlines() == [
            f"error: only a PENDING transaction can be cancelled; {short_hash(second)} is CANCELED"]
        missing = run_cli(runner_env, "tx", "cancel", "0x" + "ab" * 32)
        assert missing.returncode == 2 and "no consensus transaction" in missing.stderr
        usage = run_cli(runner_env, "tx", "stop", second)
        assert usage.returncode == 2 and "give one transaction hash" in usage.stderr
        await drain(app)
        late = run_cli(runner_env, "tx", "cancel", first)
        assert late.returncode == 2 and f"{short_hash(first)} is FINALIZED" in late.stderr
        events = await engine_of(app).contract.logs()
        state = await engine_of(app).store.contract_state(to)
    txs = await rows(conn)
    assert [t["status"] for t in txs] == ["FINALIZED", "CANCELED", "FINALIZED"]
    assert txs[1]["reason"] == "cancelled by `runner tx cancel`" and txs[1]["recovery_count"] == 0
    assert state["finalized"]["storage"] == {"a": 1, "c": 3}
    assert second not in {e.tx_id for e in events}
    check_events([t for t in txs if t["hash"] != second], events)
    shown = json.loads(run_cli(runner_env, "tx", third, "--json").stdout)
    assert shown["status"] == "FINALIZED"


async def test_no_majority_rotates_the_leader_to_success_or_past_the_budget(
    runner_env: dict[str, str], conn: asyncpg.Connection,
) -> None:
    """A round without a majority hands the proposal to the next node that has not led the transaction
    (LeaderRotated, a new round: its proposal and votes are new events carrying the round); within the
    RUNNER_CONSENSUS_ROTATIONS budget a round with a majority accepts, past it the transaction is
    UNDETERMINED. Each (transaction, event, round) is on chain once (per validator for votes)."""
    async with consensus_app(RUNNER_CONSENSUS_FINALITY_WINDOW="0", RUNNER_CONSENSUS_ROTATIONS="2") as app:
        to = contract_address(8)
        rotated = await submit(app, to, {"op": "set", "key": "a", "value": 1,
                                         "consensus": {"disagree": 3, "disagree_rounds": 2}})
        exhausted = await submit(app, to, {"op": "set", "key": "b", "value": 2, "consensus": {"disagree": 3}})
        plain = await submit(app, to, {"op": "set", "key": "c", "value": 3})
        await drain(app)
        events = await engine_of(app).contract.logs()
        state = await engine_of(app).store.contract_state(to)
    txs = {t["hash"]: t for t in await rows(conn)}
    assert [txs[h]["outcome"] for h in (rotated, exhausted, plain)] == ["ACCEPTED", "UNDETERMINED", "ACCEPTED"]
    rounds = [(txs[h]["round"], txs[h]["rotation_count"]) for h in (rotated, exhausted, plain)]
    assert rounds == [(2, 2), (2, 2), (0, 0)]
    assert "no majority: 2 agree, 3 disagree" in txs[exhausted]["reason"]
    assert state["finalized"]["storage"] == {"a": 1, "c": 3}
    seen = [(e.tx_id, e.name, e.args[0] if e.name.startswith("Vote") else None, e.args[-1]) for e in events]
    assert len(seen) == len(set(seen))  # every (transaction, event, validator for votes, round) once
    for tx_hash in (rotated, exhausted):
        mine = [e for e in events if e.tx_id == tx_hash]
        names = Counter(e.name for e in mine)
        assert names == {"TransactionActivated": 1, "LeaderRotated": 2, "ReceiptProposed": 3, "VoteCommitted": 15,
                         "VoteRevealed": 15, "TransactionFinalized": 1,
                         "TransactionAccepted" if tx_hash == rotated else "TransactionUndetermined": 1}, names
        leaders = [to_checksum_address(e.args[0]) for e in mine if e.name == "ReceiptProposed"]
        assert len(set(leaders)) == 3  # never the same leader twice
        assert [e.args[-1] for e in mine if e.name == "LeaderRotated"] == [1, 2]
        decided = next(e for e in mine if e.name in ("TransactionAccepted", "TransactionUndetermined"))
        assert decided.args[-1] == 2 and txs[tx_hash]["leader"] == leaders[-1]
        assert txs[tx_hash]["proposed_event_tx"] == next(e.chain_tx for e in mine if e.name == "ReceiptProposed"
                                                          and e.args[-1] == 2)  # the last round's
    plain_events = [e for e in events if e.tx_id == plain]
    assert {e.args[-1] for e in plain_events} == {0} and "LeaderRotated" not in {e.name for e in plain_events}


def test_more_rotations_than_validators_is_refused(runner_env: dict[str, str]) -> None:
    result = run_cli(runner_env, "worker", "--drain", RUNNER_CONSENSUS_ENABLED="true", RUNNER_CONSENSUS_VALIDATORS="3",
                     RUNNER_CONSENSUS_ROTATIONS="4")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "rotations (4) cannot exceed validators (3)" in lines[0], lines


async def test_a_consensus_main_of_another_version_is_deployed_again(
    runner_env: dict[str, str], conn: asyncpg.Connection,
) -> None:
    """A stored deployment whose VERSION is not this code's (an older ConsensusMain, here a contract that
    answers 42 to every call) is replaced, as after a reset: its events are not the ones this code emits."""
    from runner.jobs.consensus.contract import VERSION, ensure_deployed, selector

    async with consensus_app() as app:
        engine = engine_of(app)
        chain = engine.contract.chain
        answers_42 = bytes.fromhex("600a600c600039600a6000f3" "602a60005260206000f3")
        other, block = await chain.deploy(answers_42, 100_000, 30)
        await conn.execute("UPDATE runner_consensus_deployments SET address = $1, block_number = $2", other, block)
        replaced = await ensure_deployed(chain, engine.store, 30)
        assert replaced.address != other
        assert int.from_bytes(await chain.call(replaced.address, selector("VERSION")), "big") == VERSION
        assert await conn.fetchval("SELECT address FROM runner_consensus_deployments") == replaced.address


async def test_early_quorum_cancels_the_validators_still_running(
    runner_env: dict[str, str], conn: asyncpg.Connection,
) -> None:
    """Two validators that would take the whole 600 s validator timeout: once three votes agree (or three
    disagree) the outcome is certain, the two are cancelled and recorded as "cancelled" (their commit and
    reveal are still on chain, vote code 4), and the transaction is decided at once. Without early quorum
    the drain would wait out the timeout."""
    from runner.jobs.consensus import metrics as consensus_metrics

    cancelled_before = consensus_metrics.CONSENSUS_VALIDATORS_CANCELLED._value.get()
    async with consensus_app(RUNNER_CONSENSUS_FINALITY_WINDOW="0", RUNNER_CONSENSUS_VALIDATOR_TIMEOUT="600",
                             RUNNER_CONSENSUS_ROTATIONS="0") as app:
        to = contract_address(9)
        agreed = await submit(app, to, {"op": "set", "key": "a", "value": 1, "consensus": {"validator_timeouts": 2}})
        refused = await submit(app, to, {"op": "set", "key": "b", "value": 2,
                                         "consensus": {"validator_timeouts": 2, "disagree": 5}})
        await drain(app, 60)
        events = await engine_of(app).contract.logs()
    txs = {t["hash"]: t for t in await rows(conn)}
    assert (txs[agreed]["outcome"], txs[refused]["outcome"]) == ("ACCEPTED", "UNDETERMINED")
    for tx_hash in (agreed, refused):
        assert [v["vote"] for v in txs[tx_hash]["votes"]][:2] == ["cancelled", "cancelled"]
    assert "0 agree, 3 disagree, 0 timed out, 2 cancelled of 5" in txs[refused]["reason"]
    check_events(list(txs.values()), events)
    revealed = Counter(e.args[1] for e in events if e.name == "VoteRevealed")
    assert revealed[cm.word(4)] == 4  # the vote code of "cancelled", two per transaction
    assert consensus_metrics.CONSENSUS_VALIDATORS_CANCELLED._value.get() - cancelled_before == 4


async def test_consensus_jobs_run_whatever_runner_queues_says_and_only_where_the_loops_are_on(
    app: App, runner_env: dict[str, str], conn: asyncpg.Connection,
) -> None:
    """The consensus loops are jobs of the core (`consensus.contract`, one at a time per contract, and
    `consensus.finality`): a submission enqueues its contract's job with it (one waiting per contract,
    however many transactions: they coalesce); a worker without the loops
    never claims them, and one with the loops claims them from the `consensus` queue even when its
    RUNNER_QUEUES names other queues only. Each job ends succeeded, and nothing is left unfinished."""
    from runner.jobs.consensus.model import new_submission
    from runner.jobs.consensus.store import ConsensusStore

    to = contract_address(7)
    hashes = await ConsensusStore(app).insert(
        [new_submission(SENDER, to, {"op": "set", "key": "a", "value": v}) for v in range(3)])
    jobs = await conn.fetch("SELECT kind, queue, fifo_key, status FROM runner_jobs ORDER BY id")
    assert [tuple(j) for j in jobs] == [("consensus.contract", "consensus", f"consensus:{to}", "pending")]
    await asyncio.wait_for(Worker(app, drain=True, install_signal_handlers=False).run(), 60)  # loops off
    assert await conn.fetchval("SELECT count(*) FROM runner_jobs WHERE status = 'pending'") == 1
    async with consensus_app(RUNNER_CONSENSUS_FINALITY_WINDOW="0", RUNNER_QUEUES="mail") as on:
        worker = Worker(on, drain=True, install_signal_handlers=False)
        assert worker.queues == ["mail", "consensus"]
        await asyncio.wait_for(worker.run(), 120)
    txs = await rows(conn)
    assert [t["status"] for t in txs] == ["FINALIZED"] * 3 and [t["hash"] for t in txs] == hashes
    ended = await conn.fetch("SELECT kind, status, count(*) AS n FROM runner_jobs GROUP BY kind, status ORDER BY kind")
    assert {(r["kind"], r["status"]) for r in ended} == {("consensus.contract", "succeeded"),
                                                          ("consensus.finality", "succeeded")}


async def test_a_contract_job_cancelled_mid_transaction_gives_it_back_to_a_new_job(
    runner_env: dict[str, str], conn: asyncpg.Connection,
) -> None:
    """An operator's `runner cancel` of a running `consensus.contract` job: the job ends cancelled, its
    transaction goes back to PENDING without a recovery counted, with a new job of its contract enqueued in
    the same write, and that job takes it to FINALIZED (its activation on chain once)."""
    async with consensus_app(RUNNER_CONSENSUS_FINALITY_WINDOW="0", RUNNER_CONSENSUS_VALIDATOR_TIMEOUT="60") as app:
        to = contract_address(8)
        # the activation's chain tx is stored with the move to PROPOSING: the validators' delay is when the
        # cancel lands (a leader's delay would be over by then)
        tx = await submit(app, to, {"op": "set", "key": "a", "value": 1, "consensus": {"validator_delay": 5}})
        job_id = await conn.fetchval("SELECT id FROM runner_jobs WHERE kind = 'consensus.contract'")

        async def taken() -> bool:
            return bool(await conn.fetchval(
                "SELECT count(*) FROM runner_consensus_transactions WHERE hash = $1 AND job_id = $2 "
                "AND activated_event_tx IS NOT NULL", tx, job_id))

        async with running_worker(app):
            await wait_until(taken, 30)
            assert await app.cancel(job_id) == "running"
            await wait_until(lambda: finalized(conn, [tx]), 60)
        jobs = await conn.fetch("SELECT id, status FROM runner_jobs WHERE fifo_key = $1 ORDER BY id", f"consensus:{to}")
        assert (jobs[0]["id"], jobs[0]["status"]) == (job_id, "cancelled")
        assert [j["status"] for j in jobs][1:] == ["succeeded"]
        [row] = await rows(conn)
        assert (row["status"], row["recovery_count"]) == ("FINALIZED", 0)
        events = await engine_of(app).contract.logs()
        assert [e.name for e in events if e.tx_id == tx].count("TransactionActivated") == 1


async def test_work_whose_job_was_cancelled_or_failed_gets_a_job_again(
    runner_env: dict[str, str], conn: asyncpg.Connection,
) -> None:
    """The orphan sweep: a contract whose waiting job an operator cancelled, and one whose job the core
    failed (as past its recovery cap), get a job again when a worker starts; everything finalizes."""
    async with consensus_app(RUNNER_CONSENSUS_FINALITY_WINDOW="0") as app:
        a, b = contract_address(11), contract_address(12)
        txs = [await submit(app, a, {"op": "set", "key": "k", "value": 1}),
               await submit(app, a, {"op": "set", "key": "k", "value": 2}),
               await submit(app, b, {"op": "set", "key": "k", "value": 3})]
        job_a = await conn.fetchval("SELECT id FROM runner_jobs WHERE fifo_key = $1", f"consensus:{a}")
        assert await app.cancel(job_a) == "cancelled"
        job_b = await conn.fetchval("UPDATE runner_jobs SET status = 'failed', finished_at = now() "
                                    "WHERE fifo_key = $1 RETURNING id", f"consensus:{b}")
        await drain(app, timeout_s=60)
        assert await finalized(conn, txs)
        jobs = await conn.fetch("SELECT fifo_key, status FROM runner_jobs WHERE id <> ALL($1::bigint[]) ORDER BY id",
                                [job_a, job_b])
        assert sorted({j["fifo_key"] for j in jobs} - {"consensus:finality"}) == sorted(
            [f"consensus:{a}", f"consensus:{b}"])
        assert {j["status"] for j in jobs} == {"succeeded"}


async def finalized(conn: asyncpg.Connection, hashes: list[str]) -> bool:
    return bool(await conn.fetchval("SELECT count(*) = cardinality($1::text[]) FROM runner_consensus_transactions "
                                    "WHERE hash = ANY($1) AND status = 'FINALIZED' AND finalized_event_tx IS NOT NULL",
                                    hashes))


async def test_migration_0015_gives_queued_consensus_work_its_jobs(pg_server) -> None:  # type: ignore[no-untyped-def]
    """Upgrading a database with consensus work under way (revisions 0013 and 0014): each contract with an
    unfinished transaction gets its contract job, and decided transactions a finality job;
    the transactions' own lease columns give way to job_id and job_epoch."""
    from alembic import command

    from runner.migrate import alembic_config
    from runner.plugins import load_plugins

    name = await pg_server.create_empty_database()
    url = pg_server.url(name)
    try:
        config = alembic_config(url, load_plugins())
        await asyncio.to_thread(command.upgrade, config, "0014")
        await asyncio.to_thread(command.upgrade, config, "0013")
        conn = await asyncpg.connect(url)
        try:
            rows_in = [(f"0x{i:064x}", contract_address(i % 2), status)
                       for i, status in enumerate(["FINALIZED", "PENDING", "ACCEPTED", "COMMITTING", "PENDING"])]
            await conn.executemany(
                "INSERT INTO runner_consensus_transactions (hash, from_address, to_address, input, status, "
                "lease_owner) VALUES ($1, $2, $2, '{}', $3, CASE WHEN $3 = 'COMMITTING' THEN 'old-worker' END)",
                rows_in)
            await asyncio.to_thread(command.upgrade, config, "heads")
            jobs = await conn.fetch(
                "SELECT kind, queue, payload::text AS payload, fifo_key FROM runner_jobs ORDER BY id")
            columns = {r["column_name"] for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'runner_consensus_transactions'")}
        finally:
            await conn.close()
    finally:
        await pg_server.drop(name)
    expected = [contract_address(1), contract_address(0)]  # by their first unfinished transaction
    assert [(j["kind"], j["queue"], json.loads(j["payload"])["contract"], j["fifo_key"]) for j in jobs[:2]] == [
        ("consensus.contract", "consensus", to, f"consensus:{to}") for to in expected]
    assert [(j["kind"], j["fifo_key"]) for j in jobs[2:]] == [("consensus.finality", "consensus:finality")]
    assert {"job_id", "job_epoch"} <= columns and not {"lease_owner", "lease_expires_at"} & columns
