"""The database boundary: one bounded asyncpg pool per database, and the one retrying acquire.

Every connection runner uses comes from :meth:`Database.connection`, which retries a pool-acquire
timeout (the pool is exhausted) and transient connection errors with tenacity, then raises
:class:`PoolExhausted`. The only other connection is the LISTEN connection (:meth:`Database.listen_connection`).

The pool has two lanes. ``jobs`` (handlers, claims, maintenance) may hold at most ``max - reserved``
connections; ``control`` (heartbeats, completions, rescues, cancel checks) may use any free connection
and always has ``reserved`` of them, so a pool saturated by handlers never delays a lease renewal.
A failure to reset a connection after its statement succeeded never replaces that statement's result:
the connection is terminated and the result stands.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

import asyncpg
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from runner import metrics
from runner.config import Settings
from runner.config.dsn import DsnError, check_dsn
from runner.errors import DatabaseUnavailable, PoolExhausted, RunnerError, UsageError
from runner.logs import get_logger, redact_dsn

log = get_logger("runner.db")

# Errors after which a fresh attempt can succeed: the pool was full, or the server went away briefly.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InterfaceError,
)
# Raised by asyncpg for a DSN it cannot parse (an unknown scheme, a non-numeric port, a port past 65535),
# before or instead of connecting: no retry can fix one. Checked before TRANSIENT_ERRORS (the first is an
# InterfaceError).
DSN_ERRORS: tuple[type[BaseException], ...] = (asyncpg.exceptions.ClientConfigurationError, ValueError, OverflowError)
# The server answered and said no (a wrong password, an unknown role or database, no pg_hba.conf entry):
# waiting does not change its answer. A refused or reset connection stays transient (TRANSIENT_ERRORS).
REFUSALS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,  # 28000, and 28P01 (InvalidPasswordError)
    asyncpg.exceptions.InvalidCatalogNameError,  # 3D000: the database does not exist
)


class InvalidDsn(UsageError):
    """asyncpg cannot parse the DSN (exit 2). The message names where the DSN came from, never the DSN."""


class DatabaseRefused(RunnerError):
    """The server refused the connection: authentication or an unknown database (exit 1, not retried)."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int
    initial_backoff: float
    max_backoff: float
    max_wait: float
    acquire_timeout: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            attempts=settings.pool_retry_attempts,
            initial_backoff=settings.pool_retry_initial_backoff,
            max_backoff=settings.pool_retry_max_backoff,
            max_wait=settings.pool_retry_max_wait,
            acquire_timeout=settings.pool_acquire_timeout,
        )


Lane = Literal["jobs", "control"]
ResetHook = Callable[[asyncpg.Connection], Awaitable[None]]

# Server-side keepalives end a session whose client host vanished; client-side ones (set on the socket in
# _init_connection) notice a server that did. Seconds.
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3


@dataclass(frozen=True)
class PoolStats:
    min_size: int
    max_size: int
    size: int
    idle: int
    in_use: int
    waiters: int
    control_reserved: int = 0
    jobs_in_use: int = 0


def session_settings(settings: Settings, application: str) -> dict[str, str]:
    """Server settings every pool of runner's sets: timeouts that end what a frozen client left open."""
    return {
        "application_name": application_name(application),
        "statement_timeout": str(int(settings.statement_timeout * 1000)),
        "idle_in_transaction_session_timeout": str(int(settings.idle_in_transaction_timeout_s() * 1000)),
        "tcp_keepalives_idle": str(KEEPALIVE_IDLE_S),
        "tcp_keepalives_interval": str(KEEPALIVE_INTERVAL_S),
        "tcp_keepalives_count": str(KEEPALIVE_COUNT),
    }


def _enable_client_keepalive(connection: asyncpg.Connection) -> None:
    transport = getattr(connection, "_transport", None)  # asyncpg exposes no public socket accessor
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # unix sockets need none
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                          ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


async def _init_connection(connection: asyncpg.Connection) -> None:
    # jsonb arrives as Python objects; we send pre-serialised text where it matters for speed
    await connection.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await connection.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    _enable_client_keepalive(connection)


def application_name(worker_id: str) -> str:
    return f"runner:{worker_id}"[:63]  # PostgreSQL truncates at NAMEDATALEN - 1


class Database:
    """A bounded asyncpg pool plus the retrying acquire. One per database the process talks to."""

    def __init__(
        self,
        dsn: str,
        *,
        name: str,
        min_size: int,
        max_size: int,
        retry: RetryPolicy,
        server_settings: dict[str, str],
        statement_cache_size: int = 256,
        control_reserved: int = 0,
        reset: ResetHook | None = None,
        source: str | None = None,
    ) -> None:
        self.dsn = dsn
        self.name = name
        # where the DSN came from, for errors that must not print it (RUNNER_DATABASE_URL)
        self.source = source or f"the DSN of pool '{name}'"
        self.min_size = min_size
        self.max_size = max_size
        self.retry = retry
        self.server_settings = server_settings
        self.statement_cache_size = statement_cache_size
        self.control_reserved = control_reserved
        self._reset = reset  # extra work on release, after asyncpg's own reset (tests inject faults here)
        self._pool: asyncpg.Pool | None = None
        self._jobs_lane = asyncio.Semaphore(max_size - control_reserved)
        self._jobs_in_use = 0
        self._waiters = 0
        self.exhaustion_retries = 0
        self.give_ups = 0
        self.peak_in_use = 0
        self.release_failures = 0
        metrics.POOL_MAX.labels(name).set(max_size)
        # labelled children resolved once: acquire and release are on every job's path
        self._m_acquire_wait = metrics.POOL_ACQUIRE_WAIT.labels(name)
        self._m_size = metrics.POOL_SIZE.labels(name)
        self._m_idle = metrics.POOL_IDLE.labels(name)
        self._m_in_use = metrics.POOL_IN_USE.labels(name)
        self._m_waiters = metrics.POOL_WAITERS.labels(name)

    @classmethod
    def for_runner(cls, settings: Settings, dsn: str, *, reset: ResetHook | None = None) -> Database:
        budget = settings.pool_budget()
        return cls(
            dsn,
            name="runner",
            min_size=budget.min_size,
            max_size=budget.max_size,
            retry=RetryPolicy.from_settings(settings),
            server_settings=session_settings(settings, settings.worker_id),
            statement_cache_size=settings.statement_cache_size,
            control_reserved=budget.control_reserved,
            reset=reset,
            source="RUNNER_DATABASE_URL" if settings.database_url is not None else None,
        )

    # --- lifecycle ------------------------------------------------------------------------------
    async def open(self, connect_timeout: float) -> Database:
        """Create the pool, waiting for the server with backoff (containers start in any order). A DSN that
        cannot be parsed (:class:`InvalidDsn`) or a server that refuses it (:class:`DatabaseRefused`) fails
        at once; only an unreachable or starting server is waited for."""
        try:
            check_dsn(self.dsn)  # the settings' own check: RUNNER_*_URL were parsed at load already
        except DsnError as error:
            raise InvalidDsn(f"{self.source}: {error}") from None
        if not 0 <= self.min_size <= self.max_size:  # asyncpg's ValueError, raised here: below, one is the DSN's
            raise ValueError(f"pool '{self.name}': min_size {self.min_size} must be from 0 to max_size {self.max_size}")
        deadline = time.monotonic() + connect_timeout
        delay = 0.1
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                self._pool = await asyncio.wait_for(self._create_pool(), max(0.1, deadline - time.monotonic()))
                return self
            except DSN_ERRORS as error:
                # asyncpg's message may quote a piece of the DSN (which can be a piece of the password)
                raise InvalidDsn(f"{self.source}: asyncpg cannot parse this DSN ({type(error).__name__}); "
                                 "expected a postgresql:// URL") from None
            except REFUSALS as error:
                raise DatabaseRefused(
                    f"database {redact_dsn(self.dsn)} refused the connection: {error}"
                ) from None
            except TRANSIENT_ERRORS as error:
                last_error = error
                log.info("database not ready, retrying", pool=self.name, error=str(error), backoff_s=delay)
                await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 2.0)
        reason = str(last_error) if last_error else "timed out"
        raise DatabaseUnavailable(
            f"database {redact_dsn(self.dsn)} did not answer within {connect_timeout:g}s: {reason}"
        )

    async def _create_pool(self) -> asyncpg.Pool:
        return await asyncpg.create_pool(
            self.dsn,
            min_size=self.min_size,
            max_size=self.max_size,
            init=_init_connection,
            server_settings=self.server_settings,
            statement_cache_size=self.statement_cache_size,
            max_inactive_connection_lifetime=60.0,
            reset=self._reset,
        )

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 10)
            except TimeoutError:
                pool.terminate()

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    # --- the one acquire ------------------------------------------------------------------------
    @asynccontextmanager
    async def connection(self, lane: Lane = "jobs") -> AsyncIterator[asyncpg.Connection]:
        """Borrow a connection for database work only; it goes back when the block ends."""
        connection = await self._acquire(lane)
        try:
            yield connection
        finally:
            await self._release(connection, lane)

    @asynccontextmanager
    async def transaction(self, lane: Lane = "jobs") -> AsyncIterator[asyncpg.Connection]:
        async with self.connection(lane) as connection, connection.transaction():
            yield connection

    async def _acquire(self, lane: Lane) -> asyncpg.Connection:
        pool = self._require_pool()
        started = time.monotonic()
        self._waiters += 1
        try:
            try:  # the common case costs one acquire; tenacity steps in only after a failure
                connection = await self._acquire_once(pool, lane)
            except TRANSIENT_ERRORS as first_error:
                if self.retry.attempts <= 1:
                    raise self._give_up(first_error) from first_error
                self._count_first_failure(first_error)
                connection = await self._acquire_retrying(pool, lane)
        except RetryError as error:
            cause = error.last_attempt.exception()
            raise self._give_up(cause) from cause
        finally:
            self._waiters -= 1
        self._m_acquire_wait.observe(time.monotonic() - started)
        self._sample()
        return connection

    async def _acquire_once(self, pool: asyncpg.Pool, lane: Lane) -> asyncpg.Connection:
        # A pool's connection is a proxy with the Connection interface; callers see it as a Connection.
        if lane == "control":
            return cast(asyncpg.Connection, await pool.acquire(timeout=self.retry.acquire_timeout))
        deadline = time.monotonic() + self.retry.acquire_timeout
        async with asyncio.timeout(self.retry.acquire_timeout):
            await self._jobs_lane.acquire()
        try:
            connection = await pool.acquire(timeout=max(0.001, deadline - time.monotonic()))
        except BaseException:
            self._jobs_lane.release()
            raise
        self._jobs_in_use += 1
        return cast(asyncpg.Connection, connection)

    def _give_up(self, cause: BaseException | None) -> PoolExhausted:
        self.give_ups += 1
        metrics.POOL_GIVE_UPS.labels(self.name).inc()
        log.error("pool exhausted, giving up", pool=self.name, error=repr(cause), max_size=self.max_size)
        return PoolExhausted(
            f"no connection from pool '{self.name}' (max {self.max_size}) after "
            f"{self.retry.attempts} attempts: {cause!r}"
        )

    async def _release(self, connection: asyncpg.Connection, lane: Lane) -> None:
        try:
            pool = self._pool
            if pool is None:
                connection.terminate()
                return
            try:
                await pool.release(connection)  # type: ignore[arg-type]  # it is the pool's proxy
            except Exception as error:
                # asyncpg has terminated the connection (the pool opens a new one); whatever the block
                # ran has already happened, so its result must not be replaced by this error.
                self.release_failures += 1
                metrics.POOL_RELEASE_FAILURES.labels(self.name).inc()
                log.warning("connection reset failed on release; terminated", pool=self.name, error=repr(error))
            self._sample()
        finally:
            if lane == "jobs":
                self._jobs_in_use -= 1
                self._jobs_lane.release()

    async def _acquire_retrying(self, pool: asyncpg.Pool, lane: Lane) -> asyncpg.Connection:
        async for attempt in self._retrying():
            with attempt:
                return await self._acquire_once(pool, lane)
        raise AssertionError("unreachable: tenacity either returns or raises RetryError")

    def _count_first_failure(self, error: BaseException) -> None:
        self.exhaustion_retries += 1
        metrics.POOL_EXHAUSTION_RETRIES.labels(self.name).inc()
        log.warning("pool acquire retry", pool=self.name, attempt=1, max_attempts=self.retry.attempts,
                    error=repr(error))

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception_type(TRANSIENT_ERRORS),
            stop=stop_after_attempt(self.retry.attempts - 1) | stop_after_delay(self.retry.max_wait),
            wait=wait_exponential_jitter(
                multiplier=self.retry.initial_backoff, max=self.retry.max_backoff, jitter=self.retry.initial_backoff
            ),
            before_sleep=self._count_retry,
        )

    def _count_retry(self, state: RetryCallState) -> None:
        self.exhaustion_retries += 1
        metrics.POOL_EXHAUSTION_RETRIES.labels(self.name).inc()
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "pool acquire retry",
            pool=self.name,
            attempt=state.attempt_number + 1,
            max_attempts=self.retry.attempts,
            error=repr(error),
            backoff_s=round(state.upcoming_sleep, 3),
        )

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise DatabaseUnavailable(f"pool '{self.name}' is not open")
        return self._pool

    # --- observability --------------------------------------------------------------------------
    def stats(self) -> PoolStats:
        pool = self._pool
        size = pool.get_size() if pool else 0
        idle = pool.get_idle_size() if pool else 0
        return PoolStats(self.min_size, self.max_size, size, idle, size - idle, self._waiters,
                         self.control_reserved, self._jobs_in_use)

    def pool_use(self) -> dict[str, int]:
        """What the worker's heartbeat stores for the dashboard: the pool as of now, and its counters."""
        stats = self.stats()
        return {"size": stats.size, "max": stats.max_size, "in_use": stats.in_use, "waiters": stats.waiters,
                "peak_in_use": max(self.peak_in_use, stats.in_use), "exhaustion_retries": self.exhaustion_retries,
                "give_ups": self.give_ups}

    def _sample(self) -> None:
        stats = self.stats()
        self.peak_in_use = max(self.peak_in_use, stats.in_use)
        self._m_size.set(stats.size)
        self._m_idle.set(stats.idle)
        self._m_in_use.set(stats.in_use)
        self._m_waiters.set(stats.waiters)

    # --- conveniences: each borrows a connection for exactly one statement ------------------------
    async def execute(self, query: str, *args: Any, lane: Lane = "jobs") -> str:
        async with self.connection(lane) as connection:
            return await connection.execute(query, *args)  # type: ignore[no-any-return]

    async def fetch(self, query: str, *args: Any, lane: Lane = "jobs") -> list[asyncpg.Record]:
        async with self.connection(lane) as connection:
            return await connection.fetch(query, *args)  # type: ignore[no-any-return]

    async def fetchrow(self, query: str, *args: Any, lane: Lane = "jobs") -> asyncpg.Record | None:
        async with self.connection(lane) as connection:
            return await connection.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any, lane: Lane = "jobs") -> Any:
        async with self.connection(lane) as connection:
            return await connection.fetchval(query, *args)

    # --- the single LISTEN connection -----------------------------------------------------------
    async def listen_connection(self, dsn: str | None = None) -> asyncpg.Connection:
        """A dedicated connection for LISTEN (session state cannot live behind a pooled connection)."""
        try:
            return await asyncpg.connect(
                dsn or self.dsn,
                server_settings={**self.server_settings, "application_name": self.server_settings.get(
                    "application_name", "runner") [:55] + ":listen"},
                statement_cache_size=0,
                timeout=self.retry.acquire_timeout,
            )
        except DSN_ERRORS as error:  # as in open(): asyncpg's message may quote a piece of the password
            raise InvalidDsn(f"{self.source} (LISTEN): asyncpg cannot parse this DSN ({type(error).__name__})") \
                from None
