"""Every knob of runner is an env var prefixed ``RUNNER_``; all durations are in seconds.

Settings are validated once at start-up and frozen. An unknown ``RUNNER_*`` variable is an error, not
silently ignored, so a typo such as ``RUNNER_LEASE_TIMOUT`` cannot leave a default in force.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "RUNNER_"
# Families of variables that are read elsewhere by name, not as fields of Settings.
_FREE_FORM_PREFIXES = ("RUNNER_SOURCE_", "RUNNER_TEST_", "RUNNER_BENCH_")
_SOURCE_URL = re.compile(r"^RUNNER_SOURCE_([A-Z0-9_]+)_URL$")

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

    # --- application ----------------------------------------------------------------------------
    # ``module:attribute`` of an application's ``runner.App``: its kinds join the entry-point plugins'.
    app: str | None = None

    # --- database -------------------------------------------------------------------------------
    database_url: SecretStr | None = None
    listen_database_url: SecretStr | None = None  # direct connection for LISTEN when behind PgBouncer
    home: Path = Path(".runner")
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

    # --- chain and consensus --------------------------------------------------------------------
    chain_url: str | None = None
    chain_max_connections: int = Field(4, gt=0)
    chain_rpc_timeout: float = Field(10.0, gt=0)
    chain_retry_attempts: int = Field(6, gt=0)
    chain_private_key: SecretStr | None = None
    consensus_enabled: bool = True
    consensus_concurrency: int = Field(8, gt=0)
    consensus_validators: int = Field(5, gt=0)
    consensus_disagree_rate: float = Field(0.0, ge=0, le=1)
    consensus_leader_timeout: float = Field(10.0, gt=0)
    consensus_validator_timeout: float = Field(10.0, gt=0)
    finality_window: float = Field(5.0, ge=0)
    tx_stuck_after: float = Field(60.0, gt=0)

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

    def source_url(self, name: str) -> str | None:
        """The DSN of a named connection from ``RUNNER_SOURCE_<NAME>_URL`` (never stored in a job)."""
        return os.environ.get(f"RUNNER_SOURCE_{name.upper()}_URL")


def source_names() -> list[str]:
    return sorted(m.group(1).lower() for k in os.environ if (m := _SOURCE_URL.match(k)))


def _unknown_variables() -> list[str]:
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    return sorted(
        key
        for key in os.environ
        if key.startswith(ENV_PREFIX) and key not in known and not key.startswith(_FREE_FORM_PREFIXES)
    )


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if isinstance(part, str)]
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if loc:
        return f"{ENV_PREFIX}{loc[0].upper()}: {message}"
    return message


def load_settings(**overrides: object) -> Settings:
    """Read and validate settings; raise :class:`SettingsError` with one line naming the variable."""
    unknown = _unknown_variables()
    if unknown:
        raise SettingsError(f"{unknown[0]}: unknown setting (check the spelling)")
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None
