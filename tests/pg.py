"""The real PostgreSQL the tests use: RUNNER_TEST_DATABASE_URL, or an embedded server of their own."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from runner.embedded import EmbeddedPostgres
from runner.migrate import migrate
from runner.plugins import Plugin

TEMPLATE = "runner_test_template"


def plugins_with_test_kinds() -> list[Plugin]:
    """The installed plugins and the tests' own kinds (tests/kinds.py): what RUNNER_APP=tests.kinds:app loads."""
    from tests.kinds import app

    return app.all_plugins()


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


@dataclass
class TestServer:
    __test__ = False  # not a test class, despite the name

    admin_url: str
    embedded: EmbeddedPostgres | None

    def url(self, database: str) -> str:
        return with_database(self.admin_url, database)

    async def prepare_template(self) -> None:
        await self.drop(TEMPLATE)
        await self.execute(f'CREATE DATABASE "{TEMPLATE}"')
        await migrate(self.url(TEMPLATE), plugins_with_test_kinds())

    async def create_database(self, prefix: str = "t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        await self.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
        return name

    async def create_empty_database(self, prefix: str = "e") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        await self.execute(f'CREATE DATABASE "{name}"')
        return name

    async def drop(self, name: str) -> None:
        await self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def execute(self, statement: str) -> None:
        connection = await asyncpg.connect(self.admin_url)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    def restart(self) -> None:
        if self.embedded is None:
            raise RuntimeError("restart needs the embedded test server (RUNNER_TEST_DATABASE_URL is set)")
        self.embedded.restart()

    def stop(self) -> None:
        """Stop and delete a server this run made for itself (never one named by RUNNER_TEST_*)."""
        if self.embedded is None or self.owned_dir is None:
            return
        self.embedded.stop()
        shutil.rmtree(self.owned_dir, ignore_errors=True)

    owned_dir: Path | None = None


def start_test_server() -> TestServer:
    """RUNNER_TEST_DATABASE_URL, else RUNNER_TEST_HOME (kept), else a server in a new folder of this run's
    own, so two checkouts or two runs on one machine never share one."""
    url = os.environ.get("RUNNER_TEST_DATABASE_URL")
    if url:
        return TestServer(url, None)
    owned: Path | None = None
    if os.environ.get("RUNNER_TEST_HOME"):
        home = Path(os.environ["RUNNER_TEST_HOME"])
    else:
        owned = Path(tempfile.mkdtemp(prefix="runner-test-"))
        owned.chmod(0o711)  # the server runs as an unprivileged user under root: it must enter the folder
        home = owned / "pg"
    server = EmbeddedPostgres(home)
    server.ensure_started()
    return TestServer(server.url("postgres"), server, owned)


async def holds(value: bool) -> bool:
    """A plain condition as wait_until's predicate: ``wait_until(lambda: holds(x.done))``."""
    return value


async def wait_until(predicate, timeout_s: float = 30.0, interval_s: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll an async predicate until it returns a truthy value; return it, or fail on timeout."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)
