"""Every knob of runner is an env var prefixed ``RUNNER_``; all durations are in seconds.

Settings are validated once at start-up and frozen. Other tools set ``RUNNER_*`` variables too (GitHub
Actions sets ``RUNNER_OS``, ``RUNNER_TEMP``, ...), so a ``RUNNER_*`` name that is not a setting is ignored,
unless it is a near miss of a real one (``RUNNER_CONCURENCY``): then one warning line names the likely
setting, so a typo cannot silently leave a default in force. ``RUNNER_STRICT_SETTINGS=true`` makes every
unknown name an error. Plugins own their settings (a pydantic-settings class with its own prefix, such as
``RUNNER_CONSENSUS_``); given to :func:`load_settings`, their names are known to the typo check and their
values validated with the core's.

``RUNNER_HOME`` (the embedded database) defaults to one place per project or per user, whatever the
current folder: the nearest ``.runner/`` folder found upward from it, else ``$XDG_DATA_HOME/runner`` or
``~/.local/share/runner`` (``/var/lib/runner`` for root, whose home the server's unprivileged user cannot
enter). See :func:`default_home`.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import socket
import sys
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "RUNNER_"
# Families of variables that are read elsewhere by name, not as fields of Settings.
_FREE_FORM_PREFIXES = ("RUNNER_SOURCE_", "RUNNER_TEST_", "RUNNER_BENCH_")
_SOURCE_URL = re.compile(r"^RUNNER_SOURCE_([A-Z0-9_]+)_URL$")
# Set by other tools (GitHub Actions runners); never reported, even with RUNNER_STRICT_SETTINGS. None of
# them is a near miss of a setting today; the list keeps it so if a setting with a similar name is added.
FOREIGN_VARIABLES = frozenset({
    "RUNNER_OS", "RUNNER_ARCH", "RUNNER_NAME", "RUNNER_TEMP", "RUNNER_TOOL_CACHE", "RUNNER_WORKSPACE",
    "RUNNER_DEBUG", "RUNNER_ENVIRONMENT", "RUNNER_TRACKING_ID", "RUNNER_PERFLOG", "RUNNER_ALLOW_RUNASROOT",
})
NEAR_MISS_CUTOFF = 0.8  # difflib ratio: RUNNER_CONCURENCY -> RUNNER_CONCURRENCY, RUNNER_OS -> nothing
HOME_DIR_NAME = ".runner"
log = logging.getLogger("runner.config")
PluginSettings = TypeVar("PluginSettings", bound=BaseSettings)

POOL_BUDGET_SHARE = 0.8  # leave 20% of max_connections for admins, migrations and other clients
POOL_MAX_CAP = 20  # past this, one asyncio process gains nothing but server-side contention
LISTENER_CONNECTIONS = 1
# Connections of the pool only the control plane (heartbeat, completions, rescue, cancel checks) may use,
# so a worker whose handlers saturate the pool still renews its leases.
CONTROL_CONNECTIONS = 2


class SettingsError(ValueError):
    """A setting has an invalid value; the message names the variable."""


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def user_home(environ: Mapping[str, str] | None = None) -> Path:
    """The per-user embedded home: ``$XDG_DATA_HOME/runner``, else ``~/.local/share/runner``; for root
    (with no XDG_DATA_HOME) ``/var/lib/runner``, since the server's unprivileged user cannot enter /root."""
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_DATA_HOME", "")
    if xdg and Path(xdg).is_absolute():  # the XDG spec ignores relative paths
        return Path(xdg) / "runner"
    if os.geteuid() == 0:
        return Path("/var/lib/runner")
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "share" / "runner"


def default_home(cwd: Path | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """RUNNER_HOME when unset: the nearest ``.runner/`` folder in ``cwd`` or a folder above it (a project
    opts in with ``mkdir .runner``), else :func:`user_home`. Every command, from any folder of the project
    (or from anywhere, without one), reaches the same embedded server. A ``.runner`` *file* (a GitHub
    Actions runner's configuration) is not a home."""
    try:
        start = (cwd if cwd is not None else Path.cwd()).resolve()
    except OSError:  # the current folder was deleted
        return user_home(environ)
    for folder in (start, *start.parents):
        if (folder / HOME_DIR_NAME).is_dir():
            return folder / HOME_DIR_NAME
    return user_home(environ)


@dataclass(frozen=True)
class PoolBudget:
    """The effective pool size and the inputs it was derived from (logged at start, served on /pool)."""

    min_size: int
    max_size: int
    derived: bool
    db_max_connections: int
    worker_replicas: int
    budget_share: float
    listener_connections: int
    cap: int
    control_reserved: int  # of max_size, only for the control plane; handlers get the rest

    @property
    def jobs_max(self) -> int:
        return self.max_size - self.control_reserved

    def formula(self) -> str:
        return (
            f"min({self.cap}, floor({self.db_max_connections} x {self.budget_share} / "
            f"{self.worker_replicas}) - {self.listener_connections}) = {self.max_size}: "
            f"{self.control_reserved} control + {self.jobs_max} jobs"
        )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")
    # The plugins' settings, validated by load_settings with these (see plugin_settings()).
    _plugins: dict[type[BaseSettings], BaseSettings] = PrivateAttr(default_factory=dict)

    # An unknown RUNNER_* name is an error instead of ignored (or warned about when it is a near miss).
    strict_settings: bool = False

    # --- application ----------------------------------------------------------------------------
    # ``module:attribute`` of an application's ``runner.App``: its kinds join the entry-point plugins'.
    app: str | None = None

    # --- input limits ---------------------------------------------------------------------------
    max_payload_bytes: int = Field(1 << 20, gt=0, le=256 << 20)  # a job's payload as JSON, at enqueue

    # --- database -------------------------------------------------------------------------------
    database_url: SecretStr | None = None
    listen_database_url: SecretStr | None = None  # direct connection for LISTEN when behind PgBouncer
    home: Path = Field(default_factory=default_home)  # the embedded database's folder; see default_home()
    db_connect_timeout: float = Field(30.0, gt=0)
    statement_timeout: float = Field(30.0, gt=0)
    statement_cache_size: int = Field(256, ge=0)  # 0 behind PgBouncer in transaction mode
    # A frozen owner's open transaction is ended by the server after this (default: half the lease), so
    # its row locks never outlive its lease. 0 turns it off.
    idle_in_transaction_timeout: float | None = Field(None, ge=0)

    # --- pool budget ----------------------------------------------------------------------------
    pool_min_size: int | None = Field(None, ge=0)
    pool_max_size: int | None = Field(None, gt=0)
    db_max_connections: int = Field(100, gt=1)
    worker_replicas: int = Field(1, gt=0)
    pool_acquire_timeout: float = Field(5.0, gt=0)
    pool_retry_attempts: int = Field(8, gt=0)
    pool_retry_initial_backoff: float = Field(0.05, gt=0)
    pool_retry_max_backoff: float = Field(2.0, gt=0)
    pool_retry_max_wait: float = Field(60.0, gt=0)

    # --- worker ---------------------------------------------------------------------------------
    worker_id: str = Field(default_factory=_default_worker_id, min_length=1, max_length=200)
    concurrency: int = Field(200, gt=0, le=10_000)  # async handlers hold no connection while they run
    queues: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["default"], min_length=1)
    claim_batch_size: int = Field(200, gt=0)
    poll_interval: float = Field(1.0, gt=0)
    heartbeat_interval: float = Field(5.0, gt=0)
    lease_timeout: float = Field(30.0, gt=0)
    rescue_interval: float = Field(5.0, gt=0)
    cancel_check_interval: float = Field(0.5, gt=0)
    completion_flush_interval: float = Field(0.005, ge=0)
    max_recoveries: int = Field(3, ge=0)
    shutdown_grace: float = Field(30.0, ge=0)
    retry_backoff_base: float = Field(1.0, ge=0)
    retry_backoff_max: float = Field(300.0, ge=0)
    default_max_attempts: int = Field(5, gt=0)
    # A handler running longer than this is cancelled and the attempt fails (a kind may declare its own).
    job_timeout: float = Field(3600.0, ge=0)  # 0: no limit
    pool_exhausted_retry_delay: float = Field(1.0, ge=0)  # a job whose handler hit PoolExhausted reruns after this
    retention: float = Field(7 * 24 * 3600.0, ge=0)  # finished jobs are deleted after this; 0 keeps them
    cleanup_interval: float = Field(60.0, gt=0)

    # --- logs and HTTP --------------------------------------------------------------------------
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    http_host: str = "127.0.0.1"
    http_port: int = Field(9187, ge=0, le=65535)
    http_enabled: bool = True
    loop_lag_threshold: float = Field(2.0, gt=0)
    depth_sample_interval: float = Field(5.0, gt=0)

    # --- chain (the one AsyncWeb3 of the process, runner.chain; plugins use it) -----------------
    chain_url: str | None = None
    chain_max_connections: int = Field(4, gt=0)
    chain_rpc_timeout: float = Field(10.0, gt=0)
    chain_retry_attempts: int = Field(6, gt=0)
    chain_private_key: SecretStr | None = None

    @field_validator("queues", mode="before")
    @classmethod
    def _split_queues(cls, value: object) -> object:
        if isinstance(value, str):
            return [q.strip() for q in value.split(",") if q.strip()]
        return value

    @model_validator(mode="after")
    def _check_relations(self) -> Settings:
        if self.lease_timeout < 3 * self.heartbeat_interval:
            raise ValueError(
                "RUNNER_LEASE_TIMEOUT must be at least 3 x RUNNER_HEARTBEAT_INTERVAL so one late "
                f"heartbeat does not lose the lease (got {self.lease_timeout} and {self.heartbeat_interval})"
            )
        if self.pool_min_size is not None and self.pool_max_size is not None:
            if self.pool_min_size > self.pool_max_size:
                raise ValueError("RUNNER_POOL_MIN_SIZE must not exceed RUNNER_POOL_MAX_SIZE")
        if self.pool_retry_initial_backoff > self.pool_retry_max_backoff:
            raise ValueError(
                "RUNNER_POOL_RETRY_INITIAL_BACKOFF must not exceed RUNNER_POOL_RETRY_MAX_BACKOFF"
            )
        if self.idle_in_transaction_timeout is not None and self.idle_in_transaction_timeout >= self.lease_timeout:
            raise ValueError(
                "RUNNER_IDLE_IN_TRANSACTION_TIMEOUT must be below RUNNER_LEASE_TIMEOUT, so a frozen owner's "
                f"transaction ends before its lease (got {self.idle_in_transaction_timeout} and {self.lease_timeout})"
            )
        self.pool_budget()  # raises when the derived pool is too small to run
        return self

    def pool_budget(self) -> PoolBudget:
        derived = self.pool_max_size is None
        if derived:
            share = int(self.db_max_connections * POOL_BUDGET_SHARE / self.worker_replicas)
            max_size = min(POOL_MAX_CAP, share - LISTENER_CONNECTIONS)
            if max_size < 2:
                raise ValueError(
                    f"RUNNER_DB_MAX_CONNECTIONS={self.db_max_connections} over RUNNER_WORKER_REPLICAS="
                    f"{self.worker_replicas} leaves a pool of {max_size}; at least 2 are needed"
                )
        else:
            max_size = self.pool_max_size or 0
            if max_size < 2:
                raise ValueError("RUNNER_POOL_MAX_SIZE must be at least 2 (one for the control plane, one for jobs)")
        min_size = self.pool_min_size if self.pool_min_size is not None else min(2, max_size)
        return PoolBudget(
            min_size=min_size,
            max_size=max_size,
            derived=derived,
            db_max_connections=self.db_max_connections,
            worker_replicas=self.worker_replicas,
            budget_share=POOL_BUDGET_SHARE,
            listener_connections=LISTENER_CONNECTIONS,
            cap=POOL_MAX_CAP,
            control_reserved=min(CONTROL_CONNECTIONS, max_size - 1),
        )

    def idle_in_transaction_timeout_s(self) -> float:
        if self.idle_in_transaction_timeout is not None:
            return self.idle_in_transaction_timeout
        return self.lease_timeout / 2

    def plugin_settings(self, cls: type[PluginSettings]) -> PluginSettings:
        """A plugin's settings: those validated by :func:`load_settings` with these, else read from the
        environment now (raises :class:`SettingsError`). Plugins cache the result per App."""
        found = self._plugins.get(cls)
        if isinstance(found, cls):
            return found
        return _validate(cls)

    def source_url(self, name: str) -> str | None:
        """The DSN of a named connection from ``RUNNER_SOURCE_<NAME>_URL`` (never stored in a job)."""
        return os.environ.get(f"RUNNER_SOURCE_{name.upper()}_URL")


def source_names() -> list[str]:
    return sorted(m.group(1).lower() for k in os.environ if (m := _SOURCE_URL.match(k)))


def _env_prefix(cls: type[BaseSettings]) -> str:
    return str(cls.model_config.get("env_prefix") or "").upper()


def known_variables(plugin_settings: Iterable[type[BaseSettings]] = ()) -> set[str]:
    """Every variable name a setting is read from: the core's and the given plugin classes'."""
    known: set[str] = set()
    classes: list[type[BaseSettings]] = [Settings, *plugin_settings]
    for cls in classes:
        prefix = _env_prefix(cls)
        known.update(prefix + name.upper() for name in cls.model_fields)
    return known


def unknown_variables(
    plugin_settings: Iterable[type[BaseSettings]] = (), environ: Mapping[str, str] | None = None
) -> list[tuple[str, str | None]]:
    """``(name, likely setting or None)`` for each ``RUNNER_*`` variable that is no setting."""
    env = os.environ if environ is None else environ
    known = known_variables(plugin_settings)
    bare = {name.removeprefix(ENV_PREFIX): name for name in known}
    found: list[tuple[str, str | None]] = []
    for key in sorted(env):
        if (not key.startswith(ENV_PREFIX) or key in known or key in FOREIGN_VARIABLES
                or key.startswith(_FREE_FORM_PREFIXES)):
            continue
        close = difflib.get_close_matches(key.removeprefix(ENV_PREFIX), list(bare), n=1, cutoff=NEAR_MISS_CUTOFF)
        found.append((key, bare[close[0]] if close else None))
    return found


def _warn(message: str) -> None:
    """One line on stderr (before the CLI configures logging), or to the application's logging."""
    if log.hasHandlers():
        log.warning(message)
    else:
        print(f"warning: {message}", file=sys.stderr)


def _describe(error: ValidationError, prefix: str = ENV_PREFIX) -> str:
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if isinstance(part, str)]
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if loc:
        return f"{prefix}{loc[0].upper()}: {message}"
    return message


def _validate(cls: type[PluginSettings]) -> PluginSettings:
    try:
        return cls()
    except ValidationError as error:
        raise SettingsError(_describe(error, _env_prefix(cls))) from None


def load_settings(*, plugin_settings: Iterable[type[BaseSettings]] = (), **overrides: object) -> Settings:
    """Read and validate settings; raise :class:`SettingsError` with one line naming the variable.

    ``plugin_settings``: the loaded plugins' settings classes (``Plugin.settings``). They are validated
    here too (so a bad plugin value fails at start, like a core one) and their names join the typo check;
    without them only the core names are known.
    """
    classes = list(dict.fromkeys(plugin_settings))
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None
    for name, likely in unknown_variables(classes):
        hint = f"; did you mean {likely}?" if likely else ""
        if settings.strict_settings:
            raise SettingsError(f"{name} is not a setting (RUNNER_STRICT_SETTINGS is true){hint}")
        if likely:
            _warn(f"{name} is not a setting{hint}")
    settings._plugins = {cls: _validate(cls) for cls in classes}
    return settings
