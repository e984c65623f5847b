"""The public Python API: runner.App, @app.job, enqueue in the caller's transaction, typed Job, --app."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import runner
from runner.config import load_settings
from tests.apps import shop
from tests.conftest import run_cli, start_worker, wait_exit


def async_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+asyncpg://", 1)


@pytest.fixture
async def engine(database_url: str) -> Any:
    engine = create_async_engine(async_url(database_url))
    yield engine
    await engine.dispose()


@pytest.fixture
async def shop_app(runner_env: dict[str, str]) -> Any:
    """The application's own module-level App, configured for this test's database."""
    shop.app.configure(load_settings())
    async with shop.app:
        yield shop.app


async def count_jobs(conn: asyncpg.Connection, kind: str = "charge_order") -> int:
    return int(await conn.fetchval("SELECT count(*) FROM runner_jobs WHERE kind = $1", kind))


async def test_enqueue_in_a_sqlalchemy_session_exists_iff_it_commits(
    shop_app: runner.App, engine: AsyncEngine, conn: asyncpg.Connection
) -> None:
    async with AsyncSession(engine) as session:
        async with session.begin():
            await session.execute(text("CREATE TABLE orders (id int PRIMARY KEY)"))
            await session.execute(text("INSERT INTO orders VALUES (1)"))
            await shop_app.enqueue("charge_order", {"order_id": 1}, connection=session)
            await session.rollback()
    assert await count_jobs(conn) == 0
    assert await conn.fetchval("SELECT to_regclass('orders')") is None  # the caller's own writes went too

    async with AsyncSession(engine) as session, session.begin():
        await session.execute(text("CREATE TABLE orders (id int PRIMARY KEY)"))
        job_id = await shop_app.enqueue("charge_order", {"order_id": 2}, connection=session)
        assert await count_jobs(conn) == 0  # not visible before the commit
    assert await count_jobs(conn) == 1
    job = await shop_app.get(job_id)
    assert isinstance(job, runner.Job)
    assert (job.kind, job.queue, job.status, job.max_attempts) == ("charge_order", "shop", "pending", 2)


async def test_enqueue_in_a_sqlalchemy_connection_and_an_asyncpg_transaction(
    shop_app: runner.App, engine: AsyncEngine, conn: asyncpg.Connection, database_url: str
) -> None:
    async with engine.connect() as sa_connection:
        await shop_app.enqueue_many("charge_order", [{"order_id": 1}, {"order_id": 2}], connection=sa_connection)
        await sa_connection.rollback()
    assert await count_jobs(conn) == 0
    async with engine.begin() as sa_connection:
        ids = await shop_app.enqueue_many("charge_order", [{"order_id": 3}, {"order_id": 4}], connection=sa_connection)
    assert len(ids) == 2 and await count_jobs(conn) == 2

    own = await asyncpg.connect(database_url)
    try:
        transaction = own.transaction()
        await transaction.start()
        await shop_app.enqueue("charge_order", {"order_id": 5}, connection=own)
        await transaction.rollback()
        assert await count_jobs(conn) == 2
        async with own.transaction():
            await shop_app.enqueue("charge_order", {"order_id": 6}, connection=own)
        assert await count_jobs(conn) == 3
    finally:
        await own.close()


async def test_bad_enqueues_are_refused_with_typed_errors_and_write_nothing(
    shop_app: runner.App, conn: asyncpg.Connection
) -> None:
    with pytest.raises(runner.UnknownKind, match=r"charge_ordr.*known: .*charge_order"):
        await shop_app.enqueue("charge_ordr", {"order_id": 1})
    with pytest.raises(runner.PayloadError, match="order_id must be an integer"):
        await shop_app.enqueue("charge_order", {"order_id": "x"})
    bad_options: list[dict[str, Any]] = [
        {"priority": 2**31}, {"max_attempts": 0}, {"delay": math.nan}, {"delay": 1e300}, {"queue": "a\nb"},
        {"queue": "q" * 10_000}, {"dedupe_key": "k" * 5000},
    ]
    for options in bad_options:
        with pytest.raises(runner.UsageError):
            await shop_app.enqueue("charge_order", {"order_id": 1}, **options)
    with pytest.raises(runner.PayloadError, match="NUL"):
        await shop_app.enqueue("charge_order", {"order_id": 1, "note": "a\x00b"})
    with pytest.raises(runner.UsageError):  # one bad job in a batch: none of the batch is written
        await shop_app.enqueue_many("charge_order", [{"order_id": 1}, {"order_id": None}])
    with pytest.raises(runner.UsageError, match="AsyncConnection"):
        await shop_app.enqueue("charge_order", {"order_id": 1}, connection=object())
    assert await count_jobs(conn) == 0


async def test_worker_app_runs_the_applications_kinds_and_keeps_results_and_tracebacks(
    shop_app: runner.App, runner_env: dict[str, str], tmp_path: Path
) -> None:
    charge = await shop_app.enqueue("charge_order", {"order_id": 7})
    refund = await shop_app.enqueue("refund_order", {"order_id": 8})
    log = tmp_path / "worker.log"
    worker = start_worker(runner_env, "--app", "tests.apps.shop:app", "--queue", "shop", "--drain", log_path=log,
                          RUNNER_LOG_LEVEL="debug")
    assert await wait_exit(worker, 120) == 0, log.read_text()[-3000:]

    charged = await shop_app.wait(charge, timeout=5)
    assert (charged.status, charged.result, charged.progress_done) == ("succeeded", {"charged": 7, "attempt": 1}, 1)
    refunded = await shop_app.wait(refund, timeout=5)
    assert refunded.status == "failed" and refunded.last_error is not None
    first_line, _, rest = refunded.last_error.partition("\n")
    assert first_line == "RuntimeError: card declined for order 8"
    assert "Traceback (most recent call last)" in rest and "in explode" in rest
    text_log = log.read_text()
    assert "job started" in text_log and "job finished" in text_log  # at debug
    assert "in explode" in text_log  # the traceback reaches the log too


async def test_list_cancel_retry_and_wait(shop_app: runner.App) -> None:
    ids = await shop_app.enqueue_many("charge_order", [{"order_id": n} for n in range(5)])
    await shop_app.enqueue("refund_order", {"order_id": 99})
    page = await shop_app.list(kind="charge_order", limit=3)
    assert [job.id for job in page] == sorted(ids, reverse=True)[:3]
    rest = await shop_app.list(kind="charge_order", limit=3, before_id=page[-1].id)
    assert [job.id for job in rest] == sorted(ids, reverse=True)[3:]
    assert await shop_app.cancel(ids[0]) == "cancelled"
    assert [job.id for job in await shop_app.list(status="cancelled")] == [ids[0]]
    cancelled = await shop_app.wait(ids[0], timeout=1)
    assert cancelled.finished and cancelled.status == "cancelled"
    await shop_app.retry(ids[0])
    assert (await shop_app.get(ids[0])).status == "pending"
    with pytest.raises(runner.WaitTimeout, match="still pending"):
        await shop_app.wait(ids[1], timeout=0.3)
    with pytest.raises(runner.JobNotFound):
        await shop_app.get(10**12)


async def test_an_app_that_is_not_open_says_so(runner_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    app = runner.App()
    with pytest.raises(runner.AppNotOpen, match="async with app"):
        await app.get(1)
    monkeypatch.delenv("RUNNER_DATABASE_URL")
    with pytest.raises(runner.UsageError, match="RUNNER_DATABASE_URL is not set"):
        async with runner.App():
            pass
    with pytest.raises(TypeError, match="async"):
        @app.job("sync_kind")
        def not_async(ctx: runner.JobContext) -> None: ...


async def test_the_cli_validates_against_the_apps_kinds(runner_env: dict[str, str], conn: asyncpg.Connection) -> None:
    shop_env = {"RUNNER_APP": "tests.apps.shop:app"}
    bad = run_cli(runner_env, "enqueue", "charge_order", "--payload", '{"order_id": "x"}', **shop_env)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: charge_order: invalid payload: order_id must be an integer"
    typo = run_cli(runner_env, "enqueue", "charge_ordr", **shop_env)
    assert typo.returncode == 2 and "unknown job kind 'charge_ordr'" in typo.stderr
    good = run_cli(runner_env, "enqueue", "charge_order", "--payload", '{"order_id": 3}', **shop_env)
    assert good.returncode == 0, good.stderr
    row = await conn.fetchrow("SELECT kind, queue FROM runner_jobs WHERE id = $1", int(good.stdout))
    assert tuple(row) == ("charge_order", "shop")  # the kind's own queue
    missing = run_cli(runner_env, "status", RUNNER_APP="tests.apps.nowhere:app")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no module named" in missing.stderr


async def test_a_result_given_to_complete_in_is_stored_as_json(runner_env: dict[str, str]) -> None:
    from runner.worker import Worker

    app = runner.App(name="settle")

    @app.job("settle")
    async def settle(ctx: runner.JobContext) -> None:
        async with ctx.db.transaction() as connection:  # the runner's own pool: its jsonb codec is set
            await ctx.complete_in(connection, {"settled": ctx.payload["n"], "text": "a \"quoted\" value"})

    app.configure(load_settings())
    async with app:
        job_id = await app.enqueue("settle", {"n": 3})
        await Worker(app, drain=True, install_signal_handlers=False).run()
        job = await app.get(job_id)
        assert (job.status, job.result) == ("succeeded", {"settled": 3, "text": "a \"quoted\" value"})
        assert await app.db.fetchval("SELECT jsonb_typeof(result) FROM runner_jobs WHERE id = $1", job_id) == "object"
