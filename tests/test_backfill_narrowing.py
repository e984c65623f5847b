"""Backfill narrowing: a destination column narrower than its source column is refused at enqueue (CLI and
API) unless allow_narrowing; with it, the first row that does not fit fails the job at once (one attempt),
naming the row's key, and the copy stops after the last committed batch."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from runner.app import App
from runner.errors import PayloadError
from runner.jobs.backfill.catalog import describe
from runner.jobs.backfill.narrowing import check_narrowing
from runner.jobs.backfill.spec import TableName, parse_spec
from tests import test_backfill
from tests.conftest import run_cli
from tests.test_backfill import execute, fetchval, run_backfill

other_url = test_backfill.other_url  # the fixture: a second database, the connection 'other'
JOBS = "SELECT count(*) FROM runner_jobs"

# (source type, destination type, words the reason must contain); None: not narrowing
PAIRS: list[tuple[str, str, str | None]] = [
    ("bigint", "integer", "integer width"),
    ("integer", "smallint", "integer width"),
    ("integer", "bigint", None),
    ("smallint", "integer", None),
    ("integer", "numeric(9,0)", "precision"),
    ("integer", "numeric(12,2)", None),
    ("integer", "numeric", None),
    ("bigint", "double precision", "precision"),
    ("integer", "double precision", None),
    ("integer", "varchar(5)", "length"),
    ("integer", "varchar(11)", None),
    ("text", "varchar(3)", "length"),
    ("varchar(10)", "varchar(3)", "length"),
    ("varchar(3)", "text", None),
    ("varchar(3)", "varchar(10)", None),
    ("char(4)", "varchar(3)", "length"),
    ("varchar", "char(5)", "length"),
    ("numeric(12,2)", "numeric(5,2)", "precision"),
    ("numeric(12,4)", "numeric(14,2)", "scale"),
    ("numeric(5,2)", "numeric(12,4)", None),
    ("numeric", "numeric(38,10)", "precision"),
    ("numeric(12,2)", "numeric", None),
    ("numeric(9,0)", "integer", None),
    ("numeric(10,0)", "integer", "precision"),
    ("numeric(6,2)", "bigint", "scale"),
    ("numeric", "bigint", "cannot hold"),
    ("double precision", "real", "precision"),
    ("real", "double precision", None),
    ("double precision", "numeric(20,5)", "cannot hold"),
    ("double precision", "bigint", "cannot hold"),
    ("timestamptz", "date", "cannot hold"),
    ("timestamp", "date", "cannot hold"),
    ("timestamptz", "timestamp", "time zone"),
    ("timestamptz", "time", "drops the date"),
    ("timestamp(6)", "timestamp(0)", "precision"),
    ("timestamptz(3)", "timestamptz(6)", None),
    ("timestamp", "timestamptz", None),
    ("date", "timestamptz", None),
    ("time(6)", "time(2)", "precision"),
    ("interval", "interval day", "fields"),
    ("interval(6)", "interval(3)", "precision"),
    ("bit varying(10)", "bit varying(4)", "length"),
    ("bit(4)", "bit(8)", "exactly"),
    ("varchar(10)[]", "varchar(3)[]", "length"),
    ("text[]", "text[]", None),
    ("jsonb", "jsonb", None),
    ("short3", "varchar(3)", None),  # domain over varchar(3): its base type
    ("text", "short3", "length"),
]


async def test_narrowing_rules_on_catalog_types(database_url: str) -> None:
    await execute(database_url, "CREATE DOMAIN short3 AS varchar(3)")
    columns = ", ".join(f"c{i} {s}" for i, (s, _, _) in enumerate(PAIRS))
    await execute(database_url, f"CREATE TABLE src (id bigint PRIMARY KEY, {columns})")
    columns = ", ".join(f"c{i} {d}" for i, (_, d, _) in enumerate(PAIRS))
    await execute(database_url, f"CREATE TABLE dst (id bigint PRIMARY KEY, {columns})")
    connection = await asyncpg.connect(database_url)
    try:
        source = await describe(connection, TableName("public", "src"))
        dest = await describe(connection, TableName("public", "dst"))
    finally:
        await connection.close()
    assert source is not None and dest is not None
    found = {s.name: reason for s, _, reason in check_narrowing(list(zip(source.columns, dest.columns, strict=True)))}
    for i, (source_type, dest_type, expected) in enumerate(PAIRS):
        reason = found.get(f"c{i}")
        if expected is None:
            assert reason is None, (source_type, dest_type, reason)
        else:
            assert reason is not None and expected in reason, (source_type, dest_type, reason)


def payload(**extra: Any) -> dict[str, Any]:
    return {"source_table": "src", "dest_table": "dst", **extra}


async def make_pair(url: str, source_type: str, dest_type: str) -> None:
    await execute(url, f"CREATE TABLE src (id bigint PRIMARY KEY, v {source_type})")
    await execute(url, f"CREATE TABLE dst (id bigint PRIMARY KEY, v {dest_type})")


# --- refused at enqueue ---------------------------------------------------------------------------------
@pytest.mark.parametrize("source_type, dest_type, shown, why", [
    ("bigint", "integer", "bigint, public.dst has integer", "integer width"),
    ("text", "varchar(3)", "text, public.dst has character varying(3)", "length"),
    ("numeric(12,2)", "numeric(5,2)", "numeric(12,2), public.dst has numeric(5,2)", "precision"),
    ("timestamptz", "date", "timestamp with time zone, public.dst has date", "cannot hold"),
])
async def test_narrowing_is_refused_through_the_cli(
        runner_env: dict[str, str], database_url: str, source_type: str, dest_type: str, shown: str,
        why: str) -> None:
    await make_pair(database_url, source_type, dest_type)
    assert await fetchval(database_url, JOBS) == 0
    result = run_cli(runner_env, "backfill", "src", "dst")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: narrowing column 'v': public.src has "), result.stderr
    assert shown in lines[0] and why in lines[0] and "--allow-narrowing" in lines[0], lines[0]
    assert result.stdout == ""
    assert await fetchval(database_url, JOBS) == 0

    accepted = run_cli(runner_env, "backfill", "src", "dst", "--allow-narrowing")
    assert accepted.returncode == 0, accepted.stderr
    job_id = int(accepted.stdout.strip())
    assert await fetchval(database_url, JOBS) == 1
    assert await fetchval(database_url, "SELECT payload->'allow_narrowing' FROM runner_jobs WHERE id = $1",
                          job_id) == "true"


async def test_narrowing_is_refused_through_the_api(app: App, database_url: str) -> None:
    await make_pair(database_url, "text", "varchar(3)")
    await execute(database_url, "ALTER TABLE src ADD COLUMN n bigint; ALTER TABLE dst ADD COLUMN n integer")
    with pytest.raises(PayloadError) as refused:
        await app.enqueue("backfill", payload())
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("narrowing column 'v': public.src has text, public.dst has character varying(3) "
                              "(length: "), message
    assert "(and 1 more: n)" in message
    assert await fetchval(database_url, JOBS) == 0
    job_id = await app.enqueue("backfill", payload(allow_narrowing=True))
    assert (await app.queue.job_get(job_id))["payload"]["allow_narrowing"] is True
    assert await fetchval(database_url, JOBS) == 1


def test_allow_narrowing_is_validated_like_the_other_fields() -> None:
    with pytest.raises(PayloadError, match="allow_narrowing must be true or false"):
        parse_spec(payload(allow_narrowing="yes"))
    assert parse_spec(payload()).allow_narrowing is False
    assert parse_spec(payload(allow_narrowing=True)).to_payload()["allow_narrowing"] is True


async def test_widening_is_accepted_and_copies(app: App, database_url: str) -> None:
    await execute(database_url, "CREATE TABLE src (id integer PRIMARY KEY, s varchar(3), n numeric(5,2), "
                                "t timestamp(0), d date, r real)")
    await execute(database_url, "CREATE TABLE dst (id bigint PRIMARY KEY, s text, n numeric(12,4), "
                                "t timestamptz, d timestamptz, r double precision)")
    await execute(database_url, "INSERT INTO src SELECT g, 'abc', 123.45, '2024-01-01 10:00', '2024-01-02', 1.5 "
                                "FROM generate_series(1, 50) g")
    job = await run_backfill(app, payload(batch_size=16))
    assert job["status"] == "succeeded", job["last_error"]
    assert await fetchval(database_url, "SELECT count(*) FROM dst WHERE s = 'abc' AND n = 123.45") == 50


# --- allowed, and one row does not fit: fatal at once, naming the key -----------------------------------
@pytest.mark.parametrize("route", ["within", "out_of_runner"])
@pytest.mark.parametrize("source_type, dest_type, bad_value, message", [
    ("text", "varchar(3)", "'abcd'", "value too long for type character varying(3) (column v)"),
    ("bigint", "integer", "2^40", "integer out of range (column v)"),
    ("numeric(12,2)", "numeric(5,2)", "12345.67", "numeric field overflow (column v)"),
])
async def test_a_row_that_does_not_fit_fails_the_job_at_once_naming_its_key(
        app: App, database_url: str, other_url: str, route: str, source_type: str, dest_type: str,
        bad_value: str, message: str) -> None:
    dest, dest_url = ("default", database_url) if route == "within" else ("other", other_url)
    await execute(database_url, f"CREATE TABLE src (id bigint PRIMARY KEY, v {source_type})")
    await execute(dest_url, f"CREATE TABLE dst (id bigint PRIMARY KEY, v {dest_type})")
    good = "'ab'" if "char" in dest_type else "1"
    await execute(database_url, f"INSERT INTO src SELECT g, {good} FROM generate_series(1, 1000) g")
    await execute(database_url, f"UPDATE src SET v = {bad_value} WHERE id IN (734, 735, 790, 950)")
    job = await run_backfill(app, payload(dest=dest, batch_size=100, allow_narrowing=True), max_attempts=5)
    assert job["status"] == "failed"
    assert job["attempts"] == 1
    error = job["last_error"]
    assert (f"PayloadError: row with id=734: {message}; the batch was rolled back (copied through id=700, 700 rows;"
            in error.splitlines()[0]), error
    # the batches before it are committed and checkpointed; nothing of the failing one
    assert await fetchval(dest_url, "SELECT count(*) FROM dst") == 700
    assert await fetchval(dest_url, "SELECT max(id) FROM dst") == 700
    assert job["progress_done"] == 700 and job["checkpoint"]["last_key"] == "700"
    assert job["checkpoint"]["counts"] == {"inserted": 700, "updated": 0, "skipped": 0}


async def test_a_constraint_violation_on_the_direct_route_is_fatal_too(app: App, database_url: str) -> None:
    await execute(database_url, "CREATE TABLE src (id bigint PRIMARY KEY, v text)")
    await execute(database_url, "CREATE TABLE dst (id bigint PRIMARY KEY, v text CONSTRAINT no_bad CHECK (v <> 'bad'))")
    await execute(database_url, "INSERT INTO src SELECT g, CASE WHEN g = 42 THEN 'bad' ELSE 'ok' END "
                                "FROM generate_series(1, 100) g")
    job = await run_backfill(app, payload(batch_size=30), max_attempts=5)
    assert job["status"] == "failed" and job["attempts"] == 1
    first_line = job["last_error"].splitlines()[0]
    assert ('PayloadError: row with id=42: new row for relation "dst" violates check constraint "no_bad" '
            "(constraint no_bad); the batch was rolled back (copied through id=30, 30 rows;") in first_line, first_line
    assert await fetchval(database_url, "SELECT count(*) FROM dst") == 30


async def test_a_unique_violation_on_another_column_names_the_second_row(app: App, database_url: str) -> None:
    """Direct COPY fails, the stage fails too: the first key whose row conflicts is the later of the two."""
    await execute(database_url, "CREATE TABLE src (id bigint PRIMARY KEY, v text)")
    await execute(database_url, "CREATE TABLE dst (id bigint PRIMARY KEY, v text UNIQUE)")
    await execute(database_url, "INSERT INTO src SELECT g, CASE WHEN g = 57 THEN 'v12' ELSE 'v' || g END "
                                "FROM generate_series(1, 100) g")
    job = await run_backfill(app, payload(batch_size=100), max_attempts=5)
    assert job["status"] == "failed" and job["attempts"] == 1
    first_line = job["last_error"].splitlines()[0]
    assert ('PayloadError: row with id=57: duplicate key value violates unique constraint "dst_v_key" '
            "(Key (v)=(v12) already exists.) (constraint dst_v_key); the batch was rolled back "
            "(nothing copied yet;") in first_line, first_line
    assert await fetchval(database_url, "SELECT count(*) FROM dst") == 0
