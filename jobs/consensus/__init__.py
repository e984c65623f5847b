"""The consensus loops: per-contract ordered transactions, a fenced state machine, finality, and
ConsensusMain events, on the worker's pool, the process's one AsyncWeb3 (runner.chain) and the core's
jobs (runner.jobs.consensus.work: claims, leases, heartbeats, rescues and fencing are the core's)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.jobs.consensus import work
from runner.plugins import JobKind, Plugin

if TYPE_CHECKING:
    import typer
    from pydantic_settings import BaseSettings

    from runner.app import App
    from runner.context import JobContext
    from runner.jobs.consensus.engine import Engine
    from runner.jobs.consensus.settings import ConsensusSettings
    from runner.jobs.consensus.store import ConsensusStore
    from runner.service import Service

# Every command imports this module to build the CLI, so it imports nothing heavy: the chain side (web3,
# eth_account, eth_abi: ~1.5 s of imports) loads only in processes that open the consensus resources
# (workers), the store and settings when a function here first needs them.

MIGRATIONS = Path(__file__).with_name("migrations")
EMIT_MAX_INFLIGHT = 2


def receipt_timeout(app: App) -> float:
    return max(30.0, 3 * app.settings.chain_rpc_timeout)


def consensus_settings(app: App) -> ConsensusSettings:
    from runner.jobs.consensus.settings import consensus_settings as settings_of

    return settings_of(app)


def settings_class() -> type[BaseSettings]:
    from runner.jobs.consensus.settings import ConsensusSettings

    return ConsensusSettings


def register_commands(cli: typer.Typer) -> None:
    from runner.jobs.consensus.cli import register_commands as register

    register(cli)


def _log_info(message: str) -> None:
    from runner.logs import get_logger

    get_logger("runner.jobs.consensus").info(message)


async def open_resources(app: App) -> None:
    """The one AsyncWeb3 (app.resources["chain"]) and a deployed ConsensusMain (address in the database)."""
    if not consensus_settings(app).enabled:  # checked first: the store's imports cost 50 ms of start-up
        return
    import asyncpg

    from runner.errors import ChainNotConfigured, RunnerError
    from runner.jobs.consensus.store import ConsensusStore

    settings = app.settings
    from runner.chain import close_chain, open_chain
    from runner.jobs.consensus.contract import ensure_deployed
    from runner.jobs.consensus.emitter import EventEmitter
    from runner.jobs.consensus.engine import Engine
    from runner.jobs.consensus.executor import KeyValueExecutor

    try:
        chain = await open_chain(settings)
    except ChainNotConfigured as error:  # a plain install (no `chain` extra) and no RUNNER_CHAIN_URL
        from runner.jobs.consensus.settings import turn_off

        _log_info(f"consensus loops off: {error}")
        turn_off(app)
        return
    app.resources["chain"] = chain
    try:
        store = ConsensusStore(app)
        try:
            contract = await ensure_deployed(chain, store, receipt_timeout(app))
        except asyncpg.UndefinedTableError:
            raise RunnerError("the consensus tables are missing: run `runner migrate` first") from None
        emitter = EventEmitter(contract, receipt_timeout_s=receipt_timeout(app), max_inflight=EMIT_MAX_INFLIGHT)
        engine = Engine(app, chain, contract, emitter, KeyValueExecutor())
        try:
            await engine.load_validators()
        except asyncpg.UndefinedTableError:
            raise RunnerError("the validators table is missing: run `runner migrate` first") from None
        app.resources["consensus"] = engine
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


def _engine(ctx: JobContext) -> Engine:
    engine: Engine | None = ctx.app.resources.get("consensus")
    if engine is None:  # claimed only where it is open (runs_here); a worker closing meanwhile
        from runner.errors import RetryLater

        raise RetryLater(1.0, "the consensus resources are not open in this worker")
    return engine


def _holder(ctx: JobContext) -> Any:
    from runner.jobs.consensus.store import Holder

    return Holder(ctx.job.id, ctx.job.lease_epoch)


async def advance_contract(ctx: JobContext) -> dict[str, Any]:
    """A ``consensus.contract`` job: the contract's next unit of work (Engine.advance)."""
    return await _engine(ctx).advance(str(ctx.payload["contract"]), _holder(ctx))


async def finalize_due(ctx: JobContext) -> dict[str, Any]:
    """The ``consensus.finality`` job: finalize what is due (Engine.finalize_due)."""
    return await _engine(ctx).finalize_due(_holder(ctx))


def services(app: App) -> list[Service]:
    from runner.jobs.consensus.sweeper import OrphanSweeper

    return [OrphanSweeper(app)]


def runs_here(app: App) -> bool:
    return "consensus" in app.resources


def concurrency(app: App) -> int:
    return consensus_settings(app).concurrency


def _store(app: App) -> ConsensusStore:
    from runner.jobs.consensus.store import ConsensusStore

    return ConsensusStore(app)


async def has_pending_work(app: App) -> bool:
    """Transactions not finalized yet (or a finalized event still owed): ``--drain`` waits for them."""
    if not consensus_settings(app).enabled:
        return False
    return await _store(app).has_work()


async def appeal(app: App, tx_hash: str) -> tuple[str, str]:
    """Appeal a decided consensus transaction inside its window (full hash or a unique prefix): a worker
    settles it. Returns (full hash, 'validator' or 'leader'); raises UsageError saying why when it cannot
    be appealed (FINALIZED, CANCELED, not decided yet, an appeal under way, the window closed)."""
    settings = consensus_settings(app)
    return await _store(app).request_appeal(tx_hash, settings.finality_window, settings.appeal_window_factor)


async def status(app: App) -> dict[str, Any]:
    counts = await _store(app).counts()
    return {"transactions": counts, "total": sum(counts.values())}


@dataclass(frozen=True)
class ConsensusPlugin(Plugin):
    # read by `runner status`: counts of consensus transactions by status
    status: Callable[[App], Awaitable[dict[str, Any]]] | None = None


plugin = ConsensusPlugin(
    name="consensus",
    # No timeout: a transaction that makes no progress is stopped by the engine's own watchdog
    # (RUNNER_CONSENSUS_TX_STUCK_AFTER), and a wait on the chain is bounded by its RPC timeouts.
    kinds=(JobKind(work.CONTRACT_KIND, advance_contract, timeout_s=0, max_attempts=work.MAX_ATTEMPTS,
                   queue=work.QUEUE, max_running=concurrency, runs_here=runs_here),
           JobKind(work.FINALITY_KIND, finalize_due, timeout_s=0, max_attempts=work.MAX_ATTEMPTS,
                   queue=work.QUEUE, runs_here=runs_here)),
    migrations=MIGRATIONS,
    services=services,
    commands=register_commands,
    has_pending_work=has_pending_work,
    open_resources=open_resources,
    close_resources=close_resources,
    status=status,
    settings=settings_class,
)
