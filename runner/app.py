"""``runner.App``: an application's job kinds, its one pool, and the client API (enqueue, get, list, wait).

One ``App`` per process. Declare kinds with ``@app.job``; ``async with app:`` opens the pool (and nothing
else: the embedded server only with ``embedded=True``, as the CLI does); ``runner worker --app module:app``
runs the kinds of that very object. Every enqueue (this API, the CLI, the backfill command) goes through
:meth:`App.enqueue_jobs`, so every one is validated the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from runner.config import Settings, load_settings
from runner.config.settings import INT32_MAX
from runner.errors import AppNotOpen, PayloadError, RunnerError, ScheduleError, UsageError, WaitTimeout
from runner.inputs import json_text
from runner.job import Job
from runner.logs import get_logger, redact_dsn
from runner.plugins import JobKind, Plugin, Registry, build_registry, load_plugins, plugin_settings
from runner.policy import Backoff
from runner.queue import JobQueue, NewJob

if TYPE_CHECKING:
    from runner.db import Database
    from runner.schedules import ScheduleSpec, ScheduleStore

log = get_logger("runner.app")
H = TypeVar("H", bound=Callable[..., Awaitable[Any]])

MAX_QUEUE_CHARS = 128
MAX_DEDUPE_KEY_CHARS = 1000  # far below the unique index's row limit (~2.7 kB)
ENQUEUE_BATCH = 1000  # rows per INSERT statement of a bulk enqueue
MAX_DELAY_S = 100 * 365 * 24 * 3600.0  # a century: past it, the timestamp arithmetic overflows


def database_url(settings: Settings, *, embedded: bool) -> str:
    """RUNNER_DATABASE_URL, or the embedded default (started on first use). Blocking: not for the loop."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    if not embedded:
        raise UsageError("RUNNER_DATABASE_URL is not set: pass App(database_url=...) or set the variable "
                         "(App(embedded=True) starts runner's embedded PostgreSQL instead)")
    from runner.embedded import EmbeddedPostgres  # the embedded server is an extra: imported when used

    return EmbeddedPostgres(settings.home).ensure_started()


@dataclass
class _Opened:
    dsn: str
    db: Database
    queue: JobQueue
    plugins: list[Plugin]
    registry: Registry


class App:
    """An application's runner: its job kinds, settings, pool and the client API.

    ``App(**overrides)`` takes any setting by name (``App(database_url=..., concurrency=20)``); the
    ``RUNNER_*`` environment fills the rest. Under the CLI (``runner worker --app``), the environment and
    the command's flags take precedence over these keyword overrides.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        name: str | None = None,
        migrations: str | Path | None = None,
        embedded: bool = False,
        entry_points: bool = True,
        **overrides: Any,
    ) -> None:
        self.name = name or "app"
        self.migrations = Path(migrations) if migrations is not None else None
        self.embedded = embedded  # start the embedded PostgreSQL when RUNNER_DATABASE_URL is unset
        self.entry_points = entry_points  # also load the installed plugins' kinds (backfill, ...)
        self._settings = settings
        self._overrides = overrides
        self._kinds: dict[str, JobKind] = {}
        self._schedules: dict[str, ScheduleSpec] = {}
        self._opened: _Opened | None = None
        self._opening = asyncio.Lock()
        # Process-wide resources opened by plugins (the shared AsyncWeb3 lives under "chain").
        self.resources: dict[str, Any] = {}

    def __repr__(self) -> str:
        state = "open" if self._opened else "closed"
        return f"<runner.App {self.name!r} {state}, kinds={sorted(self._kinds)}>"

    # --- declaring kinds ----------------------------------------------------------------------------
    def job(
        self,
        name: str,
        *,
        queue: str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        retry_backoff: Backoff | None = None,
        validate: Callable[[dict[str, Any]], Any] | None = None,
    ) -> Callable[[H], H]:
        """Declare a job kind: ``@app.job("send_note", queue="mail", max_attempts=3, timeout=30)``.

        The handler is ``async def handler(ctx: runner.JobContext)``; what it returns (JSON) is stored as
        the job's result. ``validate(payload)`` runs at every enqueue (and again before the handler) and
        raises ``runner.PayloadError`` (or ``ValueError``) for a payload the handler cannot run.
        """
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise ValueError(f"job kind name must be a non-empty string of at most 200 characters, got {name!r}")
        if queue is not None:
            check_queue_name(queue)

        def register(handler: H) -> H:
            _require_async(name, handler)
            if name in self._kinds:
                raise ValueError(f"job kind {name!r} declared twice")
            self._kinds[name] = JobKind(
                name, handler, _payload_validator(name, validate), timeout_s=timeout, max_attempts=max_attempts,
                retry_backoff=retry_backoff, queue=queue)
            return handler

        return register

    @property
    def kinds(self) -> dict[str, JobKind]:
        """The kinds this app declared (the worker adds the installed plugins' kinds)."""
        return dict(self._kinds)

    def sibling(self) -> App:
        """A closed App with this one's kinds, migrations and keyword overrides (a pool of its own)."""
        twin = App(self._settings, name=self.name, migrations=self.migrations, embedded=self.embedded,
                   entry_points=self.entry_points, **self._overrides)
        twin._kinds = dict(self._kinds)
        twin._schedules = dict(self._schedules)
        return twin

    # --- periodic jobs -------------------------------------------------------------------------------
    def periodic(
        self,
        name: str,
        *,
        kind: str | None = None,
        cron: str | None = None,
        every: float | None = None,
        timezone: str | None = None,
        payload: dict[str, Any] | None = None,
        queue: str | None = None,
        priority: int = 0,
        missed: str = "skip",
        missed_limit: int = 10,
    ) -> Callable[[H], H]:
        """Declare a schedule: ``app.periodic("nightly", kind="report", cron="0 3 * * *", timezone="Europe/Berlin")``
        enqueues a ``report`` job at 03:00 Berlin time every day; ``every=60`` instead, once a minute.

        Workers store the declared schedules when they start (a redeploy updates them; a pause set with
        ``runner schedule pause`` is kept). Used as a decorator without ``kind``, it also declares the
        handler as the kind ``name``. ``missed``: ``"skip"`` (one job for ticks missed while no worker ran)
        or ``"run-all"`` (one per missed tick, the newest ``missed_limit``). Bad rules raise
        ``runner.ScheduleError`` here, at declaration.
        """
        from runner.schedules import make_spec

        spec = make_spec(name, kind or name, cron=cron, every=every, timezone=timezone, payload=payload,
                         queue=queue, priority=priority, missed=missed, missed_limit=missed_limit)
        if queue is not None:
            check_queue_name(queue)
        if name in self._schedules:
            raise ScheduleError(f"schedule {name!r} declared twice")
        self._schedules[name] = spec

        def register(handler: H) -> H:
            return self.job(spec.kind)(handler)

        return register

    @property
    def schedules(self) -> dict[str, ScheduleSpec]:
        """The schedules this app declared in code."""
        return dict(self._schedules)

    async def checked_schedule(self, spec: ScheduleSpec) -> ScheduleSpec:
        """The schedule with its kind known, its payload validated as an enqueue would, its queue resolved."""
        job, _ = await self._checked(NewJob(spec.kind, spec.payload, spec.queue or "", spec.priority))
        return dataclasses.replace(spec, queue=job.queue)

    @property
    def schedule_store(self) -> ScheduleStore:
        from runner.schedules import ScheduleStore

        return ScheduleStore(self.db, self.queue.max_attempts_for)

    async def add_schedule(
        self,
        name: str,
        kind: str,
        *,
        cron: str | None = None,
        every: float | None = None,
        timezone: str | None = None,
        payload: dict[str, Any] | None = None,
        queue: str | None = None,
        priority: int = 0,
        missed: str = "skip",
        missed_limit: int = 10,
    ) -> dict[str, Any]:
        """Store a schedule (as ``runner schedule add`` does); ``runner.ScheduleError`` if the name is taken
        or the rule is bad, ``runner.UnknownKind`` / ``runner.PayloadError`` as an enqueue would."""
        from runner.schedules import make_spec

        spec = await self.checked_schedule(make_spec(
            name, kind, cron=cron, every=every, timezone=timezone, payload=payload, queue=queue,
            priority=priority, missed=missed, missed_limit=missed_limit))
        if not await self.schedule_store.insert(spec):
            raise ScheduleError(f"a schedule named {name!r} exists (`runner schedule remove {name}` first)")
        found = await self.schedule_store.get(name)
        assert found is not None
        return found

    async def list_schedules(self) -> list[dict[str, Any]]:
        return await self.schedule_store.all()

    async def pause_schedule(self, name: str, paused: bool = True) -> None:
        """Pause (or, with ``paused=False``, resume: from the next tick after now) a schedule."""
        if not await self.schedule_store.set_paused(name, paused):
            raise _no_schedule(name)

    async def remove_schedule(self, name: str) -> None:
        if not await self.schedule_store.remove(name):
            raise _no_schedule(name)

    async def run_schedule(self, name: str) -> int:
        """Enqueue the schedule's job now, outside its ticks; the job's id."""
        job_id = await self.schedule_store.run_now(name)
        if job_id is None:
            raise _no_schedule(name)
        return job_id

    @property
    def plugin(self) -> Plugin:
        return Plugin(name=self.name, kinds=tuple(self._kinds.values()), migrations=self.migrations)

    # --- settings and lifecycle --------------------------------------------------------------------
    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(plugin_settings=plugin_settings(self.all_plugins()), **self._overrides)
        return self._settings

    def configure(self, settings: Settings) -> None:
        """Use the CLI's settings; this app's keyword overrides fill what the environment and flags left unset."""
        if self._opened is not None:
            raise UsageError("the app is already open; configure it before opening")
        if self._overrides:
            given = {name: getattr(settings, name) for name in settings.model_fields_set}
            settings = load_settings(plugin_settings=plugin_settings(self.all_plugins()),
                                     **{**self._overrides, **given})
        self._settings = settings

    @classmethod
    async def open(cls, settings: Settings, *, with_resources: bool = False) -> App:
        """The CLI's way in: the app named by RUNNER_APP (or a bare one), with the embedded server allowed."""
        app = load_app(settings.app) if settings.app else cls(settings)
        if app.is_open:  # a second pool in the same process (tests do this): the same kinds, its own pool
            app = app.sibling()
        app.configure(settings)
        app.embedded = True
        await app.connect(with_resources=with_resources)
        return app

    async def connect(self, *, with_resources: bool = False) -> App:
        """Open the pool (idempotent); ``async with app`` calls this. ``with_resources`` also opens what the
        plugins share process-wide (the chain), as a worker does."""
        async with self._opening:
            if self._opened is None:
                self._opened = await self._open_pool()
        if with_resources:
            try:
                await self.open_resources()
            except BaseException:
                await self.close()
                raise
        return self

    async def _open_pool(self) -> _Opened:
        from runner.db import Database  # asyncpg and tenacity: imported when a pool is opened

        settings = self.settings
        _configure_logging_once(settings)
        dsn = await asyncio.to_thread(database_url, settings, embedded=self.embedded)
        db = Database.for_runner(settings, dsn)
        budget = settings.pool_budget()
        log.debug("opening pool", database=redact_dsn(dsn), pool_min=budget.min_size, pool_max=budget.max_size,
                  derived=budget.derived, formula=budget.formula(), db_max_connections=budget.db_max_connections,
                  worker_replicas=budget.worker_replicas)
        plugins = self.all_plugins()
        registry = build_registry(plugins)
        await db.open(settings.db_connect_timeout)
        queue = JobQueue(db, max_attempts_for=lambda kind: registry.max_attempts(kind, settings.default_max_attempts))
        return _Opened(dsn, db, queue, plugins, registry)

    def all_plugins(self) -> list[Plugin]:
        plugins = load_plugins() if self.entry_points else []
        if self._kinds or self.migrations is not None:
            plugins.append(self.plugin)
        return plugins

    async def open_resources(self) -> None:
        for plugin in self.plugins:
            if plugin.open_resources is not None:
                await plugin.open_resources(self)

    async def close(self) -> None:
        opened, self._opened = self._opened, None
        if opened is None:
            return
        for plugin in reversed(opened.plugins):
            if plugin.close_resources is not None:
                try:
                    await plugin.close_resources(self)
                except Exception as error:  # closing must go on for the others
                    log.warning("closing plugin resources failed", plugin=plugin.name, error=repr(error))
        self.resources.clear()
        await opened.db.close()

    async def __aenter__(self) -> App:
        return await self.connect()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def _state(self) -> _Opened:
        if self._opened is None:
            raise AppNotOpen("the app is not open: use `async with app:` (or `await app.connect()`) first")
        return self._opened

    @property
    def is_open(self) -> bool:
        return self._opened is not None

    @property
    def dsn(self) -> str:
        return self._state().dsn

    @property
    def db(self) -> Database:
        return self._state().db

    @property
    def queue(self) -> JobQueue:
        return self._state().queue

    @property
    def plugins(self) -> list[Plugin]:
        return self._state().plugins

    @property
    def registry(self) -> Registry:
        return self._state().registry

    @classmethod
    def assemble(cls, settings: Settings, dsn: str, db: Database, queue: JobQueue, plugins: list[Plugin],
                 registry: Registry) -> App:
        """An open app from parts someone else opened (tests that share a pool or inject faults)."""
        app = cls(settings)
        app._opened = _Opened(dsn, db, queue, plugins, registry)
        return app

    # --- enqueue --------------------------------------------------------------------------------------
    async def enqueue(
        self,
        kind: str,
        payload: dict[str, Any] | None = None,
        *,
        queue: str | None = None,
        priority: int = 0,
        delay: float = 0.0,
        max_attempts: int | None = None,
        dedupe_key: str | None = None,
        fifo_key: str | None = None,
        connection: Any = None,
    ) -> int:
        """Enqueue one job and return its id (with a ``dedupe_key`` already unfinished: that job's id).

        ``fifo_key``: jobs that share it run one at a time, in enqueue order, whichever workers run them
        (jobs with other keys, or none, run alongside). ``connection``: an asyncpg connection, a SQLAlchemy
        ``AsyncConnection`` or ``AsyncSession``; the job then exists if and only if that transaction
        commits, and workers are woken when it does.
        """
        job = NewJob(kind, {} if payload is None else payload, queue or "", priority, delay, max_attempts, dedupe_key,
                     fifo_key=fifo_key)
        ((job_id, _created),) = await self.enqueue_jobs([job], connection=connection)
        return job_id

    async def enqueue_many(
        self,
        kind: str,
        payloads: Sequence[dict[str, Any]],
        *,
        queue: str | None = None,
        priority: int = 0,
        delay: float = 0.0,
        max_attempts: int | None = None,
        fifo_key: str | None = None,
        connection: Any = None,
    ) -> list[int]:
        """Enqueue many jobs of one kind in one transaction (all or none); returns their ids in order.
        With ``fifo_key`` they run one at a time, in this order."""
        jobs = [NewJob(kind, p, queue or "", priority, delay, max_attempts, fifo_key=fifo_key) for p in payloads]
        return [job_id for job_id, _ in await self.enqueue_jobs(jobs, connection=connection)]

    async def enqueue_jobs(self, jobs: Sequence[NewJob], *, connection: Any = None) -> list[tuple[int, bool]]:
        """The one enqueue path: validate every job, then insert them all in one transaction.

        Returns ``(id, created)`` per job; ``created`` is False where a dedupe key matched an unfinished job.
        """
        if not jobs:
            return []
        checked = [await self._checked(job) for job in jobs]
        raw = await _asyncpg_connection(connection) if connection is not None else None
        if raw is not None:
            return await self._insert(checked, raw)
        async with self.db.transaction() as own:
            return await self._insert(checked, own)

    async def _insert(self, checked: list[tuple[NewJob, str]], connection: Any) -> list[tuple[int, bool]]:
        jobs = [job for job, _ in checked]
        encoded = [text for _, text in checked]  # encoded once, by the checks
        if all(job.dedupe_key is None and not job.coalesce for job in jobs):
            ids: list[int] = []
            for start in range(0, len(jobs), ENQUEUE_BATCH):  # bounded statements, one transaction
                end = start + ENQUEUE_BATCH
                ids += await self.queue.job_enqueue_many(jobs[start:end], connection, encoded[start:end])
            return [(job_id, True) for job_id in ids]
        # Keys: one statement per job, so each deduplicated or coalesced one can report the job it joined.
        return [await self.queue.job_enqueue_in(connection, job, text) for job, text in checked]

    async def _checked(self, job: NewJob) -> tuple[NewJob, str]:
        """The job with its queue resolved, and its payload as the JSON text the insert sends."""
        kind = self.registry.get(job.kind)  # UnknownKind (a UsageError) names the known kinds
        queue = job.queue or kind.queue or "default"
        check_queue_name(queue)
        text = check_new_job(job, self.settings.max_payload_bytes)
        if kind.validate is not None:
            await kind.validate(job.payload, self)
        return dataclasses.replace(job, queue=queue), text

    # --- read and operate ----------------------------------------------------------------------------
    async def get(self, job_id: int) -> Job:
        """The job with this id (``runner.JobNotFound`` if there is none)."""
        return Job.from_row(await self.queue.job_get(job_id))

    async def list(
        self,
        *,
        status: str | Sequence[str] = (),
        kind: str | Sequence[str] = (),
        queue: str | Sequence[str] = (),
        limit: int = 50,
        before_id: int | None = None,
    ) -> list[Job]:
        """Jobs newest first, filtered; page on with ``before_id=page[-1].id``."""
        from runner.queue import JobFilter

        where = JobFilter(_names(status), _names(kind), _names(queue))
        rows = await self.queue.job_list(where, limit=limit, before_id=before_id)
        return [Job.from_row(row) for row in rows]

    async def cancel(self, job_id: int) -> str:
        """Cancel a job: a pending one at once (returns ``"cancelled"``), a running one within about a
        second (returns ``"running"``: its worker has been asked to stop)."""
        return await self.queue.job_request_cancel(job_id)

    async def retry(self, job_id: int) -> None:
        """Run a failed or cancelled job again, its attempts reset."""
        await self.queue.job_retry(job_id)

    # `timeout=` rather than asyncio.timeout(): callers read it as part of what they wait for.
    async def wait(self, job_id: int, *, timeout: float | None = None, poll: float = 0.2) -> Job:  # noqa: ASYNC109
        """Wait until the job has finished (succeeded, failed or cancelled) and return it.

        Raises ``runner.WaitTimeout`` after ``timeout`` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = min(poll, 0.05)
        while True:
            job = await self.get(job_id)
            if job.finished:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id} is still {job.status} after {timeout:g}s")
            await asyncio.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
            interval = min(poll, interval * 2)


# --- validation shared by every enqueue ---------------------------------------------------------------
def check_queue_name(queue: str) -> None:
    if not isinstance(queue, str) or not queue.strip():
        raise UsageError("a queue name must be a non-empty string")
    if len(queue) > MAX_QUEUE_CHARS:
        raise UsageError(f"a queue name has at most {MAX_QUEUE_CHARS} characters, got {len(queue)}")
    if any(ord(c) < 32 or ord(c) == 127 for c in queue):
        raise UsageError(f"a queue name must not contain control characters, got {queue!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_key(key: object, name: str) -> None:
    """A job's dedupe or fifo key: None, or a non-empty string of at most MAX_DEDUPE_KEY_CHARS."""
    if key is not None and (not isinstance(key, str) or not key or len(key) > MAX_DEDUPE_KEY_CHARS):
        raise UsageError(f"a {name} key is a non-empty string of at most {MAX_DEDUPE_KEY_CHARS} characters")


def check_new_job(job: NewJob, max_payload_bytes: int = 1 << 20) -> str:
    """What the database would refuse, refused first with one clear line (nothing is written).
    Returns the payload as the JSON text to insert."""
    if not isinstance(job.payload, dict):
        raise UsageError(f"the payload must be a JSON object (a dict), got {type(job.payload).__name__}")
    if not _is_int(job.priority) or not -INT32_MAX - 1 <= job.priority <= INT32_MAX:
        raise UsageError(f"priority must be an integer between {-INT32_MAX - 1} and {INT32_MAX}, got {job.priority!r}")
    if job.max_attempts is not None and (not _is_int(job.max_attempts) or not 1 <= job.max_attempts <= INT32_MAX):
        raise UsageError(f"max_attempts must be an integer between 1 and {INT32_MAX}, got {job.max_attempts!r}")
    delay = job.delay_s
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not math.isfinite(delay) \
            or not 0 <= delay <= MAX_DELAY_S:
        raise UsageError(f"delay must be a number of seconds between 0 and {MAX_DELAY_S:g}, got {delay!r}")
    check_key(job.dedupe_key, "dedupe")
    check_key(job.fifo_key, "fifo")
    if job.coalesce and (job.fifo_key is None or job.dedupe_key is not None):
        raise UsageError("coalesce needs a fifo_key, and no dedupe_key: it joins the key's waiting job")
    return json_text(job.payload, max_payload_bytes)


def _payload_validator(name: str, validate: Callable[[dict[str, Any]], Any] | None) -> Any:
    if validate is None:
        return None

    async def check(payload: dict[str, Any], _app: App) -> None:
        try:
            outcome = validate(payload)
            if asyncio.iscoroutine(outcome):
                await outcome
        except RunnerError:
            raise
        except (ValueError, TypeError, KeyError) as error:
            raise PayloadError(f"{name}: invalid payload: {error}") from None

    return check


def _require_async(name: str, handler: object) -> None:
    if not inspect.iscoroutinefunction(handler):
        raise TypeError(f"job kind {name!r}: the handler must be an async function (async def)")


def _names(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


async def _asyncpg_connection(connection: Any) -> Any:
    """The asyncpg connection under an asyncpg, SQLAlchemy ``AsyncConnection`` or ``AsyncSession`` handle,
    inside that handle's transaction."""
    import asyncpg

    if isinstance(connection, asyncpg.Connection):
        return connection
    if hasattr(connection, "get_raw_connection"):  # SQLAlchemy AsyncConnection
        sa_connection = connection
    elif hasattr(connection, "connection") and hasattr(connection, "get_bind"):  # SQLAlchemy AsyncSession
        sa_connection = await connection.connection()
    else:
        raise UsageError(f"connection= takes an asyncpg connection or a SQLAlchemy AsyncConnection or "
                         f"AsyncSession, got {type(connection).__name__}")
    raw = (await sa_connection.get_raw_connection()).driver_connection
    if not isinstance(raw, asyncpg.Connection):
        raise UsageError("connection= needs SQLAlchemy on the asyncpg driver (postgresql+asyncpg://)")
    if not raw.is_in_transaction():
        # SQLAlchemy's asyncpg adapter begins the driver's transaction at its first statement: make it
        # begin now, so the insert below belongs to the caller's transaction.
        from sqlalchemy import text

        await sa_connection.execute(text("SELECT 1"))
    return raw


# --- loading an application's App ---------------------------------------------------------------------
def load_app(reference: str) -> App:
    """``module:attribute`` (attribute defaults to ``app``) → that module's ``runner.App``."""
    module_name, _, attribute = reference.partition(":")
    attribute = attribute or "app"
    if not module_name:
        raise UsageError(f"RUNNER_APP / --app {reference!r}: expected module:attribute, e.g. myproject.jobs:app")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the application's modules from where it runs
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise UsageError(f"--app {reference!r}: no module named {error.name!r} "
                             f"(run from the folder that holds it, or install it)") from None
        raise
    found = getattr(module, attribute, None)
    if found is None:
        raise UsageError(f"--app {reference!r}: module {module_name!r} has no attribute {attribute!r}")
    if not isinstance(found, App):
        raise UsageError(f"--app {reference!r}: {attribute!r} is a {type(found).__name__}, not a runner.App")
    return found


def _configure_logging_once(settings: Settings) -> None:
    """An application that has not configured structlog gets runner's set-up (no debug lines at info)."""
    import structlog

    if not structlog.is_configured():
        from runner.logs import configure_logging

        configure_logging(settings.log_format, settings.log_level, stdlib=False)


__all__ = ["App", "check_new_job", "check_queue_name", "load_app"]


def _no_schedule(name: str) -> UsageError:
    return ScheduleError(f"no schedule named {name[:200]!r} (see `runner schedule list`)")
