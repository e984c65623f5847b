"""The consensus loops: per-contract ordered transactions, a fenced state machine, finality, and
ConsensusMain events, on the worker's pool and the process's one AsyncWeb3 (runner.chain)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

from runner.errors import RunnerError
from runner.jobs.consensus.cli import register_commands
from runner.jobs.consensus.store import ConsensusStore
from runner.logs import get_logger
from runner.plugins import Plugin

if TYPE_CHECKING:
    from runner.app import App
    from runner.jobs.consensus.engine import Engine
    from runner.service import Service

# The chain side (web3, eth_account, eth_abi: ~1.5 s of imports) loads only in processes that open the
# consensus resources (workers), never for `runner submit`, `runner status` or other plugins' commands.

log = get_logger("runner.jobs.consensus")
MIGRATIONS = Path(__file__).with_name("migrations")
EMIT_MAX_INFLIGHT = 2


def receipt_timeout(app: App) -> float:
    return max(30.0, 3 * app.settings.chain_rpc_timeout)


async def open_resources(app: App) -> None:
    """The one AsyncWeb3 (app.resources["chain"]) and a deployed ConsensusMain (address in the database)."""
    settings = app.settings
    if not settings.consensus_enabled:
        return
    from runner.chain import close_chain, open_chain
    from runner.jobs.consensus.contract import ensure_deployed
    from runner.jobs.consensus.emitter import EventEmitter
    from runner.jobs.consensus.engine import Engine
    from runner.jobs.consensus.executor import KeyValueExecutor

    chain = await open_chain(settings)
    app.resources["chain"] = chain
    try:
        store = ConsensusStore(app.db, settings.worker_id, settings.lease_timeout)
        try:
            contract = await ensure_deployed(chain, store, receipt_timeout(app))
        except asyncpg.UndefinedTableError:
            raise RunnerError("the consensus tables are missing: run `runner migrate` first") from None
        emitter = EventEmitter(contract, receipt_timeout_s=receipt_timeout(app), max_inflight=EMIT_MAX_INFLIGHT)
        app.resources["consensus"] = Engine(app, chain, contract, emitter, KeyValueExecutor())
    except BaseException:
        app.resources.pop("chain", None)
        await close_chain(chain)
        raise


async def close_resources(app: App) -> None:
    engine: Engine | None = app.resources.pop("consensus", None)
    if engine is not None:
        await engine.store.close()
        await engine.emitter.close()
    chain = app.resources.pop("chain", None)
    if chain is not None:
        await chain.close()


def services(app: App) -> Sequence[Service]:
    engine: Engine | None = app.resources.get("consensus")
    if engine is None:
        if app.settings.consensus_enabled:
            log.warning("consensus resources are not open; the consensus loops will not run")
        return []
    from runner.jobs.consensus.engine import FinalityLoop, PendingLoop, RecoveryLoop

    return [PendingLoop(engine), FinalityLoop(engine), RecoveryLoop(engine)]


def _store(app: App) -> ConsensusStore:
    return ConsensusStore(app.db, app.settings.worker_id, app.settings.lease_timeout)


async def has_pending_work(app: App) -> bool:
    """Transactions not finalized yet (or a finalized event still owed): ``--drain`` waits for them."""
    if not app.settings.consensus_enabled:
        return False
    return await _store(app).has_work()


async def status(app: App) -> dict[str, Any]:
    counts = await _store(app).counts()
    return {"transactions": counts, "total": sum(counts.values())}


@dataclass(frozen=True)
class ConsensusPlugin(Plugin):
    # read by `runner status`: counts of consensus transactions by status
    status: Callable[[App], Awaitable[dict[str, Any]]] | None = None


plugin = ConsensusPlugin(
    name="consensus",
    migrations=MIGRATIONS,
    services=services,
    commands=register_commands,
    has_pending_work=has_pending_work,
    open_resources=open_resources,
    close_resources=close_resources,
    status=status,
)
