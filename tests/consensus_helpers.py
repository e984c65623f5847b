"""Shared helpers for the consensus tests: open an App with the consensus resources, submit, drain,
and read back the ConsensusMain logs."""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from eth_utils import to_checksum_address

from runner.app import App
from runner.config import load_settings
from runner.jobs.consensus.contract import DecodedEvent
from runner.jobs.consensus.engine import Engine
from runner.jobs.consensus.model import new_submission
from runner.jobs.consensus.settings import ConsensusSettings
from runner.worker import Worker

SENDER = "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf"
EVENTS_PER_TX = {"TransactionActivated": 1, "ReceiptProposed": 1, "VoteCommitted": 5, "VoteRevealed": 5,
                 "TransactionFinalized": 1}
DECIDED_EVENTS = ("TransactionAccepted", "TransactionUndetermined")
COLUMN_OF = {"TransactionActivated": "activated_event_tx", "ReceiptProposed": "proposed_event_tx",
             "VoteCommitted": "committed_event_tx", "VoteRevealed": "revealed_event_tx",
             "TransactionAccepted": "decided_event_tx", "TransactionUndetermined": "decided_event_tx",
             "TransactionFinalized": "finalized_event_tx"}


def contract_address(i: int) -> str:
    return to_checksum_address("0x" + f"{0xC0DE0000 + i:040x}")


@asynccontextmanager
async def consensus_app(**env: str) -> AsyncIterator[App]:
    """An App with the chain open and ConsensusMain deployed; env overrides apply (runner_env is active)."""
    env = {"RUNNER_CONSENSUS_ENABLED": "true", **env}  # whatever the suite's default is
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        settings = load_settings(plugin_settings=[ConsensusSettings])  # RUNNER_CONSENSUS_* read now
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    app = await App.open(settings, with_resources=True)
    try:
        yield app
    finally:
        await app.close()


def engine_of(app: App) -> Engine:
    engine: Engine = app.resources["consensus"]
    return engine


async def submit(app: App, to: str, data: dict[str, Any], sender: str = SENDER) -> str:
    submission = new_submission(to_checksum_address(sender), to_checksum_address(to), data)
    await engine_of(app).store.insert([submission])
    return submission.hash


async def drain(app: App, timeout_s: float = 120) -> None:
    await asyncio.wait_for(Worker(app, drain=True, install_signal_handlers=False).run(), timeout_s)


async def rows(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    return await conn.fetch("SELECT * FROM runner_consensus_transactions ORDER BY seq")


def check_events(txs: list[asyncpg.Record], events: list[DecodedEvent], validators: int = 5) -> str:
    """Every transition of every transaction has exactly one event (N for votes), carried by the chain
    transaction whose hash is stored for it; per contract, TransactionFinalized follows submission order.
    Returns the counts by event name, to print (`pytest -s` shows them)."""
    expected = dict(EVENTS_PER_TX, VoteCommitted=validators, VoteRevealed=validators)
    by_tx: dict[str, Counter[str]] = defaultdict(Counter)
    chain_txs: dict[tuple[str, str], set[str]] = defaultdict(set)
    for event in events:
        by_tx[event.tx_id][event.name] += 1
        chain_txs[(event.tx_id, COLUMN_OF[event.name])].add(event.chain_tx)
    for tx in txs:
        counts = by_tx[tx["hash"]]
        leader_timeout = tx["outcome"] == "LEADER_TIMEOUT"
        for name, n in expected.items():
            if leader_timeout and name in ("ReceiptProposed", "VoteCommitted", "VoteRevealed"):
                assert counts[name] == 0, (tx["hash"], name, counts)
                continue
            assert counts[name] == n, (tx["hash"], name, counts)
        assert sum(counts[name] for name in DECIDED_EVENTS) == 1, (tx["hash"], counts)
        for column in {COLUMN_OF[name] for name in counts}:
            assert chain_txs[(tx["hash"], column)] == {tx[column]}, (tx["hash"], column)
    check_finalized_order(txs, events)
    names = ", ".join(f"{n} {name}" for name, n in sorted(Counter(e.name for e in events).items()))
    return f"{len(txs)} transactions, {len(events)} events ({names}), 0 duplicates"


def check_finalized_order(txs: list[asyncpg.Record], events: list[DecodedEvent]) -> None:
    """Per contract, the chain's TransactionFinalized events follow submission order (``txs`` by seq)."""
    order: dict[str, list[str]] = defaultdict(list)
    for event in sorted(events, key=lambda e: (e.block, e.log_index)):
        if event.name == "TransactionFinalized":
            order[event.contract].append(event.tx_id)
    submitted: dict[str, list[str]] = defaultdict(list)
    for tx in txs:
        submitted[tx["to_address"]].append(tx["hash"])
    assert dict(order) == dict(submitted)


@asynccontextmanager
async def running_worker(app: App) -> AsyncIterator[Worker]:
    """A worker (not draining) for the block's length: stopped and awaited on the way out."""
    worker = Worker(app, install_signal_handlers=False)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 60)


async def all_settled(conn: asyncpg.Connection, hashes: list[str], min_round: int = 0) -> bool:
    """Each of ``hashes`` is decided, its decision on chain, released, no appeal waiting, in round
    ``min_round`` or later."""
    n = await conn.fetchval(
        "SELECT count(*) FROM runner_consensus_transactions WHERE hash = ANY($1::text[]) "
        "AND status IN ('ACCEPTED', 'UNDETERMINED', 'LEADER_TIMEOUT', 'VALIDATORS_TIMEOUT') "
        "AND decided_event_tx IS NOT NULL AND job_id IS NULL AND appeal_requested IS NULL AND round >= $2",
        hashes, min_round)
    return bool(n == len(hashes))


async def running_job(conn: asyncpg.Connection) -> int:
    """A runner_jobs row that a live worker runs (its lease far from expiring): a live holder to take
    consensus transactions with, at the store level."""
    return int(await conn.fetchval(
        "INSERT INTO runner_jobs (kind, queue, payload, status, lease_owner, lease_epoch, lease_expires_at, "
        "started_at) VALUES ('consensus.finality', 'consensus', '{}', 'running', 'elsewhere', 1, "
        "now() + interval '1 hour', now()) RETURNING id"))
