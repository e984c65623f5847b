"""Validators as data (issue 13): the table and its CLI, the stake-weighted draw with its recorded seed,
appeals drawn from the validators new to a transaction, and, against anvil, each validator's votes signed
by its own key with contiguous nonces per key."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from pathlib import Path

import asyncpg
import pytest
from eth_utils import to_checksum_address

from runner.app import App
from runner.chain import DEV_KEY_NODE, Chain, close_chain, open_chain
from runner.config import load_settings
from runner.errors import UsageError
from runner.jobs.consensus import contract as cm
from runner.jobs.consensus.model import address_of_key
from runner.jobs.consensus.store import ConsensusStore
from runner.jobs.consensus.validators import (
    Validator,
    draw,
    draw_order,
    draw_seed,
    resolve_key,
)
from tests.chain_fixtures import Anvil, anvil  # noqa: F401
from tests.conftest import run_cli, start_worker, wait_exit
from tests.consensus_helpers import (
    all_settled,
    check_finalized_order,
    consensus_app,
    contract_address,
    engine_of,
    rows,
    running_worker,
    submit,
)
from tests.pg import wait_until

KEY_1 = "0x" + "11" * 32
ADDRESS_1 = address_of_key(KEY_1)


def table(stakes: list[int]) -> list[Validator]:
    return [Validator(to_checksum_address(f"0x{i + 1:040x}"), stake) for i, stake in enumerate(stakes)]


# --- the draw ------------------------------------------------------------------------------------------
def test_the_draw_is_a_function_of_the_seed_and_the_table() -> None:
    validators = table([5, 1, 1, 3, 2, 8])
    first = draw(validators, "0x" + "ab" * 32, 0, 4)
    assert first == draw(list(reversed(validators)), "0x" + "ab" * 32, 0, 4)  # the table's order does not count
    assert first.seed == draw_seed("0x" + "ab" * 32, 0) and sorted(first.order) == sorted(v.address for v in validators)
    assert first.order != draw(validators, "0x" + "ab" * 32, 1, 4).order  # another run, another draw
    assert first.leader(0) == first.committee[0] and first.leader(2) == first.committee[2]
    assert first.validators(1) == [a for a in first.committee if a != first.committee[1]]
    assert first.appeal(0, lambda k: 1) == [first.order[4]] and first.appeal(1, lambda k: 1) == [first.order[5]]
    assert first.appeal(2, lambda k: 1) == []  # the table ran out
    dropped = draw(validators, "0x" + "ab" * 32, 0, 4, frozenset({first.leader(0)}))
    assert first.leader(0) not in dropped.order
    with pytest.raises(UsageError, match="a run needs a leader and a validator"):
        draw(table([1]), "0x" + "ab" * 32, 0, 4)


def test_leaders_are_drawn_in_proportion_to_stake() -> None:
    """Over 4,000 transactions (fixed hashes: the same counts every run), a validator holding 8 of 16 stake
    leads about half of them, and one holding 1 about a sixteenth."""
    validators = table([8, 4, 2, 1, 1])
    leads = Counter(draw(validators, "0x" + f"{i:064x}", 0, 4).leader(0) for i in range(4000))
    share = {v.address: leads[v.address] / 4000 for v in validators}
    expected = {v.address: v.stake / 16 for v in validators}
    for address in share:
        assert abs(share[address] - expected[address]) < 0.03, (share, expected)
    # equal stakes: equal chances (a draw ignoring stake would give every one a fifth above too)
    even = Counter(draw(table([1] * 5), "0x" + f"{i:064x}", 0, 4).leader(0) for i in range(4000))
    assert max(even.values()) - min(even.values()) < 250, even


def test_key_references_resolve_without_showing_the_key(tmp_path: Path) -> None:
    assert resolve_key("dev:0") == DEV_KEY_NODE  # anvil's account 0 is the mnemonic's first
    assert resolve_key("env:V_KEY", {"V_KEY": KEY_1[2:]}) == KEY_1
    key_file = tmp_path / "key"
    key_file.write_text(KEY_1 + "\n")
    assert resolve_key(f"file:{key_file}") == KEY_1
    for ref, environ, message in [
        ("env:MISSING", {}, "the environment variable MISSING is not set"),
        ("env:V_KEY", {"V_KEY": "ff" * 31 + "zz"}, "does not hold a private key"),
        ("env:V_KEY", {"V_KEY": "00" * 32}, "not hold a valid secp256k1 private key"),
        ("file:/nonexistent/key", {}, "cannot read the file"),
        ("vault:x", {}, "expected env:NAME, file:PATH or dev:N"),
        ("dev:-1", {}, "expected env:NAME"),
    ]:
        with pytest.raises(UsageError, match=message) as caught:
            resolve_key(ref, environ)
        assert "zz" not in str(caught.value) and "00" * 32 not in str(caught.value)


def test_emit_votes_calldata_matches_eth_abi() -> None:
    events = [cm.Event(cm.COMMITTED, "0x" + "cd" * 32, contract_address(1), ADDRESS_1, cm.word(7), round=2),
              cm.Event(cm.REVEALED, "0x" + "ef" * 32, contract_address(2), ADDRESS_1, cm.word(1), round=0)]
    assert cm.encode_votes(events) == cm.encode_votes_abi(events)


# --- the table and its CLI ----------------------------------------------------------------------------
async def test_validators_cli_adds_lists_and_removes_without_printing_keys(
    runner_env: dict[str, str], app: App, conn: asyncpg.Connection,
) -> None:
    env = {"V1_KEY": KEY_1}
    added = await asyncio.to_thread(run_cli, runner_env, "validators", "add", "--key", "env:V1_KEY",
                                    "--stake", "30", **env)
    assert added.returncode == 0 and f"{ADDRESS_1} added" in added.stdout, added.stderr
    other = to_checksum_address("0x" + "42" * 20)
    plain = await asyncio.to_thread(run_cli, runner_env, "validators", "add", "--address", other, "--stake", "10")
    assert plain.returncode == 0, plain.stderr
    changed = await asyncio.to_thread(run_cli, runner_env, "validators", "add", "--address", other, "--stake", "20")
    assert f"{other} updated" in changed.stdout
    listed = await asyncio.to_thread(run_cli, runner_env, "validators", "list", "--json")
    assert listed.returncode == 0 and KEY_1[2:] not in listed.stdout + listed.stderr
    import json

    got = {r["address"]: (r["stake"], r["key_ref"], r["share"]) for r in json.loads(listed.stdout)}
    assert got == {ADDRESS_1: (30, "env:V1_KEY", 0.6), other: (20, None, 0.4)}

    refusals = [
        (("--key", "env:NOT_SET", "--stake", "5"), "the environment variable NOT_SET is not set"),
        (("--key", "env:V1_KEY", "--stake", "0"), "--stake must be 1 to"),
        (("--key", "env:V1_KEY", "--address", other, "--stake", "5"), "is not the address of the key env:V1_KEY"),
        (("--stake", "5"), "give --key"),
        (("--address", "0x1234", "--stake", "5"), "is not an address"),
        (("--key", "s3:bucket", "--stake", "5"), "expected env:NAME, file:PATH or dev:N"),
    ]
    for args, message in refusals:
        result = await asyncio.to_thread(run_cli, runner_env, "validators", "add", *args, **env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], (args, result.stderr)
        assert KEY_1[2:] not in result.stderr
    gone = await asyncio.to_thread(run_cli, runner_env, "validators", "remove", other)
    assert gone.returncode == 0
    again = await asyncio.to_thread(run_cli, runner_env, "validators", "remove", other)
    assert again.returncode == 2 and f"no validator {other}" in again.stderr
    assert await conn.fetchval("SELECT count(*) FROM runner_consensus_validators") == 1


async def test_a_worker_refuses_to_start_on_a_table_it_cannot_use(
    runner_env: dict[str, str], app: App, conn: asyncpg.Connection, tmp_path: Path,
) -> None:
    """Too few validators for a committee, a key that is not there, a key that is another address's, a
    validator without funds for its votes: one line each, exit 2, before anything is claimed."""
    store = ConsensusStore(app)
    await submit_plain(store)
    env = {"RUNNER_CONSENSUS_ENABLED": "true", "RUNNER_CONSENSUS_VALIDATORS": "2", "RUNNER_CONSENSUS_ROTATIONS": "1"}
    for v in table([1, 1]):
        await store.put_validator(v)

    async def refused(name: str, message: str, **extra: str) -> None:
        log = tmp_path / f"{name}.log"
        worker = start_worker(runner_env, "--drain", log_path=log, **env, **extra)
        code = await wait_exit(worker, 120)
        text = log.read_text()
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0], text[-2000:]
        assert "22" * 32 not in text and KEY_1[2:] not in text

    await refused("too-few", "the validators table has 2 validator(s); RUNNER_CONSENSUS_VALIDATORS=2 needs 3")
    await store.put_validator(Validator(ADDRESS_1, 5, "env:GONE_KEY"))
    await refused("no-key", "key reference env:GONE_KEY: the environment variable GONE_KEY is not set")
    await refused("other-key", f"validator {ADDRESS_1}: its key reference env:GONE_KEY holds the key of",
                  GONE_KEY="22" * 32)
    await refused("unfunded", f"validator {ADDRESS_1} has no funds on chain", GONE_KEY=KEY_1)
    assert {r["status"] for r in await rows(conn)} == {"PENDING"}


async def submit_plain(store: ConsensusStore) -> None:
    from runner.jobs.consensus.model import new_submission

    await store.insert([new_submission(ADDRESS_1, contract_address(1), {"op": "set", "key": "a", "value": 1})])


# --- appeals draw from the table (in-process chain; unkeyed validators: the worker sends their votes) --
async def test_runs_and_appeals_draw_from_the_table_with_recorded_seeds(
    runner_env: dict[str, str], app: App, conn: asyncpg.Connection,
) -> None:
    """Ten validators of unequal stake, committees of four: each run's draw is recorded (seed, committee,
    stakes) and recomputes from the table; a leader rotation takes the committee's next member; an appeal's
    validators are the next of its own seeded draw among those that have not voted on the transaction."""
    store = ConsensusStore(app)
    validators = table([9, 1, 4, 4, 2, 7, 3, 1, 5, 6])
    for v in validators:
        await store.put_validator(v)
    env = {"RUNNER_CONSENSUS_VALIDATORS": "3", "RUNNER_CONSENSUS_ROTATIONS": "1",
           "RUNNER_CONSENSUS_APPEAL_GROWTH": "2", "RUNNER_CONSENSUS_FINALITY_WINDOW": "3600"}
    async with consensus_app(**env) as consensus:
        assert engine_of(consensus).nodes == [v.address for v in validators]
        x = contract_address(41)
        plain = [await submit(consensus, x, {"op": "set", "key": f"k{i}", "value": i}) for i in range(6)]
        rotated = await submit(consensus, x, {"op": "set", "key": "r", "value": 1,
                                              "consensus": {"disagree": 2, "disagree_rounds": 1}})
        async with running_worker(consensus):
            await wait_until(lambda: all_settled(conn, [*plain, rotated]), 60)
        found = {r["hash"]: r for r in await rows(conn)}
        for tx_hash in [*plain, rotated]:
            row = found[tx_hash]
            recorded = row["draw"]
            again = draw(validators, tx_hash, recorded["run_round"], 4)
            assert recorded["seed"] == draw_seed(tx_hash, 0) == again.seed
            assert recorded["committee"] == again.committee
            assert recorded["stakes"] == {a: next(v.stake for v in validators if v.address == a)
                                          for a in again.committee}
            assert row["leader"] == again.leader(row["rotation_count"])
            assert sorted(v["validator"] for v in row["votes"]) == sorted(again.validators(row["rotation_count"]))
        assert found[rotated]["rotation_count"] == 1 and found[rotated]["status"] == "ACCEPTED"

        target = found[plain[0]]
        done = await asyncio.to_thread(run_cli, runner_env, "appeal", plain[0], **env)
        assert done.returncode == 0, done.stderr
        async with running_worker(consensus):
            await wait_until(lambda: appealed(conn, plain[0]), 60)
        after = {r["hash"]: r for r in await rows(conn)}[plain[0]]
    record = after["appeals"][0]
    voted = {v["validator"] for v in target["votes"]} | {target["leader"]}
    seed = draw_seed(plain[0], target["round"] + 1)
    assert record["seed"] == seed and record["outcome"] == "failed"
    assert record["validators"] == draw_order(validators, seed, frozenset(voted))[:2]
    assert not set(record["validators"]) & voted


async def appealed(conn: asyncpg.Connection, tx_hash: str) -> bool:
    row = {r["hash"]: r for r in await rows(conn)}[tx_hash]
    return len(row["appeals"]) == 1 and await all_settled(conn, [tx_hash])


# --- anvil: every validator signs its own votes, one nonce lane per key ---------------------------------
async def transactions_by_sender(chain: Chain) -> dict[str, list[dict[str, int | str]]]:
    sent: dict[str, list[dict[str, int | str]]] = defaultdict(list)
    for number in range(await chain.block_number() + 1):
        block = await chain.w3.eth.get_block(number, full_transactions=True)
        for tx in block["transactions"]:
            sent[str(tx["from"])].append({"nonce": int(tx["nonce"]), "hash": "0x" + bytes(tx["hash"]).hex()})
    return sent


async def test_keyed_validators_sign_their_own_votes_with_contiguous_nonces_on_anvil(
    runner_env: dict[str, str], app: App, conn: asyncpg.Connection, anvil: Anvil, tmp_path: Path,  # noqa: F811
) -> None:
    """Eight validators with anvil's development keys 1-8 and unequal stakes; 24 transactions over four
    contracts (one rotating its leader) drained by a worker: every VoteCommitted and VoteRevealed is in a
    chain transaction signed by its own validator, exactly once per (transaction, round, validator); each
    key's nonces are 0..n-1 with every one mined; the worker's key sent no vote of a keyed validator."""
    validators = await keyed_table(runner_env, app, {"disagree": 2, "disagree_rounds": 1})
    txs = await drained(runner_env, anvil, conn, tmp_path / "worker.log")
    assert sum(t["rotation_count"] for t in txs) == 1
    await check_signed_votes(anvil, conn, txs, validators, rounds=25)


async def test_kill_9_mid_consensus_then_another_worker_finishes_each_key_exactly_once_on_anvil(
    runner_env: dict[str, str], app: App, conn: asyncpg.Connection, anvil: Anvil, tmp_path: Path,  # noqa: F811
) -> None:
    """A worker is killed with transactions in the machine (some of their validators' votes may be on chain
    without the row knowing: they are in several chain transactions, one per key); another takes them back,
    sends their votes again (ConsensusMain skips those it has) and finishes: still every vote once, signed
    by its validator, and each key's nonces contiguous."""
    validators = await keyed_table(runner_env, app, {"validator_delay": 0.3})
    first = start_worker(runner_env, log_path=tmp_path / "first.log", **keyed_env(anvil))

    async def mid_consensus() -> bool:
        counts = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE status IN ('PROPOSING', 'COMMITTING', 'REVEALING')) AS busy, "
            "count(*) FILTER (WHERE decided_event_tx IS NOT NULL) AS done FROM runner_consensus_transactions")
        return bool(counts["busy"] >= 2 and counts["done"] >= 3)

    await wait_until(mid_consensus, timeout_s=90)
    first.kill()
    first.wait()
    txs = await drained(runner_env, anvil, conn, tmp_path / "second.log")
    assert sum(t["recovery_count"] for t in txs) >= 2
    await check_signed_votes(anvil, conn, txs, validators, rounds=24)


async def keyed_table(runner_env: dict[str, str], app: App, faults: dict[str, float | int]) -> list[Validator]:
    """Eight validators with anvil's development keys 1-8 and unequal stakes (through the CLI), and 24
    transactions over four contracts; ``faults`` go to the sixth one."""
    stakes = [40, 10, 10, 20, 5, 5, 5, 5]
    for i, stake in enumerate(stakes, start=1):
        added = await asyncio.to_thread(run_cli, runner_env, "validators", "add", "--key", f"dev:{i}",
                                        "--stake", str(stake))
        assert added.returncode == 0, added.stderr
    store = ConsensusStore(app)
    from runner.jobs.consensus.model import new_submission

    plan = [(contract_address(c), {"op": "set", "key": f"k{i}", "value": i}) for i in range(6) for c in range(4)]
    if "validator_delay" in faults:
        for _, data in plan:
            data["consensus"] = dict(faults)
    else:
        plan[5][1]["consensus"] = dict(faults)
    await store.insert([new_submission(ADDRESS_1, to, data) for to, data in plan])
    return await store.validators()


async def drained(runner_env: dict[str, str], anvil: Anvil, conn: asyncpg.Connection,  # noqa: F811
                  log: Path) -> list[asyncpg.Record]:
    """A draining worker's run to its end: exit 0, and all 24 transactions FINALIZED."""
    worker = start_worker(runner_env, "--drain", log_path=log, **keyed_env(anvil))
    assert await wait_exit(worker, 240) == 0, log.read_text()[-3000:]
    txs = await rows(conn)
    assert len(txs) == 24 and {t["status"] for t in txs} == {"FINALIZED"}
    return txs


def keyed_env(anvil: Anvil) -> dict[str, str]:  # noqa: F811
    return {"RUNNER_CHAIN_URL": anvil.url, "RUNNER_CONSENSUS_ENABLED": "true",
            "RUNNER_CONSENSUS_FINALITY_WINDOW": "0.2", "RUNNER_CONSENSUS_VALIDATORS": "3",
            "RUNNER_CONSENSUS_ROTATIONS": "1", "RUNNER_CONSENSUS_CONCURRENCY": "8"}


async def check_signed_votes(anvil: Anvil, conn: asyncpg.Connection, txs: list[asyncpg.Record],  # noqa: F811
                             validators: list[Validator], rounds: int) -> None:
    chain = await open_chain(load_settings(chain_url=anvil.url))
    try:
        deployment = await conn.fetchrow("SELECT address, block_number FROM runner_consensus_deployments")
        contract = cm.ConsensusMain(chain, deployment["address"], deployment["block_number"])
        events = await contract.logs()
        check_finalized_order(txs, events)
        senders = {e.chain_tx: str((await chain.w3.eth.get_transaction(e.chain_tx))["from"])  # type: ignore[arg-type]
                   for e in events if e.name.startswith("Vote")}
        votes = [e for e in events if e.name.startswith("Vote")]
        keys = Counter((e.name, e.tx_id, e.args[0], e.args[-1]) for e in votes)
        assert keys and max(keys.values()) == 1  # exactly once per (transaction, round, validator)
        for event in votes:
            assert senders[event.chain_tx] == to_checksum_address(event.args[0]), event
        by_tx = {t["hash"]: t for t in txs}
        for event in votes:  # each vote is by a member of that round's committee other than its leader
            assert to_checksum_address(event.args[0]) in by_tx[event.tx_id]["draw"]["committee"]
        assert len(votes) == 2 * 3 * rounds  # each round's 3 commits and 3 reveals

        sent = await transactions_by_sender(chain)
        keyed = {v.address for v in validators}
        assert set(senders.values()) <= keyed and len(set(senders.values())) >= 4
        for sender, sent_txs in sent.items():
            nonces = sorted(int(t["nonce"]) for t in sent_txs)
            assert nonces == list(range(len(nonces))), (sender, nonces)
            assert len(nonces) == await chain.w3.eth.get_transaction_count(sender), sender  # type: ignore[arg-type]
        for sender in keyed & set(sent):
            for sent_tx in sent[sender]:
                receipt = await chain.receipt(str(sent_tx["hash"]))
                assert receipt is not None and receipt.status == 1
        print(f"{len(txs)} transactions, {len(votes)} votes in {sum(len(sent[s]) for s in keyed & set(sent))} chain "
              f"transactions of {len(keyed & set(sent))} validator keys; worker key "
              f"{len(sent[address_of_key(DEV_KEY_NODE)])} transactions")
    finally:
        await close_chain(chain)
