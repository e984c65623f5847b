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

from runner.config.dsn import DsnError, check_dsn, check_http_url

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

# --- bounds ---------------------------------------------------------------------------------------
# Every duration is finite and at most a year, so anything derived from it (now() + lease, heartbeat x 3,
# a retry's run_at) stays a valid interval and timestamp. Positive durations are at least a millisecond.
YEAR_S = 365 * 24 * 3600.0
MAX_DURATION_S = YEAR_S
MAX_RETENTION_S = 100 * YEAR_S  # now() - retention must stay a timestamp; 0 keeps jobs for ever anyway
MIN_DURATION_S = 0.001
# statement_timeout and idle_in_transaction_session_timeout go to PostgreSQL as int32 milliseconds:
# at most 2^31 - 1 ms (24.8 days, here in whole seconds); below 1 ms they would round to 0 = "off".
MAX_PG_TIMEOUT_S = 2_147_483.0
INT32_MAX = 2**31 - 1  # counts that reach an integer column or an int4 query parameter
MAX_BACKENDS = 262_143  # PostgreSQL's limit on max_connections
MAX_POOL_SIZE = 1_000
DASHBOARD_SECRET_MIN_CHARS = 16  # RUNNER_DASHBOARD_TOKEN and RUNNER_DASHBOARD_PASSWORD



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
    # allow_inf_nan=False: every float setting is finite (inf or nan is one line naming the variable).
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid", allow_inf_nan=False)
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
    # Both DSNs are parsed here (check_dsn), so a typo is one line at start, not a connect-retry loop.
    database_url: SecretStr | None = None
    listen_database_url: SecretStr | None = None  # direct connection for LISTEN when behind PgBouncer
    home: Path = Field(default_factory=default_home)  # the embedded database's folder; see default_home()
    db_connect_timeout: float = Field(30.0, ge=MIN_DURATION_S, le=MAX_DURATION_S)
    # Sent to PostgreSQL in milliseconds (int32): from 1 ms to 24.8 days.
    statement_timeout: float = Field(30.0, ge=MIN_DURATION_S, le=MAX_PG_TIMEOUT_S)
    statement_cache_size: int = Field(256, ge=0, le=100_000)  # 0 behind PgBouncer in transaction mode
    # A frozen owner's open transaction is ended by the server after this (default: half the lease, at
    # most MAX_PG_TIMEOUT_S), so its row locks never outlive its lease. 0 turns it off; else at least 1 ms.
    idle_in_transaction_timeout: float | None = Field(None, ge=0, le=MAX_PG_TIMEOUT_S)

    # --- pool budget ----------------------------------------------------------------------------
    pool_min_size: int | None = Field(None, ge=0, le=MAX_POOL_SIZE)
    pool_max_size: int | None = Field(None, gt=0, le=MAX_POOL_SIZE)
    db_max_connections: int = Field(100, gt=1, le=MAX_BACKENDS)
    worker_replicas: int = Field(1, gt=0, le=MAX_BACKENDS)
    pool_acquire_timeout: float = Field(5.0, ge=MIN_DURATION_S, le=MAX_DURATION_S)
    pool_retry_attempts: int = Field(8, gt=0, le=1_000)
    pool_retry_initial_backoff: float = Field(0.05, ge=MIN_DURATION_S, le=MAX_DURATION_S)
    pool_retry_max_backoff: float = Field(2.0, ge=MIN_DURATION_S, le=MAX_DURATION_S)
    pool_retry_max_wait: float = Field(60.0, ge=MIN_DURATION_S, le=MAX_DURATION_S)

    # --- worker ---------------------------------------------------------------------------------
    worker_id: str = Field(default_factory=_default_worker_id, min_length=1, max_length=200)
    concurrency: int = Field(200, gt=0, le=10_000)  # async handlers hold no connection while they run
    queues: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["default"], min_length=1)
    claim_batch_size: int = Field(200, gt=0, le=10_000)  # a claim takes at most min(free slots, this)
    poll_interval: float = Field(1.0, ge=MIN_DURATION_S, le=MAX_DURATION_S)
    heartbeat_interval: float = Field(5.0, ge=MIN_DURATION_S, le=MAX_DURATION_S)
    lease_timeout: float = Field(30.0, ge=MIN_DURATION_S, le=MAX_DURATION_S)
    rescue_interval: float = Field(5.0, ge=MIN_DURATION_S, le=MAX_DURATION_S)
    cancel_check_interval: float = Field(0.5, ge=MIN_DURATION_S, le=MAX_DURATION_S)
    completion_flush_interval: float = Field(0.005, ge=0, le=MAX_DURATION_S)
    max_recoveries: int = Field(3, ge=0, le=INT32_MAX)  # compared with an integer column
    shutdown_grace: float = Field(30.0, ge=0, le=MAX_DURATION_S)
    retry_backoff_base: float = Field(1.0, ge=0, le=MAX_DURATION_S)
    retry_backoff_max: float = Field(300.0, ge=0, le=MAX_DURATION_S)
    default_max_attempts: int = Field(5, gt=0, le=INT32_MAX)  # runner_jobs.max_attempts is an integer
    # A handler running longer than this is cancelled and the attempt fails (a kind may declare its own).
    job_timeout: float = Field(3600.0, ge=0, le=MAX_DURATION_S)  # 0: no limit
    # a job whose handler hit PoolExhausted reruns after this
    pool_exhausted_retry_delay: float = Field(1.0, ge=0, le=MAX_DURATION_S)
    # finished jobs are deleted after this; 0 keeps them
    retention: float = Field(7 * 24 * 3600.0, ge=0, le=MAX_RETENTION_S)
    cleanup_interval: float = Field(60.0, ge=MIN_DURATION_S, le=MAX_DURATION_S)
    # VACUUM runner_jobs once it has this many dead row versions (0: leave it to autovacuum alone),
    # checked every vacuum_interval seconds; see runner.loops.vacuum
    vacuum_dead_rows: int = Field(20_000, ge=0, le=2**62)
    vacuum_interval: float = Field(5.0, ge=MIN_DURATION_S, le=MAX_DURATION_S)
    # a schedule's tick up to this many seconds old is late and always enqueued; older ones are missed
    # and follow the schedule's policy (runner.schedules)
    schedule_grace: float = Field(60.0, ge=0, le=MAX_DURATION_S)
    schedules_enabled: bool = True  # run the scheduler loop in this worker

    # --- logs and HTTP --------------------------------------------------------------------------
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    http_host: str = "127.0.0.1"
    http_port: int = Field(9187, ge=0, le=65535)
    http_enabled: bool = True
    loop_lag_threshold: float = Field(2.0, ge=MIN_DURATION_S, le=MAX_DURATION_S)
    depth_sample_interval: float = Field(5.0, ge=MIN_DURATION_S, le=MAX_DURATION_S)

    # --- dashboard (runner dashboard, runner.dashboard) -----------------------------------------
    # Any host but a loopback address needs a token or basic-auth credentials (checked by the command).
    dashboard_host: str = Field("127.0.0.1", min_length=1, max_length=255)
    dashboard_port: int = Field(9188, ge=0, le=65535)
    dashboard_token: SecretStr | None = None  # a bearer token (or the login form's); at least 16 characters
    dashboard_user: str | None = Field(None, min_length=1, max_length=200)  # basic auth, with the password
    dashboard_password: SecretStr | None = None
    dashboard_read_only: bool = False  # actions hidden and refused (403)
    # serve the dashboard under /dashboard/ on the worker's HTTP server too (RUNNER_HTTP_HOST/_PORT), with the
    # same rules: beyond loopback the worker refuses to start without a token or basic auth (exit 2)
    dashboard_mount: bool = False

    # --- chain (the one AsyncWeb3 of the process, runner.chain; plugins use it) -----------------
    chain_url: str | None = None  # an http(s):// JSON-RPC URL, checked here (check_http_url)
    chain_max_connections: int = Field(4, gt=0, le=MAX_POOL_SIZE)
    chain_rpc_timeout: float = Field(10.0, ge=MIN_DURATION_S, le=MAX_DURATION_S)
    chain_retry_attempts: int = Field(6, gt=0, le=1_000)
    chain_private_key: SecretStr | None = None

    @field_validator("database_url", "listen_database_url")
    @classmethod
    def _parse_dsn(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_dsn(value.get_secret_value())  # DsnError is a ValueError: one line, without the value
        return value

    @field_validator("dashboard_token", "dashboard_password")
    @classmethod
    def _dashboard_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < DASHBOARD_SECRET_MIN_CHARS:
            raise ValueError(f"must be at least {DASHBOARD_SECRET_MIN_CHARS} characters (empty: unset it)")
        return value

    @field_validator("chain_url")
    @classmethod
    def _parse_chain_url(cls, value: str | None) -> str | None:
        if value:  # empty: unset (the in-process chain)
            check_http_url(value)
        return value

    @field_validator("idle_in_transaction_timeout")
    @classmethod
    def _whole_milliseconds(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_DURATION_S:
            raise ValueError(f"must be 0 (off) or from {MIN_DURATION_S:g} to {MAX_PG_TIMEOUT_S:.0f} seconds: "
                             f"PostgreSQL takes it in whole milliseconds, so {value!r} would be 0 = off")
        return value

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
        if (self.dashboard_user is None) != (self.dashboard_password is None):
            raise ValueError("RUNNER_DASHBOARD_USER and RUNNER_DASHBOARD_PASSWORD go together (basic auth): "
                             "set both or neither")
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
        if min_size > max_size:
            raise ValueError(f"RUNNER_POOL_MIN_SIZE={min_size} exceeds the pool max of {max_size}")
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
        # half the lease, which fits PostgreSQL's int32 milliseconds (a lease of up to a year is allowed)
        return min(self.lease_timeout / 2, MAX_PG_TIMEOUT_S)

    def plugin_settings(self, cls: type[PluginSettings]) -> PluginSettings:
        """A plugin's settings: those validated by :func:`load_settings` with these, else read from the
        environment now (raises :class:`SettingsError`). Plugins cache the result per App."""
        found = self._plugins.get(cls)
        if isinstance(found, cls):
            return found
        return _validate(cls)

    def source_url(self, name: str) -> str | None:
        """The DSN of a named connection from ``RUNNER_SOURCE_<NAME>_URL`` (never stored in a job), or None
        when unset. Parsed on every call (see :func:`check_dsn`): raises :class:`SettingsError`, one line
        naming the variable and never the value, before anything tries to connect with it."""
        variable = f"RUNNER_SOURCE_{name.upper()}_URL"
        dsn = os.environ.get(variable)
        if dsn is not None:
            try:
                check_dsn(dsn)
            except DsnError as error:
                raise SettingsError(f"{variable}: {error}") from None
        return dsn


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


# pydantic's errors for a number out of its field's bounds, or no finite number at all: reworded to give
# the whole allowed range.
_NUMBER_ERRORS = frozenset({
    "finite_number", "greater_than", "greater_than_equal", "less_than", "less_than_equal", "float_parsing",
    "float_type", "int_parsing", "int_parsing_size", "int_type", "int_from_float",
})


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _allowed_range(cls: type[BaseSettings], name: str) -> str | None:
    """``a number from 0.001 to 2147483 seconds`` for a bounded numeric field, else None."""
    field = cls.model_fields.get(name)
    if field is None:
        return None
    bounds: dict[str, float] = {}
    for item in field.metadata:  # annotated_types.Gt, Ge, Lt, Le
        for key in ("gt", "ge", "lt", "le"):
            value = getattr(item, key, None)
            if isinstance(value, int | float):
                bounds[key] = value
    is_float = "float" in str(field.annotation)
    if not is_float:  # whole numbers: above 0 is from 1
        if "gt" in bounds:
            bounds["ge"] = bounds.pop("gt") + 1
        if "lt" in bounds:
            bounds["le"] = bounds.pop("lt") - 1
    low = f"from {_number(bounds['ge'])}" if "ge" in bounds else (
        f"above {_number(bounds['gt'])}" if "gt" in bounds else None)
    high = f"to {_number(bounds['le'])}" if "le" in bounds else (
        f"below {_number(bounds['lt'])}" if "lt" in bounds else None)
    if low is None and high is None:
        return None
    if low is None or high is None:
        text = (low or high or "").replace("from", "at least").replace("to", "at most")
    elif low.startswith("from") and high.startswith("to"):
        text = f"{low} {high}"
    else:
        text = f"{low} and {high.replace('to', 'at most')}"
    unit = " seconds" if is_float else ""  # every float of the core settings is a duration
    return f"{'a number' if is_float else 'a whole number'} {text}{unit}"


def _describe(error: ValidationError, prefix: str = ENV_PREFIX, cls: type[BaseSettings] = BaseSettings) -> str:
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if isinstance(part, str)]
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if not loc:
        return message
    # the core's numbers say their whole range (plugins keep pydantic's wording)
    if cls is Settings and first.get("type") in _NUMBER_ERRORS and (allowed := _allowed_range(cls, loc[0])):
        given = repr(first.get("input"))
        given = given if len(given) <= 40 else given[:37] + "..."
        return f"{prefix}{loc[0].upper()}: must be {allowed}, got {given}"
    return f"{prefix}{loc[0].upper()}: {message}"


def _validate(cls: type[PluginSettings]) -> PluginSettings:
    try:
        return cls()
    except ValidationError as error:
        raise SettingsError(_describe(error, _env_prefix(cls), cls)) from None


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
        raise SettingsError(_describe(error, ENV_PREFIX, Settings)) from None
    for name, likely in unknown_variables(classes):
        hint = f"; did you mean {likely}?" if likely else ""
        if settings.strict_settings:
            raise SettingsError(f"{name} is not a setting (RUNNER_STRICT_SETTINGS is true){hint}")
        if likely:
            _warn(f"{name} is not a setting{hint}")
    settings._plugins = {cls: _validate(cls) for cls in classes}
    return settings
