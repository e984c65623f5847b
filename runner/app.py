"""The process-wide singletons: settings, the one pool, the queue interface, plugins, and the chain."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from runner.config import Settings
from runner.db import Database
from runner.embedded import EmbeddedPostgres
from runner.logs import get_logger, redact_dsn
from runner.plugins import Plugin, Registry, build_registry, load_plugins
from runner.queue import JobQueue

log = get_logger("runner.app")


def database_url(settings: Settings) -> str:
    """RUNNER_DATABASE_URL, or the embedded default (started on first use). Blocking: not for the loop."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    return EmbeddedPostgres(settings.home).ensure_started()


@dataclass
class App:
    settings: Settings
    dsn: str
    db: Database
    queue: JobQueue
    plugins: list[Plugin]
    registry: Registry
    # Process-wide resources opened by plugins (the shared AsyncWeb3 lives under "chain").
    resources: dict[str, Any] = field(default_factory=dict)

    @classmethod
    async def open(cls, settings: Settings, *, with_resources: bool = False) -> App:
        dsn = await asyncio.to_thread(database_url, settings)
        db = Database.for_runner(settings, dsn)
        budget = settings.pool_budget()
        log.debug(
            "opening pool",
            database=redact_dsn(dsn),
            pool_min=budget.min_size,
            pool_max=budget.max_size,
            derived=budget.derived,
            formula=budget.formula(),
            db_max_connections=budget.db_max_connections,
            worker_replicas=budget.worker_replicas,
        )
        await db.open(settings.db_connect_timeout)
        plugins = load_plugins()
        registry = build_registry(plugins)
        queue = JobQueue(db, max_attempts_for=lambda kind: registry.max_attempts(kind, settings.default_max_attempts))
        app = cls(settings, dsn, db, queue, plugins, registry)
        if with_resources:
            try:
                await app.open_resources()
            except BaseException:
                await app.close()
                raise
        return app

    async def open_resources(self) -> None:
        for plugin in self.plugins:
            if plugin.open_resources is not None:
                await plugin.open_resources(self)

    async def close(self) -> None:
        for plugin in reversed(self.plugins):
            if plugin.close_resources is not None:
                try:
                    await plugin.close_resources(self)
                except Exception as error:  # closing must go on for the others
                    log.warning("closing plugin resources failed", plugin=plugin.name, error=repr(error))
        await self.db.close()
