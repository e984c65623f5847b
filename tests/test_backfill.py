"""Backfill: exact copies (count + md5 over ordered rows) on a real PostgreSQL, within one database and
across two (a second database on the test server, named ``other`` via RUNNER_SOURCE_OTHER_URL)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from runner.app import App
from runner.errors import PayloadError
from runner.jobs.backfill.cli import watch
from runner.jobs.backfill.pools import NamedPools, named_pools
from runner.queue import NewJob
from runner.worker import Worker
from tests.pg import TestServer, holds, wait_until

COLUMNS_DDL = """
    id bigint PRIMARY KEY, qty integer, name text, created_at timestamptz NOT NULL,
    amount numeric(12, 2), doc jsonb, note text
"""
# NULLs in every nullable column, jsonb 'null' next to SQL NULL, quotes, backslashes, newlines, unicode.
SEED = """
INSERT INTO {table}
SELECT g,
       CASE WHEN g % 11 = 0 THEN NULL ELSE (g * 7) % 100 END,
       CASE WHEN g % 13 = 0 THEN NULL WHEN g % 5 = 0 THEN E'O''Brien \\\\ "q" \\n é ' || g ELSE 'n' || g END,
       timestamptz '2024-01-01 00:00:00+00' + g * interval '1 minute',
       CASE WHEN g % 10 = 0 THEN NULL ELSE round((g * 1.37)::numeric, 2) END,
       CASE WHEN g % 7 = 0 THEN NULL WHEN g % 9 = 0 THEN 'null'::jsonb
            ELSE jsonb_build_object('g', g, 'tags', jsonb_build_array('a', g % 3, NULL),
                                    'nested', jsonb_build_object('x', g / 2.0)) END,
       CASE WHEN g % 3 = 0 THEN NULL ELSE md5(g::text) END
FROM generate_series($1::bigint, $2::bigint) AS g
"""
DIGEST = "SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t.id), '')) FROM {table} t WHERE {where}"
FILTERS = [["amount", ">=", "20"], ["note", "not_null"], ["created_at", "<", "2024-01-03 00:00:00+00"],
           ["qty", "in", ["0", "7", "14", "21", "28", "35", "42", "49", "56", "63", "70", "77", "84", "91", "98"]],
           ["name", "!=", "n42"]]
FILTERS_SQL = ("amount >= 20 AND note IS NOT NULL AND created_at < '2024-01-03 00:00:00+00' "
               "AND qty IN (0,7,14,21,28,35,42,49,56,63,70,77,84,91,98) AND name <> 'n42'")


# --- helpers shared by the backfill test modules --------------------------------------------------------
async def execute(url: str, sql: str, *args: Any) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(sql, *args)
    finally:
        await connection.close()


async def fetchval(url: str, sql: str, *args: Any) -> Any:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchval(sql, *args)
    finally:
        await connection.close()


async def make_table(url: str, table: str, rows: int, first: int = 1) -> None:
    await execute(url, f"CREATE TABLE IF NOT EXISTS {table} ({COLUMNS_DDL})")
    if rows:
        await execute(url, SEED.format(table=table), first, first + rows - 1)


async def digest(url: str, table: str, where: str = "true") -> tuple[int, str]:
    connection = await asyncpg.connect(url)
    try:
        row = await connection.fetchrow(DIGEST.format(table=table, where=where))
    finally:
        await connection.close()
    assert row is not None
    return row[0], row[1]


async def run_backfill(app: App, payload: dict[str, Any], max_attempts: int = 5) -> dict[str, Any]:
    """Validate and enqueue like the CLI, run an in-process worker until drained, return the job row."""
    kind = app.registry.get("backfill")
    assert kind.validate is not None
    await kind.validate(payload, app)
    job_id, _ = await app.queue.job_enqueue(NewJob("backfill", payload, max_attempts=max_attempts))
    await Worker(app, drain=True, install_signal_handlers=False).run()
    return await app.queue.job_get(job_id)


@pytest.fixture
async def other_url(pg_server: TestServer, runner_env: dict[str, str],
                    monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """A second database, the named connection ``other`` (for subprocesses too, through runner_env)."""
    name = await pg_server.create_empty_database()
    url = pg_server.url(name)
    runner_env["RUNNER_SOURCE_OTHER_URL"] = url
    monkeypatch.setenv("RUNNER_SOURCE_OTHER_URL", url)
    yield url
    await pg_server.drop(name)


def route_urls(route: str, database_url: str, other_url: str) -> tuple[str, str, str, str]:
    """(source name, source url, dest name, dest url) for a route."""
    return {
        "within": ("default", database_url, "default", database_url),
        "into_runner": ("other", other_url, "default", database_url),
        "out_of_runner": ("default", database_url, "other", other_url),
    }[route]


# --- exact copies ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("filtered", [False, True], ids=["all", "filtered"])
@pytest.mark.parametrize("mode", ["insert", "upsert"])
@pytest.mark.parametrize("route", ["within", "into_runner", "out_of_runner"])
async def test_copy_is_exact(app: App, database_url: str, other_url: str, route: str, mode: str,
                             filtered: bool) -> None:
    source, source_url, dest, dest_url = route_urls(route, database_url, other_url)
    await make_table(source_url, "src", 3000)
    await make_table(dest_url, "dst", 0)
    where = FILTERS_SQL if filtered else "true"
    # The destination already holds part of the result: identical rows for insert (a re-run), stale
    # versions for upsert (they must be overwritten).
    await copy_rows_between(source_url, dest_url, f"({where}) AND id % 4 = 1 AND id < 2000", stale=mode == "upsert")
    payload = {"source": source, "source_table": "public.src", "dest": dest, "dest_table": "dst",
               "batch_size": 97, "mode": mode, "filters": FILTERS if filtered else []}

    job = await run_backfill(app, payload)

    expected = await digest(source_url, "src", where)
    assert job["status"] == "succeeded", job["last_error"]
    assert await digest(dest_url, "dst") == expected
    assert job["progress_done"] == job["progress_total"] == expected[0]
    assert expected[0] > 30 if filtered else expected[0] == 3000


async def copy_rows_between(source_url: str, dest_url: str, where: str, stale: bool) -> None:
    connection = await asyncpg.connect(source_url)
    try:
        rows = await connection.fetch(f"SELECT id FROM src WHERE {where}")
    finally:
        await connection.close()
    ids = [r["id"] for r in rows]
    assert ids, "the test needs some rows in the destination beforehand"
    if stale:
        await execute(dest_url, "INSERT INTO dst (id, name, created_at, doc) "
                                "SELECT i, 'stale', now(), '{\"stale\": 1}' FROM unnest($1::bigint[]) AS i", ids)
    else:
        await make_table(dest_url, "dst", 3000)
        await execute(dest_url, "DELETE FROM dst WHERE NOT id = ANY($1::bigint[])", ids)


async def test_create_table_copies_into_a_new_table_with_the_key_as_primary_key(
        app: App, database_url: str, other_url: str) -> None:
    await make_table(database_url, "src", 1234)
    job = await run_backfill(app, {"source_table": "public.src", "dest": "other", "dest_table": "public.copy",
                                   "create_table": True, "batch_size": 500})
    assert job["status"] == "succeeded", job["last_error"]
    assert await digest(other_url, "copy") == await digest(database_url, "src")
    primary_key = await fetchval(other_url, "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                                            "WHERE conrelid = 'public.copy'::regclass AND contype = 'p'")
    assert primary_key == "PRIMARY KEY (id)"


async def test_empty_source_succeeds_with_zero_progress(app: App, database_url: str) -> None:
    await make_table(database_url, "src", 0)
    job = await run_backfill(app, {"source_table": "src", "dest_table": "dst", "create_table": True})
    assert job["status"] == "succeeded", job["last_error"]
    assert (job["progress_done"], job["progress_total"]) == (0, 0)
    assert await fetchval(database_url, "SELECT count(*) FROM dst") == 0


@pytest.mark.parametrize("key_type, key_expr", [
    ("text", "'k' || lpad(g::text, 6, '0') || CASE WHEN g % 2 = 0 THEN ' Z' ELSE 'a' END"),
    ("uuid", "md5(g::text)::uuid"),
    ("timestamptz", "timestamptz '2024-03-01 12:00:00.123456+00' + g * interval '1.5 seconds'"),
    ("numeric", "g / 7.0"),
])
async def test_keys_of_other_types_resume_exactly_from_their_text(
        app: App, database_url: str, other_url: str, key_type: str, key_expr: str) -> None:
    await execute(other_url, f"CREATE TABLE src (k {key_type} PRIMARY KEY, v int)")
    await execute(other_url, f"INSERT INTO src SELECT {key_expr}, g FROM generate_series(1, 999) g")
    job = await run_backfill(app, {"source": "other", "source_table": "src", "dest_table": "dst",
                                   "create_table": True, "batch_size": 50})
    assert job["status"] == "succeeded", job["last_error"]
    assert await digest_kv(database_url, "dst") == await digest_kv(other_url, "src")
    assert job["progress_done"] == job["progress_total"] == 999


async def digest_kv(url: str, table: str) -> tuple[int, str]:
    connection = await asyncpg.connect(url)
    try:
        row = await connection.fetchrow(f"SELECT count(*), md5(string_agg(k::text || ':' || v, ',' ORDER BY v)) "
                                        f"FROM {table}")
    finally:
        await connection.close()
    assert row is not None
    return row[0], row[1]


async def test_quoted_names_and_other_column_types_go_through_the_stage(
        app: App, database_url: str, other_url: str) -> None:
    await execute(other_url, 'CREATE SCHEMA "Odd Schema"; CREATE TABLE "Odd Schema"."We""ird" '
                             '("Key Col" integer PRIMARY KEY, "Mixed Case" varchar(20), n integer)')
    await execute(other_url, 'INSERT INTO "Odd Schema"."We""ird" SELECT g, \'v\' || g, g * 2 '
                             'FROM generate_series(1, 500) g')
    # wider types on the destination: the stage casts (COPY straight in would need equal types)
    await execute(database_url, 'CREATE TABLE "Dest" ("Key Col" bigint PRIMARY KEY, "Mixed Case" text, n numeric, '
                                'extra text DEFAULT \'d\')')
    job = await run_backfill(app, {"source": "other", "source_table": 'Odd Schema.We"ird', "dest_table": "Dest",
                                   "key": "Key Col", "batch_size": 64, "filters": [["Mixed Case", "!=", "v7"]]})
    assert job["status"] == "succeeded", job["last_error"]
    rows = await fetchval(database_url, 'SELECT json_agg(t ORDER BY "Key Col") FROM "Dest" t')
    copied = json.loads(rows)
    assert len(copied) == 499
    assert copied[0] == {"Key Col": 1, "Mixed Case": "v1", "n": 2, "extra": "d"}
    assert all(r["Mixed Case"] != "v7" for r in copied)


async def test_upsert_updates_existing_rows_and_insert_leaves_them(app: App, database_url: str) -> None:
    await make_table(database_url, "src", 200)
    await make_table(database_url, "dst", 0)
    await execute(database_url, "INSERT INTO dst (id, name, created_at) VALUES (5, 'old', now()), (150, 'old', now())")
    job = await run_backfill(app, {"source_table": "src", "dest_table": "dst", "mode": "insert", "batch_size": 64})
    assert job["status"] == "succeeded", job["last_error"]
    assert await fetchval(database_url, "SELECT count(*) FROM dst WHERE name = 'old'") == 2
    assert await fetchval(database_url, "SELECT count(*) FROM dst") == 200
    job = await run_backfill(app, {"source_table": "src", "dest_table": "dst", "mode": "upsert", "batch_size": 64})
    assert job["status"] == "succeeded", job["last_error"]
    assert await digest(database_url, "dst") == await digest(database_url, "src")


async def test_dsn_never_reaches_the_job_row(app: App, database_url: str, other_url: str) -> None:
    await make_table(other_url, "src", 10)
    job = await run_backfill(app, {"source": "other", "source_table": "src", "dest_table": "dst",
                                   "create_table": True})
    assert job["status"] == "succeeded", job["last_error"]
    row = json.dumps(job, default=str)
    assert other_url not in row and other_url.rsplit("/", 1)[-1] not in row
    assert job["payload"]["source"] == "other"


async def test_run_time_validation_fails_the_job_without_retries(app: App, database_url: str) -> None:
    await make_table(database_url, "src", 10)
    payload = {"source_table": "src", "dest_table": "dst", "create_table": True}
    await app.registry.get("backfill").validate(payload, app)  # type: ignore[misc]
    job_id, _ = await app.queue.job_enqueue(NewJob("backfill", payload, max_attempts=5))
    await execute(database_url, "ALTER TABLE src DROP CONSTRAINT src_pkey")
    await Worker(app, drain=True, install_signal_handlers=False).run()
    job = await app.queue.job_get(job_id)
    assert job["status"] == "failed"
    assert job["attempts"] == 1
    assert "has no primary key" in job["last_error"]


async def test_named_pools_are_lazy_bounded_and_closed_when_idle(app: App, other_url: str) -> None:
    pools = NamedPools(app, idle_close_s=0.2)
    async with pools.use("default") as db:
        assert db is app.db
    assert pools.open_names() == []
    async with pools.use("other") as db:
        assert db.max_size <= 4 and db.min_size == 0
        assert await db.fetchval("SELECT 1") == 1
        assert pools.open_names() == ["other"]
    await wait_until(lambda: holds(pools.open_names() == []), 10)  # closed once idle
    with pytest.raises(PayloadError, match="RUNNER_SOURCE_NOPE_URL"):
        async with pools.use("nope"):
            pass
    await pools.close()
    assert named_pools(app) is named_pools(app)


async def test_watch_exits_1_unless_the_job_succeeded(app: App, database_url: str) -> None:
    await make_table(database_url, "src", 10)
    payload = {"source_table": "src", "dest_table": "dst", "create_table": True}
    job_id, _ = await app.queue.job_enqueue(NewJob("backfill", payload))
    await app.queue.job_request_cancel(job_id)
    assert await watch(app, job_id) == 1
    job = await run_backfill(app, payload)
    assert await watch(app, job["id"]) == 0
