"""The ``runner`` command line. Bad input gets one line on stderr: exit 2 for usage, 1 for runtime errors.

Start-up matters here (``runner --help`` and every command pay it): this module imports only typer and the
standard library; settings (pydantic), the pool (asyncpg), logging (structlog) and rich are imported by the
commands that use them, and plugins keep their heavy imports inside their commands and handlers too.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from runner.errors import RunnerError, UsageError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from runner.app import App
    from runner.config import Settings
    from runner.embedded import EmbeddedPostgres
    from runner.queue import JobFilter

T = TypeVar("T")
FINISHED = ("succeeded", "failed", "cancelled")
STATUSES = ("pending", "running", *FINISHED)
WAIT_POLL_S = 0.2
# `enqueue --wait`: how long no live worker may serve the job's queue before it says so (once).
NO_WORKER_NOTICE_S = 3.0
ERROR_LINES = 12  # of a failed job's last_error (its traceback) printed by `enqueue --wait`

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="runner: PostgreSQL-backed jobs and consensus loops on one bounded pool.")
db_cli = typer.Typer(no_args_is_help=True, help="The embedded PostgreSQL (used when RUNNER_DATABASE_URL is unset).")
cli.add_typer(db_cli, name="db")


@cache
def console(stderr: bool = False) -> Console:
    """rich's console (imported on first use: `--help` and most commands never need it)."""
    from rich.console import Console

    return Console(stderr=stderr)


def fail(message: str, code: int) -> typer.Exit:
    from runner.logs import redact

    print(f"error: {redact(message)}", file=sys.stderr)
    return typer.Exit(code)


def settings_or_exit(**overrides: Any) -> Settings:
    from runner.config import SettingsError, load_settings
    from runner.logs import configure_logging
    from runner.plugins import load_plugins, plugin_settings

    try:
        settings = load_settings(plugin_settings=plugin_settings(load_plugins()),
                                 **{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as error:
        raise fail(str(error), 2) from None
    configure_logging(settings.log_format, settings.log_level)
    return settings


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; turn runner's typed errors into one line and an exit code."""
    import asyncio

    import asyncpg

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
    from runner.app import App

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
    console().print("schema is up to date")


@cli.command("worker")
def worker_command(
    concurrency: Annotated[int | None, typer.Option(help="Jobs run at once (RUNNER_CONCURRENCY)")] = None,
    queue: Annotated[list[str] | None, typer.Option("--queue", "-q", help="Queue to serve (repeatable)")] = None,
    drain: Annotated[bool, typer.Option(help="Exit 0 once nothing is runnable or running")] = False,
    app_ref: Annotated[str | None, typer.Option("--app", help="module:attribute of your runner.App (RUNNER_APP)")]
    = None,
) -> None:
    """Run jobs (and the consensus loops) until SIGTERM, or until drained."""
    positive("--concurrency", concurrency)
    settings = settings_or_exit(concurrency=concurrency, queues=queue or None, app=app_ref)
    if settings.http_enabled and settings.dashboard_mount:  # refused before connecting, as `runner dashboard`
        from runner.dashboard import MOUNTED_WHERE, DashboardBindError, auth_from_settings, check_bind

        try:
            check_bind(settings.http_host, auth_from_settings(settings), MOUNTED_WHERE)
        except DashboardBindError as error:
            raise fail(str(error), error.exit_code) from None
    if settings.http_enabled:
        import importlib
        import threading

        # Import the HTTP server's stack in the background while the pool connects. Not a daemon thread:
        # the interpreter joins it before finalizing, and a daemon thread caught mid-import at exit can
        # crash the process.
        threading.Thread(target=importlib.import_module, args=("runner.http",), name="import-http").start()
    from runner.worker import Worker

    async def body(app: App) -> None:
        await Worker(app, drain=drain).run()

    with_app(settings, body, with_resources=True)


# --- enqueue ----------------------------------------------------------------------------------------
def parse_payload(text: str, where: str, max_bytes: int) -> dict[str, Any]:
    """A payload from the command line or a --jsonl line: one clear UsageError for anything bad."""
    from runner.inputs import parse_json_object

    return parse_json_object(text, where, max_bytes)


def read_jsonl(path: Path, max_bytes: int) -> list[dict[str, Any]]:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UsageError(f"--jsonl {path}: {error.strerror}") from None
    payloads = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise UsageError(f"{path} line {number}: not UTF-8 (byte {error.start + 1} of the line)") from None
        if line.strip():
            payloads.append(parse_payload(line, f"{path} line {number}", max_bytes))
    if not payloads:
        raise UsageError(f"--jsonl {path}: no payloads in the file")
    return payloads


async def wait_for_job(app: App, job_id: int, poll_s: float = WAIT_POLL_S) -> str:
    """Wait until the job has finished and return its status. On a TTY, a progress line on stderr; when
    no live worker serves the job's queue for NO_WORKER_NOTICE_S, one line on stderr saying so. A failed or
    cancelled job's last_error (its first lines) is printed on stderr."""
    import asyncio

    loop = asyncio.get_running_loop()
    within_s = app.settings.lease_timeout  # a worker whose heartbeat is older has lost its leases too
    unserved_since: float | None = None
    checked_at = -1.0
    noticed = False
    with WaitProgress(job_id) as show:
        while True:
            job = await app.queue.job_get(job_id)
            show(job)
            if job["status"] in FINISHED:
                break
            now = loop.time()
            if not noticed and job["status"] == "pending" and now - checked_at >= 1.0:
                checked_at = now
                if await app.queue.live_workers_for_queue(job["queue"], within_s):
                    unserved_since = None
                elif unserved_since is None:
                    unserved_since = now
                if unserved_since is not None and now - unserved_since >= NO_WORKER_NOTICE_S:
                    noticed = True  # printed above the progress line (rich redirects stderr while live)
                    print(f"no live worker serves queue {job['queue']!r} (start `runner worker -q {job['queue']}`)",
                          file=sys.stderr, flush=True)
            await asyncio.sleep(poll_s)
    if job["status"] != "succeeded":
        report_failure(job)
    return str(job["status"])


def report_failure(job: dict[str, Any]) -> None:
    from runner.logs import redact

    attempts = f"after {job['attempts']} of {job['max_attempts']} attempts" if job["status"] == "failed" else ""
    lines = redact(job.get("last_error") or "").strip().splitlines() or [""]
    head = f"error: job {job['id']} {job['status']}" + (f" {attempts}" if attempts else "")
    print(f"{head}: {lines[0]}".rstrip(": "), file=sys.stderr)
    shown = lines[1:ERROR_LINES]
    for line in shown:
        print(f"  {line}", file=sys.stderr)
    if len(lines) > ERROR_LINES:
        print(f"  ... ({len(lines) - ERROR_LINES} more lines: runner show {job['id']})", file=sys.stderr)


class WaitProgress:
    """The progress of a waited-for job: a rich line on stderr when it is a terminal, nothing otherwise."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> WaitProgress:
        if sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn(f"job {self.job_id}"), TextColumn("{task.fields[status]}"), BarColumn(),
                TaskProgressColumn(), TextColumn("{task.fields[label]}"), TimeElapsedColumn(),
                console=console(stderr=True), transient=True, refresh_per_second=4,
            )
            self.progress.start()
            self.task = self.progress.add_task("job", total=None, status="pending", label="")
        return self

    def __call__(self, job: dict[str, Any]) -> None:
        if self.progress is None:
            return
        done, total = job["progress_done"], job["progress_total"]
        label = f"{done:,}/{total:,}" if total else (f"{done:,}" if done else "")
        self.progress.update(self.task, completed=done, total=total or None, status=job["status"], label=label)

    def __exit__(self, *_: object) -> None:
        if self.progress is not None:
            self.progress.stop()


@cli.command("enqueue")
def enqueue_command(
    kind: Annotated[str, typer.Argument(help="Job kind, e.g. noop, sleep, backfill")],
    payload: Annotated[str | None, typer.Option(help="JSON object")] = None,
    jsonl: Annotated[Path | None, typer.Option(help="File with one JSON payload per line")] = None,
    queue: Annotated[str | None, typer.Option(help="Queue name (default: the kind's queue, else 'default')")] = None,
    priority: Annotated[int, typer.Option(help="Higher runs first")] = 0,
    delay: Annotated[float, typer.Option(help="Seconds before the job may run")] = 0.0,
    max_attempts: Annotated[int | None, typer.Option(help="Attempts before failed")] = None,
    dedupe_key: Annotated[str | None, typer.Option(help="At most one unfinished job per key")] = None,
    fifo_key: Annotated[str | None, typer.Option(help="Jobs sharing this key run one at a time, in enqueue "
                                                      "order")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the job (progress on a terminal); exit 0 only if it "
                                            "succeeded, else print its error")] = False,
) -> None:
    """Enqueue a job (prints its id) or a file of jobs (prints the count)."""
    settings = settings_or_exit()
    if payload is not None and jsonl is not None:
        raise fail("give --payload or --jsonl, not both", 2)
    try:
        load_registry_kind(kind, settings)
        limit = settings.max_payload_bytes
        payloads = read_jsonl(jsonl, limit) if jsonl else [parse_payload(payload or "{}", "--payload", limit)]
    except UsageError as error:
        raise fail(str(error), 2) from None
    if jsonl and (dedupe_key or wait):
        raise fail("--dedupe-key and --wait apply to a single job, not --jsonl", 2)
    from runner.queue import NewJob

    jobs = [NewJob(kind, p, queue or "", priority, delay, max_attempts, dedupe_key, fifo_key=fifo_key)
            for p in payloads]

    async def body(app: App) -> int:
        # The one enqueue path (runner.App): validated as from the API; a file goes in one transaction.
        enqueued = await app.enqueue_jobs(jobs)
        if jsonl:
            print(len(enqueued))
            return 0
        ((job_id, created),) = enqueued
        print(job_id, flush=True)
        if not created:
            print(f"deduplicated: job {job_id} with key {dedupe_key!r} is unfinished", file=sys.stderr)
        if wait:
            return 0 if await wait_for_job(app, job_id) == "succeeded" else 1
        return 0

    raise typer.Exit(with_app(settings, body))


def load_registry_kind(kind: str, settings: Settings) -> None:
    """Refuse an unknown kind before opening the pool: the installed plugins' kinds and RUNNER_APP's."""
    from runner.plugins import build_registry, load_plugins

    if settings.app:
        from runner.app import load_app

        plugins = load_app(settings.app).all_plugins()
    else:
        plugins = load_plugins()
    build_registry(plugins).get(kind)


# --- inspect ----------------------------------------------------------------------------------------
COUNT_COLUMNS = ("pending", "delayed", "running", *FINISHED)


def count_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts from job_counts_by_queue: totals, by kind, and by queue (each with its kinds). ``pending``
    counts runnable jobs; pending jobs whose run_at is in the future are counted as ``delayed``. ``estimated``
    lists the statuses whose counts are estimates (finished jobs past FINISHED_EXACT_UP_TO, see
    JobQueue.job_counts_by_queue); all other counts are exact."""
    def zero() -> dict[str, int]:
        return dict.fromkeys(COUNT_COLUMNS, 0)

    totals = zero()
    by_kind: dict[str, dict[str, int]] = {}
    by_queue: dict[str, dict[str, Any]] = {}
    estimated = sorted({row["status"] for row in rows if row.get("estimated")})
    for row in rows:
        column = "delayed" if row["delayed"] else row["status"]
        n = int(row["n"])
        queue = by_queue.setdefault(row["queue"], {"jobs": zero(), "by_kind": {}})
        for counts in (totals, by_kind.setdefault(row["kind"], zero()), queue["jobs"],
                       queue["by_kind"].setdefault(row["kind"], zero())):
            counts[column] = counts.get(column, 0) + n
    return {"jobs": totals, "by_kind": by_kind, "by_queue": by_queue, "estimated": estimated}


def status_table(counts: dict[str, Any]) -> Table:
    from rich.table import Table

    title = "jobs (delayed: pending with run_at in the future)"
    if counts.get("estimated"):
        title += f"; estimated: {', '.join(counts['estimated'])}"
    table = Table(title=title)
    table.add_column("queue")
    table.add_column("kind")
    for column in COUNT_COLUMNS:
        table.add_column(column, justify="right")
    for queue in sorted(counts["by_queue"]):
        kinds = counts["by_queue"][queue]["by_kind"]
        for kind in sorted(kinds):
            table.add_row(queue, kind, *[f"{kinds[kind].get(c, 0):,}" for c in COUNT_COLUMNS])
    if len(counts["by_queue"]) > 1 or any(len(q["by_kind"]) > 1 for q in counts["by_queue"].values()):
        table.add_row("all", "", *[f"{counts['jobs'][c]:,}" for c in COUNT_COLUMNS], style="bold")
    return table


def running_table(running: list[dict[str, Any]]) -> Table:
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    table = Table(title="running")
    for column in ("id", "kind", "owner", "progress"):
        table.add_column(column)
    for column in ("done", "per s", "ETA s"):
        table.add_column(column, justify="right")
    for job in running:
        done, total = job["progress_done"], job["progress_total"]
        bar = ProgressBar(total=float(total), completed=float(done), width=30) if total else ""
        label = f"{done:,}/{total:,}" if total else f"{done:,}"
        rate, eta = job.get("rate_per_s"), job.get("eta_s")
        table.add_row(str(job["id"]), job["kind"], job["lease_owner"] or "", bar, label,
                      "" if rate is None else f"{rate:,.0f}", "" if eta is None else f"{eta:,.0f}")
    return table


def with_rates(running: list[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
    """Each running job with its rate since its attempt started and its ETA (None where unknown)."""
    rated = []
    for job in running:
        rate = progress_rate({**job, "status": "running"}, now)
        rated.append({**job, "rate_per_s": None if rate is None else round(rate[0], 1),
                      "eta_s": None if rate is None or rate[1] is None else round(rate[1], 1)})
    return rated


async def status_snapshot(app: App) -> dict[str, Any]:
    snapshot: dict[str, Any] = {**count_rows(await app.queue.job_counts_by_queue()),
                                "running": with_rates(await app.queue.job_list_running(), await app.queue.clock()),
                                "schedules": await app.list_schedules()}
    for plugin in app.plugins:
        plugin_status = getattr(plugin, "status", None)
        if plugin_status is not None:
            snapshot[plugin.name] = await plugin_status(app)
    return snapshot


async def plugin_status_tables(app: App) -> list[Table]:
    """One table per plugin exposing ``status`` (the same dicts ``status --json`` shows), one level flattened."""
    from rich.table import Table

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
    """Counts by queue, kind and status (delayed jobs apart from runnable ones), and running jobs."""
    settings = settings_or_exit()

    async def body(app: App) -> None:
        if as_json:
            print(json.dumps(await status_snapshot(app), default=json_default))
            return
        import asyncio

        from rich.live import Live
        from rich.table import Table

        with Live(console=console(), auto_refresh=False) as live:
            while True:
                counts = count_rows(await app.queue.job_counts_by_queue())
                running = await app.queue.job_list_running()
                grid = Table.grid()
                grid.add_row(status_table(counts))
                grid.add_row(running_table(running))
                schedules = await app.list_schedules()
                if schedules:
                    from runner.schedule_cli import schedules_table

                    grid.add_row(schedules_table(schedules))
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
    """One job in full, with the jobs it made (a parallel backfill's chunks) and, while it runs, its rate."""
    settings = settings_or_exit()

    async def read(app: App) -> tuple[dict[str, Any], list[dict[str, Any]], datetime]:
        return (await app.queue.job_get(job_id), await app.queue.job_children(job_id),
                await app.queue.clock())

    job, children, now = with_app(settings, read)
    rate = progress_rate(job, now)
    if as_json:
        print(json.dumps({**job, **({"rows_per_s": rate[0], "eta_s": rate[1]} if rate else {}),
                          "children": [child_summary(c) for c in children]}, default=json_default))
        return
    from rich.table import Table

    table = Table(show_header=False)
    for key, value in job.items():
        table.add_row(key, json.dumps(value, default=json_default) if isinstance(value, dict) else str(value))
    if rate:
        table.add_row("rate", f"{rate[0]:,.0f} per second" + (f", ETA {rate[1]:,.0f} s" if rate[1] is not None else ""))
    console().print(table)
    if children:
        console().print(children_table(children))


def progress_rate(job: dict[str, Any], now: datetime) -> tuple[float, float | None] | None:
    """A running job's (items per second since this attempt started, seconds left) from its progress."""
    started = job.get("started_at")
    if job["status"] != "running" or started is None or not job["progress_done"]:
        return None
    elapsed = (now - started).total_seconds()
    if elapsed <= 0:
        return None
    rate = job["progress_done"] / elapsed
    total = job["progress_total"]
    return rate, (max(0, total - job["progress_done"]) / rate if total is not None else None)


def child_summary(child: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "kind", "status", "attempts", "recoveries", "progress_done", "progress_total", "lease_owner",
            "started_at", "finished_at", "last_error")
    chunk = (child.get("payload") or {}).get("chunk") if isinstance(child.get("payload"), dict) else None
    return {**{k: child[k] for k in keys}, **({"chunk": chunk} if chunk else {})}


def children_table(children: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    table = Table(title=f"{len(children)} jobs made by this one")
    for column in ("id", "status", "range", "progress", "attempts", "owner", "last error"):
        table.add_column(column)
    for child in children:
        chunk = child_summary(child).get("chunk") or {}
        bounds = [f"> {chunk['after']}" if chunk.get("after") is not None else "",
                  f"<= {chunk['upto']}" if chunk.get("upto") is not None else ""]
        total = child["progress_total"]
        table.add_row(str(child["id"]), child["status"], " ".join(b for b in bounds if b) or "-",
                      f"{child['progress_done']:,}" + (f" / {total:,}" if total is not None else ""),
                      str(child["attempts"]), child["lease_owner"] or "", short(child["last_error"], 40))
    return table


# Filters shared by list, cancel, retry and purge (each repeatable; several values of one: any of them).
StatusOption = Annotated[list[str] | None, typer.Option(
    "--status", "-s", help=f"Only jobs with this status ({', '.join(STATUSES)}; repeatable)")]
KindOption = Annotated[list[str] | None, typer.Option("--kind", "-k", help="Only jobs of this kind (repeatable)")]
QueueOption = Annotated[list[str] | None, typer.Option("--queue", "-q", help="Only jobs in this queue (repeatable)")]


def job_filter(status: list[str] | None, kind: list[str] | None, queue: list[str] | None) -> JobFilter:
    from runner.queue import JobFilter

    try:
        return JobFilter(tuple(status or ()), tuple(kind or ()), tuple(queue or ()))
    except UsageError as error:
        raise fail(str(error), 2) from None


def short(text: str | None, width: int = 60) -> str:
    line = (text or "").strip().split("\n", 1)[0]
    return line if len(line) <= width else line[: width - 1] + "…"


def list_table(jobs: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    table = Table()
    for column, justify in (("id", "right"), ("kind", "left"), ("queue", "left"), ("status", "left"),
                            ("attempts", "right"), ("progress", "right"), ("created", "left"),
                            ("last error", "left")):
        # Narrow terminals (and pipes: 80 columns unless COLUMNS says more) cut the error, not the rest.
        table.add_column(column, justify=justify, no_wrap=True,  # type: ignore[arg-type]
                         overflow="ellipsis" if column == "last error" else "fold")
    for job in jobs:
        done, total = job["progress_done"], job["progress_total"]
        progress = f"{done:,}/{total:,}" if total else (f"{done:,}" if done else "")
        status = job["status"]
        if job["cancel_requested"] and status == "running":
            status = "running (cancelling)"
        table.add_row(str(job["id"]), job["kind"], job["queue"], status, f"{job['attempts']}/{job['max_attempts']}",
                      progress, f"{job['created_at']:%Y-%m-%d %H:%M:%S}", short(job["last_error"]))
    return table


@cli.command("list")
def list_command(
    status: StatusOption = None,
    kind: KindOption = None,
    queue: QueueOption = None,
    limit: Annotated[int, typer.Option(help="Jobs per page")] = 50,
    before_id: Annotated[int | None, typer.Option(help="Only jobs with a smaller id (the next page)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable")] = False,
) -> None:
    """Jobs, newest first, a page at a time (it prints how to get the next page)."""
    positive("--limit", limit)
    settings = settings_or_exit()
    where = job_filter(status, kind, queue)

    async def body(app: App) -> list[dict[str, Any]]:
        return await app.queue.job_list(where, limit=limit + 1, before_id=before_id)

    jobs = with_app(settings, body)
    more, jobs = len(jobs) > limit, jobs[:limit]
    next_before_id = jobs[-1]["id"] if more else None
    if as_json:
        print(json.dumps({"jobs": jobs, "next_before_id": next_before_id}, default=json_default))
        return
    if not jobs:
        print("no jobs" + (" match" if where.statuses or where.kinds or where.queues else ""))
        return
    console().print(list_table(jobs))
    if next_before_id is not None:
        flags = [f"--{name} {value}" for name, values in (("status", status), ("kind", kind), ("queue", queue))
                 for value in values or ()]
        if limit != 50:
            flags.append(f"--limit {limit}")
        print(f"next page: runner list {' '.join([*flags, f'--before-id {next_before_id}'])}")


def single_or_filter(
    command: str, job_id: int | None, status: list[str] | None, kind: list[str] | None, queue: list[str] | None
) -> JobFilter | None:
    """None for the one-job form; the filter for the bulk form (at least one filter, and not with an id)."""
    has_filter = bool(status or kind or queue)
    if job_id is not None and has_filter:
        raise fail(f"give `runner {command}` a job id or filters (--status, --kind, --queue), not both", 2)
    if job_id is None and not has_filter:
        raise fail(f"give `runner {command}` a job id, or at least one of --status, --kind, --queue", 2)
    return job_filter(status, kind, queue) if has_filter else None


@cli.command("cancel")
def cancel_command(
    job_id: Annotated[int | None, typer.Argument(help="The job (or use filters for many)")] = None,
    status: StatusOption = None,
    kind: KindOption = None,
    queue: QueueOption = None,
) -> None:
    """Cancel a job, or all pending and running ones matching filters (running ones stop within a second)."""
    where = single_or_filter("cancel", job_id, status, kind, queue)
    settings = settings_or_exit()
    if where is not None:
        n = with_app(settings, lambda app: app.queue.job_cancel_where(where))
        print(f"{n} job{'s' if n != 1 else ''} cancelled or asked to stop")
        return
    assert job_id is not None
    status_ = with_app(settings, lambda app: app.queue.job_request_cancel(job_id))
    console().print(f"job {job_id}: {'cancelled' if status_ == 'cancelled' else 'cancel requested'}")


@cli.command("retry")
def retry_command(
    job_id: Annotated[int | None, typer.Argument(help="The job (or use filters for many)")] = None,
    status: StatusOption = None,
    kind: KindOption = None,
    queue: QueueOption = None,
) -> None:
    """Run a failed or cancelled job again, or every one matching the filters, with attempts reset."""
    where = single_or_filter("retry", job_id, status, kind, queue)
    settings = settings_or_exit()
    if where is not None:
        n = with_app(settings, lambda app: app.queue.job_retry_where(where))
        print(f"{n} job{'s' if n != 1 else ''} pending again")
        return
    assert job_id is not None
    with_app(settings, lambda app: app.queue.job_retry(job_id))
    console().print(f"job {job_id}: pending")


@cli.command("purge")
def purge_command(
    status: Annotated[list[str], typer.Option(
        "--status", "-s", help="succeeded, failed or cancelled (repeatable; required)")],
    kind: KindOption = None,
    queue: QueueOption = None,
    older_than: Annotated[float, typer.Option(help="Only jobs finished at least this many seconds ago")] = 0.0,
) -> None:
    """Delete finished jobs (never pending or running ones), in batches; prints how many went."""
    if older_than < 0:
        raise fail(f"--older-than must not be negative, got {older_than:g}", 2)
    where = job_filter(status, kind, queue)
    refused = [s for s in where.statuses if s not in FINISHED]
    if refused:
        raise fail(f"--status {refused[0]}: only finished jobs ({', '.join(FINISHED)}) can be purged", 2)
    settings = settings_or_exit()
    n = with_app(settings, lambda app: app.queue.job_purge_where(where, older_than))
    print(f"{n} job{'s' if n != 1 else ''} deleted")


# --- dashboard --------------------------------------------------------------------------------------
@cli.command("dashboard")
def dashboard_command(
    host: Annotated[str | None, typer.Option(help="Address to listen on (RUNNER_DASHBOARD_HOST, 127.0.0.1); "
                                                  "any other than loopback needs authentication")] = None,
    port: Annotated[int | None, typer.Option(help="Port (RUNNER_DASHBOARD_PORT, 9188; 0: a free one)")] = None,
    read_only: Annotated[bool, typer.Option("--read-only", help="Hide and refuse every action "
                                                                "(RUNNER_DASHBOARD_READ_ONLY)")] = False,
) -> None:
    """The web dashboard for operators: jobs, workers, backfills, schedules and consensus, live."""
    settings = settings_or_exit(dashboard_host=host, dashboard_port=port)
    # aiohttp and Jinja2: only here
    from runner.dashboard import DashboardBindError, auth_from_settings, check_bind, serve

    auth = auth_from_settings(settings)
    try:
        check_bind(settings.dashboard_host, auth)
    except DashboardBindError as error:
        raise fail(str(error), error.exit_code) from None
    mode = read_only or settings.dashboard_read_only
    with_app(settings, lambda app: serve(app, settings.dashboard_host, settings.dashboard_port, auth, mode))


# --- the embedded database --------------------------------------------------------------------------
def embedded(settings: Settings) -> EmbeddedPostgres:
    from runner.embedded import EmbeddedPostgres
    from runner.logs import redact_dsn

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
    print("stopped" if stopped else "not running")


@db_cli.command("url")
def db_url() -> None:
    """Print the URL of the database runner uses."""
    settings = settings_or_exit()
    from runner.embedded import EmbeddedPostgres
    from runner.logs import redact_dsn

    if settings.database_url is not None:
        print(redact_dsn(settings.database_url.get_secret_value()))
        return
    try:
        server = EmbeddedPostgres(settings.home)
        print(server.url())
        print(server.describe(), file=sys.stderr)  # where it lives: every folder reaches this one
    except RunnerError as error:
        raise fail(str(error), error.exit_code) from None


def load_cli() -> typer.Typer:
    """The CLI with every plugin's commands added (plugins keep their heavy imports inside the commands)."""
    from runner.plugins import load_plugins
    from runner.schedule_cli import register

    register(cli)
    for plugin in load_plugins():
        if plugin.commands is not None:
            plugin.commands(cli)
    return cli


def main() -> None:
    from runner._entry import main as entry

    entry()
