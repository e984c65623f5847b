"""The CLI as users run it: JSON contracts, and one clear line plus the right exit code on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.app import App
from tests.conftest import run_cli


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


async def test_migrate_is_idempotent(runner_env: dict[str, str]) -> None:
    for _ in range(2):
        result = run_cli(runner_env, "migrate")
        assert result.returncode == 0, result.stderr


async def test_schema_metadata_matches_the_migrations(database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine  # noqa: F401 - sync engine not available; use async below
    from sqlalchemy.ext.asyncio import create_async_engine

    from runner.migrate import async_url
    from runner.schema import metadata

    engine = create_async_engine(async_url(database_url))

    def diff(connection):  # type: ignore[no-untyped-def]
        context = MigrationContext.configure(connection, opts={"include_name": _runner_tables})
        return compare_metadata(context, metadata)

    async with engine.connect() as connection:
        differences = await connection.run_sync(diff)
    await engine.dispose()
    assert differences == []


def _runner_tables(name: str | None, type_: str, _parent: object) -> bool:
    return type_ != "table" or name in ("runner_jobs", "runner_workers", "runner_schedules")


async def test_enqueue_show_status_cancel_retry_json(runner_env: dict[str, str], app: App) -> None:
    created = run_cli(runner_env, "enqueue", "sleep", "--payload", '{"seconds": 5}', "--priority", "3")
    assert created.returncode == 0, created.stderr
    job_id = int(created.stdout.strip())
    shown = json.loads(run_cli(runner_env, "show", str(job_id), "--json").stdout)
    for key in ("id", "kind", "status", "attempts", "progress_done", "progress_total", "last_error"):
        assert key in shown
    assert (shown["id"], shown["kind"], shown["status"], shown["priority"]) == (job_id, "sleep", "pending", 3)
    status = json.loads(run_cli(runner_env, "status", "--json").stdout)
    assert status["jobs"]["pending"] == 1
    assert run_cli(runner_env, "cancel", str(job_id)).returncode == 0
    assert (await app.queue.job_get(job_id))["status"] == "cancelled"
    assert run_cli(runner_env, "retry", str(job_id)).returncode == 0
    assert (await app.queue.job_get(job_id))["status"] == "pending"


async def test_enqueue_jsonl_then_drain(runner_env: dict[str, str], tmp_path: Path, app: App) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(2500)))
    result = run_cli(runner_env, "enqueue", "noop", "--jsonl", str(path))
    assert (result.returncode, result.stdout.strip()) == (0, "2500")
    assert run_cli(runner_env, "worker", "--drain").returncode == 0
    assert await app.queue.job_counts_by_status() == {"succeeded": 2500}


async def test_enqueue_wait_exit_codes(runner_env: dict[str, str]) -> None:
    # --wait needs a worker; the failing job is fatal so it ends at once.
    import subprocess
    import sys

    from tests.conftest import ROOT, cli_env

    worker = subprocess.Popen([sys.executable, "-m", "runner", "worker"], env=cli_env(runner_env), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ok = run_cli(runner_env, "enqueue", "noop", "--wait")
        bad = run_cli(runner_env, "enqueue", "fail", "--payload", '{"fatal": true}', "--wait")
    finally:
        worker.terminate()
        worker.wait(30)
    assert ok.returncode == 0 and bad.returncode == 1


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["enqueue", "nosuchkind"], "unknown job kind 'nosuchkind'"),
        (["enqueue", "noop", "--payload", "[1, 2]"], "must be a JSON object"),
        (["enqueue", "noop", "--payload", "{oops"], "not valid JSON"),
        (["enqueue", "sleep", "--payload", '{"seconds": -1}'], "'seconds' must be a non-negative number"),
        (["enqueue", "noop", "--max-attempts", "0"], "max_attempts must be an integer between 1"),
        (["enqueue", "noop", "--delay", "-5"], "delay must be a number of seconds between 0"),
        (["worker", "--concurrency", "0"], "--concurrency must be positive"),
        (["show", "999999"], "no job with id 999999"),
        (["cancel", "999999"], "no job with id 999999"),
        (["retry", "999999"], "no job with id 999999"),
    ],
)
async def test_usage_errors_exit_2_with_one_line(
    runner_env: dict[str, str], app: App, args: list[str], fragment: str
) -> None:
    result = run_cli(runner_env, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert fragment in one_error_line(result.stderr)
    assert await app.queue.job_counts_by_status() == {}


async def test_invalid_setting_exits_2_naming_the_variable(runner_env: dict[str, str]) -> None:
    result = run_cli(runner_env, "status", RUNNER_POOL_MAX_SIZE="0")
    assert result.returncode == 2
    assert "RUNNER_POOL_MAX_SIZE" in one_error_line(result.stderr)


async def test_bad_jsonl_line_is_named_and_nothing_is_inserted(
    runner_env: dict[str, str], tmp_path: Path, app: App
) -> None:
    path = tmp_path / "jobs.jsonl"
    lines = [json.dumps({"i": i}) for i in range(1500)]
    lines[1203] = '{"i": 1203,'
    path.write_text("\n".join(lines) + "\n")
    result = run_cli(runner_env, "enqueue", "noop", "--jsonl", str(path))
    assert result.returncode == 2
    assert "line 1204" in one_error_line(result.stderr)
    assert await app.queue.job_counts_by_status() == {}


async def test_unreachable_database_fails_after_the_connect_timeout_without_the_password(
    runner_env: dict[str, str]
) -> None:
    result = run_cli(runner_env, "status", RUNNER_DATABASE_URL="postgresql://app:hunter2secret@127.0.0.1:1/x",
                     RUNNER_DB_CONNECT_TIMEOUT="1")
    assert result.returncode == 1
    assert "did not answer within 1s" in _last_line(result.stderr)
    assert "hunter2secret" not in result.stderr + result.stdout


def _last_line(stderr: str) -> str:
    """The one error line (start-up retries are logged as JSON lines before it)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


async def test_job_log_lines_carry_job_context(runner_env: dict[str, str], tmp_path: Path) -> None:
    run_cli(runner_env, "enqueue", "fail", "--payload", '{"message": "x", "fatal": true}')
    result = run_cli(runner_env, "worker", "--drain", RUNNER_WORKER_ID="ctx-worker")
    assert result.returncode == 0
    failed = [json.loads(line) for line in result.stderr.splitlines() if '"job failed"' in line]
    assert failed and all(
        {"job_id", "kind", "attempt", "worker_id"} <= set(line) and line["worker_id"] == "ctx-worker"
        for line in failed)


async def test_unmigrated_database_says_run_migrate(pg_server, runner_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    name = await pg_server.create_empty_database()
    try:
        result = run_cli(runner_env, "status", RUNNER_DATABASE_URL=pg_server.url(name))
    finally:
        await pg_server.drop(name)
    assert result.returncode == 1
    assert "run `runner migrate`" in _last_line(result.stderr)
