"""Job kinds and the plugins that bring them, found through the ``runner.plugins`` entry point group.

The engine never imports ``jobs``: a plugin package declares itself in pyproject.toml, so imports flow
one way (jobs -> runner -> config) while ``runner worker`` still knows every kind.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.errors import UnknownKind
from runner.policy import Backoff

if TYPE_CHECKING:
    import typer
    from pydantic_settings import BaseSettings

    from runner.app import App
    from runner.context import JobContext
    from runner.service import Service

# What a handler returns (JSON: dict, list, str, number, bool or None) is stored as the job's result.
Handler = Callable[["JobContext"], Awaitable[Any]]
PayloadValidator = Callable[[dict[str, Any], "App"], Awaitable[None]]
ENTRY_POINT_GROUP = "runner.plugins"


@dataclass(frozen=True)
class JobKind:
    """A kind of job and its run policy. Unset policy fields fall back to the RUNNER_* settings."""

    name: str
    handler: Handler
    # Checked at enqueue (and by the handler again at run time); raises UsageError on a bad payload.
    validate: PayloadValidator | None = None
    # Seconds one attempt may run before it is cancelled and fails as timed out; 0: no limit.
    timeout_s: float | None = None
    # Attempts a new job of this kind gets when the enqueuer names none.
    max_attempts: int | None = None
    # Delay between attempts after a failure (a handler can also raise RetryLater(delay_s)).
    retry_backoff: Backoff | None = None
    # The queue a new job of this kind goes to when the enqueuer names none (else "default").
    queue: str | None = None
    # At most this many jobs of this kind run at once in one worker (None: up to its concurrency): heavy
    # kinds (a backfill chunk holds two connections and its batches) then spread over workers and replicas.
    # Either a number or a function of the app's settings, read once when the worker starts.
    max_running: int | Callable[[App], int] | None = None
    # A plugin's own kind that only some workers can run (its resources are open there): a worker claims it
    # where this returns True, from its queue whatever RUNNER_QUEUES says, and never elsewhere.
    runs_here: Callable[[App], bool] | None = None

    def __post_init__(self) -> None:
        if self.timeout_s is not None and self.timeout_s < 0:
            raise ValueError(f"job kind {self.name!r}: timeout_s must be >= 0")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"job kind {self.name!r}: max_attempts must be >= 1")
        if isinstance(self.max_running, int) and self.max_running < 1:
            raise ValueError(f"job kind {self.name!r}: max_running must be >= 1")

    def claimable(self, app: App) -> bool:
        return self.runs_here is None or self.runs_here(app)

    def running_cap(self, app: App) -> int | None:
        """max_running for this app (None: no cap)."""
        cap = self.max_running(app) if callable(self.max_running) else self.max_running
        if cap is not None and cap < 1:
            raise ValueError(f"job kind {self.name!r}: max_running must be >= 1, got {cap}")
        return cap


@dataclass(frozen=True)
class Plugin:
    name: str
    kinds: Sequence[JobKind] = ()
    migrations: Path | None = None
    # Extra worker loops that share the worker's pool and lifecycle (consensus, for example).
    services: Callable[[App], Sequence[Service]] | None = None
    # Extra CLI commands.
    commands: Callable[[typer.Typer], None] | None = None
    # True while the plugin still has work a draining worker should wait for.
    has_pending_work: Callable[[App], Awaitable[bool]] | None = None
    # Process-wide resources (opened once per process, closed at stop).
    open_resources: Callable[[App], Awaitable[None]] | None = None
    close_resources: Callable[[App], Awaitable[None]] | None = None
    # Raises when a dependency the plugin opened (the chain, say) does not answer; served on /readyz.
    readiness: Callable[[App], Awaitable[None]] | None = None
    # Sets the plugin's gauges from the database; the HTTP server runs it every
    # RUNNER_DEPTH_SAMPLE_INTERVAL seconds while it serves /metrics (never per scrape).
    sample_metrics: Callable[[App], Awaitable[None]] | None = None
    # The plugin's own settings (a pydantic-settings class with its own env_prefix, e.g. RUNNER_CONSENSUS_):
    # load_settings(plugin_settings=...) validates it and its names join the typo check; the plugin reads it
    # with app.settings.plugin_settings(cls), cached per App in app.resources.
    # (or a function returning it, so that importing the plugin does not import pydantic-settings)
    settings: type[BaseSettings] | Callable[[], type[BaseSettings]] | None = None


@dataclass
class Registry:
    kinds: dict[str, JobKind] = field(default_factory=dict)

    def add(self, kind: JobKind) -> None:
        if kind.name in self.kinds:
            raise ValueError(f"job kind {kind.name!r} registered twice")
        self.kinds[kind.name] = kind

    def max_attempts(self, name: str, default: int) -> int:
        kind = self.kinds.get(name)
        return kind.max_attempts if kind is not None and kind.max_attempts is not None else default

    def get(self, name: str) -> JobKind:
        try:
            return self.kinds[name]
        except KeyError:
            known = ", ".join(sorted(self.kinds)) or "none"
            shown = repr(name) if len(name) <= 100 else f"{name[:100]!r}... ({len(name):,} characters)"
            raise UnknownKind(f"unknown job kind {shown} (known: {known})") from None


def load_plugins() -> list[Plugin]:
    """The installed plugins, by entry point name. Read once per process: every scan of the installed
    distributions' metadata costs ~10 ms, and the CLI's start-up needs the list three times."""
    return list(_installed_plugins())


@functools.cache
def _installed_plugins() -> tuple[Plugin, ...]:
    plugins: list[Plugin] = []
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        loaded = entry.load()
        plugins.append(loaded() if callable(loaded) and not isinstance(loaded, Plugin) else loaded)
    return tuple(plugins)


def build_registry(plugins: Sequence[Plugin]) -> Registry:
    registry = Registry()
    for plugin in plugins:
        for kind in plugin.kinds:
            registry.add(kind)
    return registry


def plugin_settings(plugins: Sequence[Plugin]) -> list[type[BaseSettings]]:
    """The plugins' settings classes, for ``load_settings(plugin_settings=...)``."""
    classes: list[type[BaseSettings]] = []
    for plugin in plugins:
        if plugin.settings is not None:
            declared = plugin.settings
            classes.append(declared if isinstance(declared, type) else declared())
    return classes
