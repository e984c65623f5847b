"""Alembic environment: async engine on asyncpg, serialised by an advisory lock so concurrent
``runner migrate`` runs (one per container) are safe and idempotent."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from runner.schema import metadata

MIGRATION_LOCK_KEY = 0x72756E6E6572  # "runner"


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, transaction_per_migration=False)
    with context.begin_transaction():
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()


async def _main() -> None:
    url = context.config.attributes["async_url"]
    engine = create_async_engine(url, connect_args=context.config.attributes.get("connect_args", {}))
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


asyncio.run(_main())
