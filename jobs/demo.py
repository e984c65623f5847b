"""``runner demo`` and the operate plugin.

The demo is the README's first command and needs nothing set: it starts the embedded PostgreSQL (unless
``RUNNER_DATABASE_URL`` is set) and the in-process chain (unless ``RUNNER_CHAIN_URL`` is set), migrates,
generates a source table, enqueues a backfill of it, submits consensus transactions over a few
contracts, and runs a worker in this process with live progress until everything is done. It ends with
a summary (rows copied, transactions finalized, the peak pool and chain connections, where ``/metrics``
was) and exits 0 only if every row was copied and every transaction finalized.

The operate plugin also samples the consensus gauges for ``/metrics`` (transactions by status, and how
long the oldest decided transaction has waited for finality, in finality windows).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

import typer

from runner.errors import RunnerError, UsageError
from runner.plugins import Plugin

# Every `runner` command loads this plugin to register `demo`: what only the demo needs (alembic, the
# worker, the HTTP server, eth-utils, rich's live display) is imported when the demo runs.
if TYPE_CHECKING:
    from rich.console import Console, Group
    from rich.table import Table

    from runner.app import App
    from runner.config import Settings
    from runner.http import HttpServer
    from runner.worker import Worker

SOURCE_TABLE = "public.runner_demo_source"
COPY_TABLE = "public.runner_demo_copy"
REFRESH_S = 0.25
DEFAULT_TIMEOUT_S = 900.0
TX_TABLE = "runner_consensus_transactions"
FINALIZED = "FINALIZED"
RUNNER_CONNECTION = "default"  # backfill's name for the runner's own database

CREATE_SOURCE = f"""
DROP TABLE IF EXISTS {COPY_TABLE};
DROP TABLE IF EXISTS {SOURCE_TABLE};
CREATE TABLE {SOURCE_TABLE} (
    id bigint PRIMARY KEY,
    account text NOT NULL,
    amount numeric(12, 2) NOT NULL,
    created_at timestamptz NOT NULL,
    note text,
    attributes jsonb NOT NULL
)
"""
# One set-based statement: the rows never leave the server.
FILL_SOURCE = f"""
INSERT INTO {SOURCE_TABLE} (id, account, amount, created_at, note, attributes)
SELECT g,
       'acct-' || (g % 997),
       round((g % 10007) * 1.37, 2),
       timestamptz '2024-01-01' + g * interval '1 minute',
       CASE WHEN g % 5 = 0 THEN NULL ELSE 'row ' || g END,
       jsonb_build_object('bucket', g % 16, 'even', g % 2 = 0)
FROM generate_series(1, $1::bigint) AS g
"""
COUNT_COPY = f"SELECT count(*) FROM {COPY_TABLE}"
COPY_EXISTS = "SELECT to_regclass($1) IS NOT NULL"
OURS_BY_STATUS = f"SELECT status, count(*) AS n FROM {TX_TABLE} WHERE hash = ANY($1::text[]) GROUP BY status"
# Counts by status, and the longest a decided transaction has waited for finality (seconds).
SAMPLE_CONSENSUS = f"""
SELECT status, count(*) AS n,
       max(extract(epoch FROM now() - timestamp_awaiting_finalization))
           FILTER (WHERE status NOT IN ('FINALIZED', 'CANCELED')) AS waiting_s
FROM {TX_TABLE}
GROUP BY status
"""


# --- the operate plugin's metric sampler -----------------------------------------------------------
async def sample_consensus_metrics(app: App) -> None:
    """runner_consensus_transactions{status} and runner_consensus_nonfinal_age_window_ratio."""
    from runner.jobs.consensus import metrics
    from runner.jobs.consensus.model import STATUSES
    from runner.jobs.consensus.settings import consensus_settings

    consensus = consensus_settings(app)
    if not consensus.enabled:
        return

    rows = await app.db.fetch(SAMPLE_CONSENSUS)
    counts = {r["status"]: r["n"] for r in rows}
    for status in STATUSES:
        metrics.CONSENSUS_TRANSACTIONS.labels(status).set(counts.get(status, 0))
    waiting = max((float(r["waiting_s"]) for r in rows if r["waiting_s"] is not None), default=0.0)
    metrics.CONSENSUS_NONFINAL_AGE_RATIO.set(waiting / max(consensus.finality_window, 1.0))


# --- the demo --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoSize:
    rows: int
    transactions: int
    contracts: int
    timeout_s: float


@dataclass
class Observed:
    """What the live view shows; the peaks are sampled every refresh."""

    started: float = field(default_factory=time.monotonic)
    rows_done: int = 0
    rows_total: int | None = None
    job_status: str = "pending"
    tx_by_status: dict[str, int] = field(default_factory=dict)
    peak_pool_in_use: int = 0
    peak_pool_size: int = 0
    peak_chain_connections: int = 0

    @property
    def finalized(self) -> int:
        return self.tx_by_status.get(FINALIZED, 0)


@dataclass(frozen=True)
class Summary:
    rows_expected: int
    rows_copied: int
    backfill_status: str
    transactions: int
    finalized: int
    tx_by_status: dict[str, int]
    peak_pool_in_use: int
    peak_pool_size: int
    pool_max: int
    peak_chain_connections: int
    chain_kind: str
    chain_max_connections: int
    metrics_url: str | None
    elapsed_s: float
    timed_out: bool

    @property
    def ok(self) -> bool:
        return (not self.timed_out and self.rows_copied == self.rows_expected
                and self.finalized == self.transactions)


def contract_addresses(count: int) -> list[str]:
    """Deterministic targets for the key-value contract (consensus keeps one state per address)."""
    from eth_utils import keccak, to_checksum_address

    return [to_checksum_address(keccak(f"runner-demo-contract-{i}".encode())[12:]) for i in range(count)]


async def prepare_source(app: App, rows: int) -> None:
    async with app.db.transaction() as connection:
        await connection.execute(CREATE_SOURCE)
        await connection.execute(FILL_SOURCE, rows)
    async with app.db.connection() as connection:
        await connection.execute(f"ANALYZE {SOURCE_TABLE}")


async def enqueue_backfill(app: App) -> int:
    from runner.queue import NewJob

    payload = {"source": RUNNER_CONNECTION, "source_table": SOURCE_TABLE, "dest": RUNNER_CONNECTION,
               "dest_table": COPY_TABLE, "key": "id", "create_table": True}
    kind = app.registry.get("backfill")
    if kind.validate is not None:
        await kind.validate(payload, app)
    job_id, _created = await app.queue.job_enqueue(NewJob("backfill", payload, max_attempts=3))
    return job_id


async def submit_transactions(app: App, count: int, contracts: int) -> list[str]:
    if count == 0:
        return []
    from runner.jobs.consensus.model import default_sender, new_submission
    from runner.jobs.consensus.store import ConsensusStore

    sender = default_sender(app.settings)
    targets = contract_addresses(contracts)
    submissions = [
        new_submission(sender, targets[i % contracts], {"op": "set", "key": f"k{i // contracts}", "value": i})
        for i in range(count)
    ]
    store = ConsensusStore(app)
    return await store.insert(submissions)


async def start_http(app: App, worker: Worker) -> HttpServer | None:
    """The configured port, or any free one when it is taken (another worker may be running)."""
    from runner.http import HttpServer, HttpServerError

    if not app.settings.http_enabled:
        return None
    try:
        return await HttpServer(app, worker).start()
    except HttpServerError:
        return await HttpServer(app, worker, port=0).start()


class LiveView:
    def __init__(self, size: DemoSize, console: Console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.size = size
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console,
        )
        self.rows_task = self.progress.add_task("backfill rows copied", total=size.rows or 1)
        self.tx_task = self.progress.add_task("transactions finalized", total=size.transactions or 1)

    def render(self, seen: Observed, app: App, chain_kind: str, url: str | None) -> Group:
        from rich.console import Group
        from rich.table import Table

        self.progress.update(self.rows_task, completed=seen.rows_done if self.size.rows else 1)
        self.progress.update(self.tx_task, completed=seen.finalized if self.size.transactions else 1)
        stats = app.db.stats()
        table = Table.grid(padding=(0, 2))
        table.add_row("pool", f"{stats.in_use} in use / {stats.size} open / max {stats.max_size}"
                      f" (peak {seen.peak_pool_in_use} in use), {stats.waiters} waiting")
        table.add_row("chain", f"{chain_kind}, {seen.peak_chain_connections} connections at most"
                      f" (cap {app.settings.chain_max_connections})")
        table.add_row("consensus", ", ".join(f"{k} {v}" for k, v in sorted(seen.tx_by_status.items())) or "-")
        table.add_row("backfill job", seen.job_status)
        table.add_row("metrics", f"{url}/metrics" if url else "off (RUNNER_HTTP_ENABLED=false)")
        return Group(self.progress, table)


async def observe(app: App, job_id: int | None, hashes: Sequence[str], seen: Observed) -> None:
    if job_id is not None:
        job = await app.queue.job_get(job_id)
        seen.rows_done, seen.rows_total, seen.job_status = job["progress_done"], job["progress_total"], job["status"]
    if hashes:
        rows = await app.db.fetch(OURS_BY_STATUS, list(hashes))
        seen.tx_by_status = {r["status"]: r["n"] for r in rows}
    sample_peaks(app, seen)


def sample_peaks(app: App, seen: Observed) -> None:
    stats = app.db.stats()
    seen.peak_pool_in_use = max(seen.peak_pool_in_use, stats.in_use, app.db.peak_in_use)
    seen.peak_pool_size = max(seen.peak_pool_size, stats.size)
    chain = app.resources.get("chain")
    if chain is not None:
        seen.peak_chain_connections = max(seen.peak_chain_connections, chain.open_connections())


async def rows_copied(app: App) -> int:
    if not await app.db.fetchval(COPY_EXISTS, COPY_TABLE):
        return 0
    return int(await app.db.fetchval(COUNT_COPY))


async def run_worker(app: App, size: DemoSize, job_id: int | None, hashes: list[str], console: Console,
                     chain_kind: str) -> tuple[Observed, str | None, bool]:
    from rich.live import Live

    from runner.worker import Worker

    worker = Worker(app, drain=True, serve_http=False)  # served below, falling back to a free port
    http = await start_http(app, worker)
    url = http.url if http else None
    if url:
        console.print(f"live metrics: [bold]{url}/metrics[/]  pool: {url}/pool  health: {url}/healthz")
    seen = Observed()
    view = LiveView(size, console)
    task = asyncio.create_task(worker.run(), name="demo-worker")
    timed_out = False
    try:
        with Live(view.render(seen, app, chain_kind, url), console=console, auto_refresh=False) as live:
            while not task.done():
                await asyncio.wait({task}, timeout=REFRESH_S)
                sample_peaks(app, seen)
                if not task.done():
                    await observe(app, job_id, hashes, seen)
                live.update(view.render(seen, app, chain_kind, url), refresh=True)
                if not timed_out and time.monotonic() - seen.started > size.timeout_s:
                    timed_out = True
                    worker.request_stop()
            await task  # raise the worker's error, if any
            await observe(app, job_id, hashes, seen)
            live.update(view.render(seen, app, chain_kind, url), refresh=True)
    finally:
        if not task.done():
            worker.request_stop()
            await asyncio.gather(task, return_exceptions=True)
        if http is not None:
            await http.stop()
    return seen, url, timed_out


async def demo(settings: Settings, size: DemoSize, console: Console) -> Summary:
    from runner.app import App
    from runner.logs import redact_dsn
    from runner.migrate import migrate

    where = "RUNNER_DATABASE_URL" if settings.database_url else f"the embedded PostgreSQL in {settings.home}"
    console.print(f"database: {where} (starting it if needed)")
    app = await App.open(settings)
    try:
        console.print(f"database: {redact_dsn(app.dsn)}; migrating")
        await migrate(app.dsn, app.plugins)
        await app.open_resources()
        chain = app.resources.get("chain")
        chain_kind = f"{chain.kind} ({chain.node})" if chain is not None else "not opened"
        console.print(f"chain: {chain_kind}")
        job_id: int | None = None
        if size.rows:
            console.print(f"generating {size.rows:,} rows in {SOURCE_TABLE}")
            await prepare_source(app, size.rows)
            job_id = await enqueue_backfill(app)
            console.print(f"enqueued backfill job {job_id}: {SOURCE_TABLE} -> {COPY_TABLE}")
        hashes = await submit_transactions(app, size.transactions, size.contracts)
        if hashes:
            console.print(f"submitted {len(hashes)} transactions over {size.contracts} contracts")
        seen, url, timed_out = await run_worker(app, size, job_id, hashes, console, chain_kind)
        sample_peaks(app, seen)
        return Summary(
            rows_expected=size.rows, rows_copied=await rows_copied(app) if size.rows else 0,
            backfill_status=seen.job_status if size.rows else "-", transactions=len(hashes),
            finalized=seen.finalized, tx_by_status=dict(seen.tx_by_status),
            peak_pool_in_use=seen.peak_pool_in_use, peak_pool_size=seen.peak_pool_size,
            pool_max=app.db.max_size, peak_chain_connections=seen.peak_chain_connections,
            chain_kind=chain_kind, chain_max_connections=settings.chain_max_connections,
            metrics_url=f"{url}/metrics" if url else None, elapsed_s=time.monotonic() - seen.started,
            timed_out=timed_out,
        )
    finally:
        await app.close()


def summary_table(summary: Summary) -> Table:
    from rich.table import Table

    table = Table(title="runner demo", show_header=False)
    table.add_row("rows copied", f"{summary.rows_copied:,} of {summary.rows_expected:,}"
                  f" (backfill job {summary.backfill_status})")
    others = {k: v for k, v in summary.tx_by_status.items() if k != FINALIZED}
    table.add_row("transactions finalized", f"{summary.finalized} of {summary.transactions}"
                  + (f" (also {others})" if others else ""))
    table.add_row("peak pool connections", f"{summary.peak_pool_in_use} in use, {summary.peak_pool_size} open,"
                  f" max {summary.pool_max}")
    chain_note = " (in-process: no TCP)" if summary.chain_kind.startswith("in-process") else ""
    table.add_row("peak chain connections", f"{summary.peak_chain_connections} of at most "
                  f"{summary.chain_max_connections}{chain_note}")
    table.add_row("metrics were at", summary.metrics_url or "off (RUNNER_HTTP_ENABLED=false)")
    table.add_row("elapsed", f"{summary.elapsed_s:.1f}s")
    return table


def failure(summary: Summary) -> str:
    if summary.timed_out:
        return "the demo did not finish within --timeout"
    if summary.rows_copied != summary.rows_expected:
        return (f"only {summary.rows_copied} of {summary.rows_expected} rows were copied "
                f"(backfill job {summary.backfill_status})")
    return f"only {summary.finalized} of {summary.transactions} transactions were finalized"


def _consensus_enabled(settings: Settings) -> bool:
    from runner.jobs.consensus.settings import from_settings

    return from_settings(settings).enabled


def check_size(rows: int, transactions: int, contracts: int, timeout: float, settings: Settings) -> DemoSize:
    if rows < 0:
        raise UsageError(f"--rows must not be negative, got {rows}")
    if transactions < 0:
        raise UsageError(f"--transactions must not be negative, got {transactions}")
    if contracts <= 0:
        raise UsageError(f"--contracts must be positive, got {contracts}")
    if timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {timeout:g}")
    if transactions and not _consensus_enabled(settings):
        raise UsageError("RUNNER_CONSENSUS_ENABLED is false: run the demo with --transactions 0, or enable it")
    if transactions and not settings.chain_url:
        from runner.chain import in_process_chain_available

        if not in_process_chain_available():
            raise UsageError("runner demo needs the in-process chain: pip install 'runner-pg[chain]' "
                             "(or set RUNNER_CHAIN_URL, or run it with --transactions 0)")
    return DemoSize(rows, transactions, contracts, timeout)


def demo_command(
    rows: Annotated[int, typer.Option(help="Rows in the generated source table")] = 200_000,
    transactions: Annotated[int, typer.Option(help="Consensus transactions to submit")] = 50,
    contracts: Annotated[int, typer.Option(help="Contracts the transactions are spread over")] = 5,
    timeout: Annotated[float, typer.Option(help="Seconds before the demo gives up")] = DEFAULT_TIMEOUT_S,
) -> None:
    """The tour: embedded PostgreSQL, in-process chain, a backfill and consensus, live, then a summary."""
    from rich.console import Console

    from runner.cli import fail, run_async, settings_or_exit
    from runner.logs import configure_logging

    settings = settings_or_exit()
    if "RUNNER_LOG_LEVEL" not in os.environ:
        configure_logging(settings.log_format, "warning")  # keep the live view readable
    try:
        size = check_size(rows, transactions, contracts, timeout, settings)
    except UsageError as error:
        raise fail(str(error), 2) from None
    console = Console()
    try:
        summary = run_async(demo(settings, size, console))
    except KeyboardInterrupt:
        raise fail("interrupted", 1) from None
    except RunnerError as error:  # pragma: no cover - run_async turns these into exits already
        raise fail(str(error), error.exit_code) from None
    console.print()
    console.print(summary_table(summary))
    if not summary.ok:
        print(f"error: {failure(summary)}", file=sys.stderr)
        raise typer.Exit(1)


def register_commands(cli: typer.Typer) -> None:
    cli.command("demo")(demo_command)


plugin = Plugin(name="operate", commands=register_commands, sample_metrics=sample_consensus_metrics)
