"""Fixtures: one real PostgreSQL per session, a fresh migrated database per test (cloned from a template)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from runner.app import App
from runner.config import Settings, load_settings
from tests.kinds import REFERENCE as TEST_KINDS
from tests.pg import TestServer, start_test_server
from tests.stress import Stress, cpu_hogs

ROOT = Path(__file__).resolve().parent.parent

# Test-speed lease timing; every value is still validated like production settings.
FAST_ENV = {
    "RUNNER_HEARTBEAT_INTERVAL": "0.5",
    "RUNNER_LEASE_TIMEOUT": "2",
    "RUNNER_RESCUE_INTERVAL": "0.5",
    "RUNNER_POLL_INTERVAL": "0.2",
    "RUNNER_SHUTDOWN_GRACE": "5",
    "RUNNER_RETRY_BACKOFF_BASE": "0.05",
    "RUNNER_RETRY_BACKOFF_MAX": "0.2",
    "RUNNER_LOG_FORMAT": "json",
    "RUNNER_HTTP_ENABLED": "false",
    # The in-process chain adds seconds to every worker start; consensus tests turn it on explicitly.
    "RUNNER_CONSENSUS_ENABLED": "false",
    # The tests' own kinds (record, fail) and their table: in-process apps, CLI calls and workers (cwd ROOT).
    "RUNNER_APP": TEST_KINDS,
}


@pytest.fixture(scope="session")
async def pg_server() -> AsyncIterator[TestServer]:
    server = start_test_server()
    try:
        await server.prepare_template()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def database_url(pg_server: TestServer) -> AsyncIterator[str]:
    name = await pg_server.create_database()
    yield pg_server.url(name)
    await pg_server.drop(name)


@pytest.fixture
def runner_env(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Environment for the worker under test (in-process via monkeypatch, and for subprocesses)."""
    for key in list(os.environ):
        if key.startswith("RUNNER_") and not key.startswith(("RUNNER_TEST_", "RUNNER_BENCH_")):
            monkeypatch.delenv(key)
    env = {"RUNNER_DATABASE_URL": database_url, "RUNNER_HOME": str(tmp_path / "home"), **FAST_ENV}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield env


@pytest.fixture
def settings(runner_env: dict[str, str]) -> Settings:
    return load_settings()


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[App]:
    app = await App.open(settings)
    yield app
    await app.close()


@pytest.fixture
def stress(app: App, runner_env: dict[str, str]) -> Iterator[Stress]:
    """Two CPU hogs for the test's length, a small pool for its workers, and pause_past_lease()."""
    with cpu_hogs(2) as hogs:
        yield Stress(app, runner_env, hogs)


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


def cli_env(runner_env: dict[str, str], **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_") or k.startswith("RUNNER_TEST_")}
    return {**base, **runner_env, **extra}


def run_cli(
    runner_env: dict[str, str], *args: str, timeout: float = 120, **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runner", *args], env=cli_env(runner_env, **extra), cwd=ROOT,
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


async def wait_exit(process: subprocess.Popen[str], timeout_s: float = 180) -> int:
    return await asyncio.wait_for(asyncio.to_thread(process.wait), timeout_s)


async def finished_row(app: App, job_id: int) -> dict[str, object] | None:
    """The job's row once it is succeeded, failed or cancelled; None before."""
    row = await app.queue.job_get(job_id)
    return row if row["status"] in ("succeeded", "failed", "cancelled") else None


def start_worker(
    runner_env: dict[str, str], *args: str, log_path: Path | None = None, **extra: str
) -> subprocess.Popen[str]:
    sink = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "runner", "worker", *args], env=cli_env(runner_env, **extra), cwd=ROOT,
        stdout=sink, stderr=subprocess.STDOUT if log_path else subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        text=True,
    )
