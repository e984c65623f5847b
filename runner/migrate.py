"""``runner migrate``: Alembic upgrade to head, idempotent and safe to run from many containers at once."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from runner.plugins import Plugin

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def async_url(dsn: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if dsn.startswith(prefix):
            return "postgresql+asyncpg://" + dsn[len(prefix) :]
    return dsn


def alembic_config(dsn: str, plugins: Sequence[Plugin]) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "newline")
    locations = [MIGRATIONS_DIR / "versions"] + [p.migrations for p in plugins if p.migrations]
    config.set_main_option("version_locations", "\n".join(str(p) for p in locations))
    config.attributes["async_url"] = async_url(dsn)
    return config


def _upgrade(dsn: str, plugins: Sequence[Plugin]) -> None:
    # The core and each plugin are branches of their own (a plugin's first revision depends on the core's):
    # plugins come and go without renumbering anyone's chain.
    command.upgrade(alembic_config(dsn, plugins), "heads")


async def migrate(dsn: str, plugins: Sequence[Plugin]) -> None:
    # Alembic's env runs its own event loop, so it gets a thread of its own.
    await asyncio.to_thread(_upgrade, dsn, plugins)


def head_revisions(plugins: Sequence[Plugin]) -> set[str]:
    """What ``alembic_version`` holds once every branch is at its head: the heads, less those another head
    depends on (alembic keeps only the dependent: 0015 of consensus ``depends_on`` 0014 of the core)."""
    script = ScriptDirectory.from_config(alembic_config("postgresql://", plugins))
    heads = set(script.get_heads())
    implied: set[str] = set()
    todo = [dependency for head in heads for dependency in _names(script.get_revision(head).dependencies)]
    while todo:  # a dependency implies its own ancestors too
        name = todo.pop()
        if name not in implied:
            implied.add(name)
            revision = script.get_revision(name)
            todo += [*_names(revision.down_revision), *_names(revision.dependencies)]
    return heads - implied


def _names(revisions: str | Sequence[str] | None) -> list[str]:
    if revisions is None:
        return []
    return [revisions] if isinstance(revisions, str) else list(revisions)


__all__ = ["MigrationContext", "alembic_config", "head_revisions", "migrate"]
