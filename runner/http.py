"""The worker's one HTTP server: liveness, readiness, Prometheus metrics and the pool's state.

- ``/healthz`` (liveness): 200 while the event loop is responsive and every worker loop is alive; 503 with
  the reasons when a loop has died or the loop lag (the worst in the last few seconds) passes
  ``RUNNER_LOOP_LAG_THRESHOLD``. A worker that is stopping stays live: killing it would cut its grace.
- ``/readyz``: the database answers ``SELECT 1`` through the pool, the chain (``app.resources["chain"]``,
  when a plugin opened one) answers ``eth_blockNumber``, and every plugin readiness check passes. A
  stopping worker is not ready.
- ``/metrics``: the Prometheus text format. Pool gauges are refreshed from ``Database.stats()`` at scrape
  time (no SQL); queue depth is sampled by the depth loop on its own interval, and plugin gauges
  (``Plugin.sample_metrics``) by this server every ``RUNNER_DEPTH_SAMPLE_INTERVAL`` seconds, never per
  scrape.
- ``/pool``: JSON with min, max, size, in use, idle, waiters and the budget formula's inputs.
- ``/dashboard/`` with ``RUNNER_DASHBOARD_MOUNT=true``: the operators' dashboard (runner.dashboard), under
  its own rules (authentication beyond loopback, CSRF, read-only mode, its security headers).

The server runs in the worker's event loop; it never borrows a pool connection except for ``/readyz``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from runner import metrics
from runner.errors import RunnerError
from runner.logs import get_logger, redact

if TYPE_CHECKING:
    from runner.app import App

log = get_logger("runner.http")

WorkerState = Literal["starting", "running", "stopping", "stopped"]
READY_CHECK_TIMEOUT_S = 5.0
LAG_SAMPLE_INTERVAL_S = 0.1
LAG_WINDOW_S = 5.0
STOP_TIMEOUT_S = 2.0
JSON_TYPE = "application/json"
DASHBOARD_ROOT = "/dashboard"  # where RUNNER_DASHBOARD_MOUNT serves the dashboard


class HttpServerError(RunnerError):
    """The HTTP server could not listen (the port is taken, say)."""


@dataclass(frozen=True)
class LoopStatus:
    """One worker loop as liveness sees it."""

    name: str
    alive: bool
    last_success_age_s: float | None
    failures_in_a_row: int


@dataclass(frozen=True)
class Liveness:
    state: WorkerState
    loops: list[LoopStatus] = field(default_factory=list)
    heartbeat_lag_s: float | None = None


class LivenessSource(Protocol):
    """What the server needs from the worker (runner.worker.Worker implements it)."""

    def liveness(self) -> Liveness: ...


class LagSampler:
    """Measures event loop lag: how late a ``sleep(interval)`` wakes up. Reports the worst recent value.

    The worst value over a window (not the last sample) is served, so a probe every 10 s still sees a
    3 s stall that ended between two probes. A stall still in progress counts too (``overdue``).
    """

    def __init__(self, interval_s: float = LAG_SAMPLE_INTERVAL_S, window_s: float = LAG_WINDOW_S) -> None:
        self.interval_s = interval_s
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()
        self._expected_at: float | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="http-lag-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._expected_at = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            now = loop.time()
            self._record(now, max(0.0, now - self._expected_at))
            metrics.EVENT_LOOP_LAG.set(self.lag_s())

    def _record(self, now: float, lag: float) -> None:
        self._samples.append((now, lag))
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()

    def lag_s(self) -> float:
        now = asyncio.get_running_loop().time()
        overdue = max(0.0, now - self._expected_at) if self._expected_at is not None else 0.0
        recent = max((lag for at, lag in self._samples if at >= now - self.window_s), default=0.0)
        return max(overdue, recent)


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body, default=str), status=status, content_type=JSON_TYPE)


class HttpServer:
    """Started and stopped by the worker (or by ``runner demo``); one per process."""

    def __init__(
        self,
        app: App,
        source: LivenessSource | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        lag_interval_s: float = LAG_SAMPLE_INTERVAL_S,
        lag_window_s: float = LAG_WINDOW_S,
        lag_threshold_s: float | None = None,
    ) -> None:
        self.app = app
        self.lag_threshold_s = lag_threshold_s if lag_threshold_s is not None else app.settings.loop_lag_threshold
        self.source = source
        self.host = host if host is not None else app.settings.http_host
        self.requested_port = port if port is not None else app.settings.http_port
        self.port: int | None = None
        self.lag = LagSampler(lag_interval_s, lag_window_s)
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # --- lifecycle ------------------------------------------------------------------------------
    @property
    def dashboard_mounted(self) -> bool:
        return self.app.settings.dashboard_mount

    def web_app(self) -> web.Application:
        application = web.Application()
        application.add_routes([
            web.get("/", self.index),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/metrics", self.metrics),
            web.get("/pool", self.pool),
        ])
        if self.dashboard_mounted:
            application.router.add_get(DASHBOARD_ROOT, _to_dashboard)  # before the sub-app, which matches it too
            application.add_subapp(DASHBOARD_ROOT, self._dashboard())
        return application

    def _dashboard(self) -> web.Application:
        """The dashboard (runner.dashboard) as a sub-application, with its own guard: authentication, the
        loopback Host check, CSRF, read-only mode and its security headers, as ``runner dashboard``."""
        from runner.dashboard import MOUNTED_WHERE, auth_from_settings, build, check_bind

        settings = self.app.settings
        auth = auth_from_settings(settings)
        check_bind(self.host, auth, MOUNTED_WHERE)  # DashboardBindError: one line, exit 2
        return build(self.app, auth, settings.dashboard_read_only, DASHBOARD_ROOT)

    async def start(self) -> HttpServer:
        runner = web.AppRunner(self.web_app(), access_log=None, handle_signals=False, shutdown_timeout=STOP_TIMEOUT_S)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.requested_port)
        try:
            await site.start()
        except OSError as error:
            await runner.cleanup()
            raise HttpServerError(
                f"cannot listen on {self.host}:{self.requested_port} ({error.strerror or error}); set "
                "RUNNER_HTTP_PORT (0 picks a free port) or RUNNER_HTTP_ENABLED=false"
            ) from None
        self._runner = runner
        self.port = _bound_port(runner) or self.requested_port
        self.lag.start()
        if any(plugin.sample_metrics is not None for plugin in self.app.plugins):
            self._sampler = asyncio.create_task(self._sample_plugins(), name="http-plugin-sampler")
        log.info("http listening", url=self.url, endpoints=" ".join(self.endpoints()))
        return self

    async def stop(self) -> None:
        await self.lag.stop()
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
            self._sampler = None
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # --- views ----------------------------------------------------------------------------------
    def liveness(self) -> Liveness:
        return self.source.liveness() if self.source is not None else Liveness("running")

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, body) for /healthz."""
        view = self.liveness()
        threshold = self.lag_threshold_s
        lag = self.lag.lag_s()
        reasons: list[str] = []
        if not self.lag.running:
            reasons.append("the event loop lag sampler is not running")
        if lag > threshold:
            reasons.append(f"event loop lag {lag:.3f}s is over RUNNER_LOOP_LAG_THRESHOLD={threshold:g}s")
        if view.state == "running":
            reasons += [f"worker loop '{loop.name}' is not running" for loop in view.loops if not loop.alive]
        body = {
            "status": "unhealthy" if reasons else "ok",
            "reasons": reasons,
            "state": view.state,
            "event_loop_lag_s": round(lag, 4),
            "loop_lag_threshold_s": threshold,
            "heartbeat_lag_s": None if view.heartbeat_lag_s is None else round(view.heartbeat_lag_s, 3),
            "loops": [asdict(loop) for loop in view.loops],
        }
        return not reasons, body

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, body) for /readyz: every check runs at once, each under its own timeout."""
        checks: dict[str, Callable[[], Awaitable[None]]] = {"database": self._check_database}
        if callable(getattr(self.app.resources.get("chain"), "block_number", None)):
            checks["chain"] = self._check_chain
        for plugin in self.app.plugins:
            if plugin.readiness is not None:
                checks[plugin.name] = _bind(plugin.readiness, self.app)
        results = await asyncio.gather(*(_run_check(check) for check in checks.values()))
        outcome = dict(zip(checks, results, strict=True))
        state = self.liveness().state
        reasons = [f"{name}: {error}" for name, error in outcome.items() if error is not None]
        if state in ("stopping", "stopped"):
            reasons.append(f"the worker is {state}")
        body = {
            "status": "not ready" if reasons else "ready",
            "reasons": reasons,
            "state": state,
            "checks": {name: ("ok" if error is None else error) for name, error in outcome.items()},
        }
        return not reasons, body

    async def _check_database(self) -> None:
        async with self.app.db.connection() as connection:
            await connection.fetchval("SELECT 1")

    async def _check_chain(self) -> None:
        await self.app.resources["chain"].block_number()

    async def _sample_plugins(self) -> None:
        interval = self.app.settings.depth_sample_interval
        while True:
            for plugin in self.app.plugins:
                if plugin.sample_metrics is None:
                    continue
                try:
                    await asyncio.wait_for(plugin.sample_metrics(self.app), max(interval, READY_CHECK_TIMEOUT_S))
                except Exception as error:
                    log.warning("plugin metrics sample failed", plugin=plugin.name, error=repr(error))
            await asyncio.sleep(interval)

    def pool_status(self) -> dict[str, Any]:
        db = self.app.db
        stats = db.stats()
        budget = self.app.settings.pool_budget()
        return {
            "pool": db.name,
            "min": stats.min_size,
            "max": stats.max_size,
            "size": stats.size,
            "in_use": stats.in_use,
            "idle": stats.idle,
            "waiters": stats.waiters,
            "utilisation": round(stats.in_use / stats.max_size, 4) if stats.max_size else 0.0,
            "peak_in_use": db.peak_in_use,
            "exhaustion_retries": db.exhaustion_retries,
            "give_ups": db.give_ups,
            "release_failures": db.release_failures,
            # handlers may hold at most jobs_max; the rest stay for heartbeats, completions and rescues
            "lanes": {"control_reserved": stats.control_reserved, "jobs_max": stats.max_size - stats.control_reserved,
                      "jobs_in_use": stats.jobs_in_use},
            "budget": {
                "formula": budget.formula(),
                "derived": budget.derived,
                "min_size": budget.min_size,
                "max_size": budget.max_size,
                "db_max_connections": budget.db_max_connections,
                "worker_replicas": budget.worker_replicas,
                "budget_share": budget.budget_share,
                "listener_connections": budget.listener_connections,
                "cap": budget.cap,
                "control_reserved": budget.control_reserved,
            },
        }

    def refresh_gauges(self) -> None:
        """Scrape-time gauges: the pool from ``stats()`` (no SQL) and the heartbeat lag."""
        stats = self.app.db.stats()
        name = self.app.db.name
        metrics.POOL_MAX.labels(name).set(stats.max_size)
        metrics.POOL_SIZE.labels(name).set(stats.size)
        metrics.POOL_IDLE.labels(name).set(stats.idle)
        metrics.POOL_IN_USE.labels(name).set(stats.in_use)
        metrics.POOL_WAITERS.labels(name).set(stats.waiters)
        lag = self.liveness().heartbeat_lag_s
        if lag is not None:
            metrics.HEARTBEAT_LAG.set(lag)
        metrics.EVENT_LOOP_LAG.set(self.lag.lag_s())

    # --- handlers -------------------------------------------------------------------------------
    def endpoints(self) -> list[str]:
        return ["/healthz", "/readyz", "/metrics", "/pool"] + ([f"{DASHBOARD_ROOT}/"] if self.dashboard_mounted else [])

    async def index(self, _request: web.Request) -> web.Response:
        return _json({"endpoints": self.endpoints()})

    async def healthz(self, _request: web.Request) -> web.Response:
        healthy, body = self.health()
        return _json(body, 200 if healthy else 503)

    async def readyz(self, _request: web.Request) -> web.Response:
        ready, body = await self.readiness()
        return _json(body, 200 if ready else 503)

    async def metrics(self, _request: web.Request) -> web.Response:
        self.refresh_gauges()
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def pool(self, _request: web.Request) -> web.Response:
        return _json(self.pool_status())


async def _to_dashboard(_request: web.Request) -> web.Response:
    return web.Response(status=308, headers={"Location": f"{DASHBOARD_ROOT}/"})


def _bind(check: Callable[[App], Awaitable[None]], app: App) -> Callable[[], Awaitable[None]]:
    return lambda: check(app)


async def _run_check(check: Callable[[], Awaitable[None]]) -> str | None:
    """None when the check passed, else one redacted line saying why."""
    started = time.monotonic()
    try:
        await asyncio.wait_for(check(), READY_CHECK_TIMEOUT_S)
    except TimeoutError:
        return f"no answer within {READY_CHECK_TIMEOUT_S:g}s"
    except Exception as error:
        return redact(f"{type(error).__name__}: {error}")[:500]
    log.debug("readiness check passed", elapsed_s=round(time.monotonic() - started, 4))
    return None


def _bound_port(runner: web.AppRunner) -> int | None:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return None
