"""Named connections: ``default`` is the runner's pool; any other name is a small pool made on first use.

``RUNNER_SOURCE_<NAME>_URL`` gives the DSN, which stays in this process: payloads, job rows and logs
carry only the name. Each named pool is a :class:`runner.db.Database` (the same retrying acquire), starts
with no connection, holds at most :data:`NAMED_POOL_MAX_SIZE`, and is closed once unused for
:data:`IDLE_CLOSE_S` seconds, and at process stop.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from runner.app import App
from runner.config import SettingsError
from runner.db import Database, RetryPolicy, session_settings
from runner.errors import PayloadError
from runner.jobs.backfill.spec import DEFAULT_CONNECTION
from runner.logs import get_logger

log = get_logger("runner.jobs.backfill.pools")

RESOURCE_KEY = "backfill_pools"
NAMED_POOL_MIN_SIZE = 0
NAMED_POOL_MAX_SIZE = 4
IDLE_CLOSE_S = 30.0
# Our key text round-trips through these settings (checkpoints store the last key as text).
SESSION_SETTINGS = {"DateStyle": "ISO", "IntervalStyle": "postgres", "extra_float_digits": "3"}


class NamedPools:
    def __init__(self, app: App, idle_close_s: float = IDLE_CLOSE_S) -> None:
        self.app = app
        self.idle_close_s = idle_close_s
        self._pools: dict[str, Database] = {}
        self._users: Counter[str] = Counter()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    @asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[Database]:
        """The pool for a connection name, kept open while any caller uses it."""
        db = await self._get(name)
        self._users[name] += 1
        self._cancel_timer(name)
        try:
            yield db
        finally:
            self._users[name] -= 1
            if self._users[name] == 0 and name in self._pools:
                self._timers[name] = asyncio.get_running_loop().call_later(self.idle_close_s, self._idle, name)

    def open_names(self) -> list[str]:
        return sorted(self._pools)

    async def close(self) -> None:
        for name in list(self._timers):
            self._cancel_timer(name)
        pools, self._pools = self._pools, {}
        for db in pools.values():
            await db.close()
        if self._closing:
            await asyncio.wait(self._closing)

    async def _get(self, name: str) -> Database:
        if name == DEFAULT_CONNECTION:
            return self.app.db
        async with self._lock:
            db = self._pools.get(name)
            if db is None:
                db = await self._open(name)
                self._pools[name] = db
            return db

    async def _open(self, name: str) -> Database:
        settings = self.app.settings
        variable = f"RUNNER_SOURCE_{name.upper()}_URL"
        try:
            dsn = settings.source_url(name)  # parsed there: a bad DSN is one line naming the variable
        except SettingsError as error:
            raise PayloadError(str(error)) from None
        if not dsn:
            raise PayloadError(f"unknown connection {name!r}: set {variable}")
        db = Database(
            dsn,
            name=f"backfill:{name}",
            min_size=NAMED_POOL_MIN_SIZE,
            max_size=NAMED_POOL_MAX_SIZE,
            retry=RetryPolicy.from_settings(settings),
            server_settings={**session_settings(settings, f"{settings.worker_id}:{name}"), **SESSION_SETTINGS},
            statement_cache_size=settings.statement_cache_size,
            source=variable,
        )
        await db.open(settings.db_connect_timeout)
        log.info("named pool opened", connection=name, pool_max=NAMED_POOL_MAX_SIZE)
        return db

    def _cancel_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _idle(self, name: str) -> None:
        self._timers.pop(name, None)
        if self._users[name] or name not in self._pools:
            return
        db = self._pools.pop(name)
        task = asyncio.get_running_loop().create_task(db.close(), name=f"close-pool-{name}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        log.info("named pool closed after idling", connection=name, idle_s=self.idle_close_s)


def named_pools(app: App) -> NamedPools:
    pools = app.resources.get(RESOURCE_KEY)
    if pools is None:
        pools = app.resources[RESOURCE_KEY] = NamedPools(app)
    return pools  # type: ignore[no-any-return]


async def close_named_pools(app: App) -> None:
    pools = app.resources.pop(RESOURCE_KEY, None)
    if pools is not None:
        await pools.close()
