"""The ``runner`` command line. Bad input gets one line on stderr: exit 2 for usage, 1 for runtime errors."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import asyncpg
import typer
from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from runner.app import App
from runner.config import Settings, SettingsError, load_settings
from runner.embedded import EmbeddedPostgres
from runner.errors import RunnerError, UsageError
from runner.logs import configure_logging, redact, redact_dsn
from runner.plugins import load_plugins
from runner.queue import NewJob
from runner.worker import Worker

T = TypeVar("T")
JSONL_BATCH = 1000
FINISHED = ("succeeded", "failed", "cancelled")

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="runner: PostgreSQL-backed jobs and consensus loops on one bounded pool.")
db_cli = typer.Typer(no_args_is_help=True, help="The embedded PostgreSQL (used when RUNNER_DATABASE_URL is unset).")
cli.add_typer(db_cli, name="db")
stdout = Console()


def fail(message: str, code: int) -> typer.Exit:
    print(f"error: {redact(message)}", file=sys.stderr)
    return typer.Exit(code)


def settings_or_exit(**overrides: Any) -> Settings:
    try:
        settings = load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as error:
        raise fail(str(error), 2) from None
    configure_logging(settings.log_format, settings.log_level)
    return settings


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; turn runner's typed errors into one line and an exit code."""
    try:
        return asyncio.run(coro)
    except RunnerError as error:
        raise fail(str(error), error.exit_code) from None
    except asyncpg.UndefinedTableError as error:
        raise fail(f"the database schema is missing or out of date ({error}); run `runner migrate`", 1) from None
    except asyncpg.PostgresError as error:
        raise fail(f"database error: {type(error).__name__}: {error}", 1) from None
    except (OSError, ConnectionError) as error:
        raise fail(f"{type(error).__name__}: {error}", 1) from None


@asynccontextmanager
async def open_app(settings: Settings, *, with_resources: bool = False) -> AsyncIterator[App]:
    app = await App.open(settings, with_resources=with_resources)
    try:
        yield app
    finally:
        await app.close()


def with_app(
    settings: Settings, body: Callable[[App], Awaitable[T]], *, with_resources: bool = False
) -> T:
    async def main() -> T:
        async with open_app(settings, with_resources=with_resources) as app:
            return await body(app)

    return run_async(main())


def positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise fail(f"{name} must be positive, got {value:g}", 2)


def json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --- migrate / worker -------------------------------------------------------------------------------
@cli.command("migrate")
def migrate_command() -> None:
    """Create or upgrade the schema (idempotent; safe from many containers at once)."""
    settings = settings_or_exit()

    from runner.migrate import migrate  # alembic is heavy: imported only by the command that needs it

    async def body(app: App) -> None:
        await migrate(app.dsn, app.plugins)

    with_app(settings, body)
    stdout.print("schema is up to date")


@cli.command("worker")
def worker_command(
    concurrency: Annotated[int | None, typer.Option(help="Jobs run at once (RUNNER_CONCURRENCY)")] = None,
    queue: Annotated[list[str] | None, typer.Option("--queue", "-q", help="Queue to serve (repeatable)")] = None,
    drain: Annotated[bool, typer.Option(help="Exit 0 once nothing is runnable or running")] = False,
) -> None:
    """Run jobs (and the consensus loops) until SIGTERM, or until drained."""
    positive("--concurrency", concurrency)
    settings = settings_or_exit(concurrency=concurrency, queues=queue or None)
    if settings.http_enabled:
        # Import the HTTP server's stack in the background while the pool connects. Not a daemon thread:
        # the interpreter joins it before finalizing, and a daemon thread caught mid-import at exit can
        # crash the process.
        threading.Thread(target=importlib.import_module, args=("runner.http",), name="import-http").start()

    async def body(app: App) -> None:
        await Worker(app, drain=drain).run()

    with_app(settings, body, with_resources=True)


# --- enqueue ----------------------------------------------------------------------------------------
def parse_payload(text: str, where: str) -> dict[str, Any]:
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(payload, dict):
        raise UsageError(f"{where}: the payload must be a JSON object, got {type(payload).__name__}")
    return payload


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise UsageError(f"--jsonl {path}: {error.strerror}") from None
    payloads = [parse_payload(line, f"{path} line {n}") for n, line in enumerate(lines, 1) if line.strip()]
    if not payloads:
        raise UsageError(f"--jsonl {path}: no payloads in the file")
    return payloads


async def wait_for_job(app: App, job_id: int, poll_s: float = 0.2) -> str:
    while True:
        job = await app.queue.job_get(job_id)
        if job["status"] in FINISHED:
            return str(job["status"])
        await asyncio.sleep(poll_s)


async def enqueue_all(app: App, jobs: list[NewJob]) -> list[int]:
    """All jobs in one transaction, in batches: a bad file inserts nothing."""
    kind = app.registry.get(jobs[0].kind)
    if kind.validate is not None:
        for job in jobs:
            await kind.validate(job.payload, app)
    ids: list[int] = []
    async with app.db.transaction() as connection:
        for start in range(0, len(jobs), JSONL_BATCH):
            ids += await app.queue.job_enqueue_many(jobs[start : start + JSONL_BATCH], connection)
    return ids


@cli.command("enqueue")
def enqueue_command(
    kind: Annotated[str, typer.Argument(help="Job kind, e.g. noop, sleep, backfill")],
    payload: Annotated[str | None, typer.Option(help="JSON object")] = None,
    jsonl: Annotated[Path | None, typer.Option(help="File with one JSON payload per line")] = None,
    queue: Annotated[str, typer.Option(help="Queue name")] = "default",
    priority: Annotated[int, typer.Option(help="Higher runs first")] = 0,
    delay: Annotated[float, typer.Option(help="Seconds before the job may run")] = 0.0,
    max_attempts: Annotated[int | None, typer.Option(help="Attempts before failed")] = None,
    dedupe_key: Annotated[str | None, typer.Option(help="At most one unfinished job per key")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the job; exit 0 only if it succeeded")] = False,
) -> None:
    """Enqueue a job (prints its id) or a file of jobs (prints the count)."""
    settings = settings_or_exit()
    if payload is not None and jsonl is not None:
        raise fail("give --payload or --jsonl, not both", 2)
    if delay < 0:
        raise fail(f"--delay must not be negative, got {delay:g}", 2)
    positive("--max-attempts", max_attempts)
    if not queue.strip():
        raise fail("--queue must not be empty", 2)
    try:
        load_registry_kind(kind)
        payloads = read_jsonl(jsonl) if jsonl else [parse_payload(payload or "{}", "--payload")]
    except UsageError as error:
        raise fail(str(error), 2) from None
    if jsonl and (dedupe_key or wait):
        raise fail("--dedupe-key and --wait apply to a single job, not --jsonl", 2)
    jobs = [NewJob(kind, p, queue, priority, delay, max_attempts, dedupe_key) for p in payloads]

    async def body(app: App) -> int:
        if jsonl:
            ids = await enqueue_all(app, jobs)
            stdout.print(len(ids))
            return 0
        kind_ = app.registry.get(kind)
        if kind_.validate is not None:
            await kind_.validate(jobs[0].payload, app)
        job_id, created = await app.queue.job_enqueue(jobs[0])
        print(job_id)
        if not created:
            print(f"deduplicated: job {job_id} with key {dedupe_key!r} is unfinished", file=sys.stderr)
        if wait:
            return 0 if await wait_for_job(app, job_id) == "succeeded" else 1
        return 0

    raise typer.Exit(with_app(settings, body))


def load_registry_kind(kind: str) -> None:
    from runner.plugins import build_registry

    build_registry(load_plugins()).get(kind)


# --- inspect and operate ----------------------------------------------------------------------------
def status_table(counts: list[tuple[str, str, int]]) -> Table:
    table = Table(title="jobs")
    statuses = ["pending", "running", *FINISHED]
    table.add_column("kind")
    for status in statuses:
        table.add_column(status, justify="right")
    by_kind: dict[str, dict[str, int]] = {}
    for kind, status, n in counts:
        by_kind.setdefault(kind, {})[status] = n
    for kind in sorted(by_kind):
        table.add_row(kind, *[str(by_kind[kind].get(s, 0)) for s in statuses])
    return table


def running_table(running: list[dict[str, Any]]) -> Table:
    table = Table(title="running")
    for column in ("id", "kind", "owner", "progress"):
        table.add_column(column)
    table.add_column("done", justify="right")
    for job in running:
        done, total = job["progress_done"], job["progress_total"]
        bar = ProgressBar(total=float(total), completed=float(done), width=30) if total else ""
        label = f"{done:,}/{total:,}" if total else f"{done:,}"
        table.add_row(str(job["id"]), job["kind"], job["lease_owner"] or "", bar, label)
    return table


async def status_snapshot(app: App) -> dict[str, Any]:
    counts = await app.queue.job_counts()
    totals: dict[str, int] = dict.fromkeys(("pending", "running", *FINISHED), 0)
    by_kind: dict[str, dict[str, int]] = {}
    for kind, status, n in counts:
        totals[status] = totals.get(status, 0) + n
        by_kind.setdefault(kind, {})[status] = n
    snapshot: dict[str, Any] = {"jobs": totals, "by_kind": by_kind,
                                "running": await app.queue.job_list_running()}
    for plugin in app.plugins:
        plugin_status = getattr(plugin, "status", None)
        if plugin_status is not None:
            snapshot[plugin.name] = await plugin_status(app)
    return snapshot


async def plugin_status_tables(app: App) -> list[Table]:
    """One table per plugin exposing ``status`` (the same dicts ``status --json`` shows), one level flattened."""
    tables: list[Table] = []
    for plugin in app.plugins:
        status = getattr(plugin, "status", None)
        if status is None:
            continue
        table = Table(title=plugin.name, show_header=False)
        for key, value in (await status(app)).items():
            items = value.items() if isinstance(value, dict) else [("", value)]
            for sub, item in items:
                table.add_row(f"{key} {sub}".strip(), str(item))
        tables.append(table)
    return tables


@cli.command("status")
def status_command(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable")] = False,
    watch: Annotated[bool, typer.Option(help="Refresh until Ctrl-C")] = False,
) -> None:
    """Counts by kind and status, and running jobs with their progress."""
    settings = settings_or_exit()

    async def body(app: App) -> None:
        if as_json:
            print(json.dumps(await status_snapshot(app), default=json_default))
            return
        with Live(console=stdout, auto_refresh=False) as live:
            while True:
                counts = await app.queue.job_counts()
                running = await app.queue.job_list_running()
                grid = Table.grid()
                grid.add_row(status_table(counts))
                grid.add_row(running_table(running))
                for table in await plugin_status_tables(app):  # consensus counts, for example
                    grid.add_row(table)
                live.update(grid, refresh=True)
                if not watch:
                    return
                await asyncio.sleep(1)

    try:
        with_app(settings, body)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


@cli.command("show")
def show_command(
    job_id: int, as_json: Annotated[bool, typer.Option("--json", help="Machine-readable")] = False
) -> None:
    """One job in full."""
    settings = settings_or_exit()
    job = with_app(settings, lambda app: app.queue.job_get(job_id))
    if as_json:
        print(json.dumps(job, default=json_default))
        return
    table = Table(show_header=False)
    for key, value in job.items():
        table.add_row(key, json.dumps(value, default=json_default) if isinstance(value, dict) else str(value))
    stdout.print(table)


@cli.command("cancel")
def cancel_command(job_id: int) -> None:
    """Cancel a job: pending jobs at once, running ones within a second."""
    settings = settings_or_exit()
    status = with_app(settings, lambda app: app.queue.job_request_cancel(job_id))
    stdout.print(f"job {job_id}: {'cancelled' if status == 'cancelled' else 'cancel requested'}")


@cli.command("retry")
def retry_command(job_id: int) -> None:
    """Run a failed or cancelled job again, with its attempts reset."""
    settings = settings_or_exit()
    with_app(settings, lambda app: app.queue.job_retry(job_id))
    stdout.print(f"job {job_id}: pending")


# --- the embedded database --------------------------------------------------------------------------
def embedded(settings: Settings) -> EmbeddedPostgres:
    if settings.database_url is not None:
        raise fail(f"RUNNER_DATABASE_URL is set ({redact_dsn(settings.database_url.get_secret_value())}); "
                   "the embedded database is not in use", 2)
    return EmbeddedPostgres(settings.home)


@db_cli.command("start")
def db_start() -> None:
    """Start the embedded PostgreSQL (initialising it the first time)."""
    try:
        print(embedded(settings_or_exit()).ensure_started())
    except RunnerError as error:
        raise fail(str(error), error.exit_code) from None


@db_cli.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL."""
    try:
        stopped = embedded(settings_or_exit()).stop()
    except RunnerError as error:
        raise fail(str(error), error.exit_code) from None
    stdout.print("stopped" if stopped else "not running")


@db_cli.command("url")
def db_url() -> None:
    """Print the URL of the database runner uses."""
    settings = settings_or_exit()
    if settings.database_url is not None:
        print(redact_dsn(settings.database_url.get_secret_value()))
        return
    try:
        print(EmbeddedPostgres(settings.home).url())
    except RunnerError as error:
        raise fail(str(error), error.exit_code) from None


def load_cli() -> typer.Typer:
    """The CLI with every plugin's commands added."""
    for plugin in load_plugins():
        if plugin.commands is not None:
            plugin.commands(cli)
    return cli


def main() -> None:
    load_cli()()
