"""Backfill validation against the catalogs, the --where parser, and the CLI's rejections (exit 2, nothing
written)."""

from __future__ import annotations

from typing import Any

import pytest

from runner.app import App
from runner.errors import PayloadError
from runner.jobs.backfill.spec import parse_spec
from runner.jobs.backfill.sql import literal, quote_ident
from runner.jobs.backfill.where import parse_where
from tests.conftest import run_cli
from tests.test_backfill import execute, fetchval, make_table


async def validate(app: App, **payload: Any) -> None:
    kind = app.registry.get("backfill")
    assert kind.validate is not None
    await kind.validate({"source_table": "src", "dest_table": "dst", **payload}, app)


# --- the --where parser ---------------------------------------------------------------------------------
@pytest.mark.parametrize("expression, expected", [
    ("created_at>=2024-01-01", ["created_at", ">=", "2024-01-01"]),
    ("  amount <  10.5 ", ["amount", "<", "10.5"]),
    ("status != 'done'", ["status", "!=", "done"]),
    ("status <> done", ["status", "!=", "done"]),
    ("name = 'O''Brien'", ["name", "=", "O'Brien"]),
    ("name = a = b", ["name", "=", "a = b"]),
    ('"Mixed Col" > 3', ["Mixed Col", ">", "3"]),
    ("id in 1,2, 3", ["id", "in", ["1", "2", "3"]]),
    ("id IN (4,5)", ["id", "in", ["4", "5"]]),
    ("kind in 'a','b c'", ["kind", "in", ["a", "b c"]]),
    ("note is null", ["note", "is_null"]),
    ("note IS NOT NULL", ["note", "not_null"]),
])
def test_where_expressions_become_structured_filters(expression: str, expected: list[Any]) -> None:
    assert parse_where(expression).to_json() == expected


@pytest.mark.parametrize("expression", ["id", "", "id ~ 3", "id >=", "in 1,2", "id in 1,,2", "id is maybe null",
                                        "= 3"])
def test_unparseable_where_is_a_clear_usage_error(expression: str) -> None:
    with pytest.raises(PayloadError, match=r"--where|filter"):
        parse_where(expression)


def test_payload_shape_errors_name_the_field() -> None:
    base = {"source_table": "src", "dest_table": "dst"}
    for bad, message in [
        ({"batch_size": 0}, "batch_size"), ({"batch_size": True}, "batch_size"), ({"mode": "merge"}, "mode"),
        ({"source": "no-such!"}, "source"), ({"filters": [["a", "like", "x"]]}, "op must be"),
        ({"filters": [["a", "=", None]]}, "is_null"), ({"filters": [["a", "in", []]]}, "non-empty"),
        ({"dest_table": "a.b.c"}, "schema.table"), ({"create_table": "yes"}, "create_table"),
        ({"dsn": "postgresql://x"}, "unknown backfill field"), ({"dest_table": "src"}, "same table"),
    ]:
        with pytest.raises(PayloadError, match=message):
            parse_spec({**base, **bad})


def test_quoting() -> None:
    assert quote_ident('We"ird') == '"We""ird"'
    assert literal("it's \\ here") == "E'it''s \\\\ here'"


# --- catalog checks -------------------------------------------------------------------------------------
async def test_composite_and_absent_primary_keys_need_a_unique_key(app: App, database_url: str) -> None:
    await execute(database_url, "CREATE TABLE src (a int, b int, u int NOT NULL UNIQUE, n int UNIQUE, "
                                "PRIMARY KEY (a, b))")
    with pytest.raises(PayloadError, match=r"composite primary key \(a, b\)"):
        await validate(app, create_table=True)
    with pytest.raises(PayloadError, match="'a' is not unique"):
        await validate(app, key="a", create_table=True)
    with pytest.raises(PayloadError, match="must be NOT NULL"):
        await validate(app, key="n", create_table=True)
    await validate(app, key="u", create_table=True)
    await execute(database_url, "CREATE TABLE nopk (x int)")
    with pytest.raises(PayloadError, match="has no primary key"):
        await validate(app, source_table="nopk", create_table=True)


async def test_missing_tables_and_kinds(app: App, database_url: str) -> None:
    await make_table(database_url, "src", 1)
    with pytest.raises(PayloadError, match=r"destination table public.dst does not exist .*--create-table"):
        await validate(app)
    with pytest.raises(PayloadError, match=r"source table public\.nope does not exist"):
        await validate(app, source_table="nope", create_table=True)
    with pytest.raises(PayloadError, match="schema 'nope' does not exist"):
        await validate(app, dest_table="nope.dst", create_table=True)
    await execute(database_url, "CREATE VIEW v AS SELECT * FROM src")
    with pytest.raises(PayloadError, match="is a view"):
        await validate(app, source_table="v", create_table=True)
    with pytest.raises(PayloadError, match="is a view"):
        await validate(app, dest_table="v")


@pytest.mark.parametrize("dest_ddl, message", [
    ("id bigint PRIMARY KEY, qty integer", "source column 'name' does not exist"),
    ("id bigint PRIMARY KEY, qty integer, name text, created_at timestamptz, amount numeric, doc integer, "
     "note text", "column mismatch.*doc.*integer.*jsonb"),
    ("id bigint, qty integer, name text, created_at timestamptz, amount numeric, doc jsonb, note text",
     "needs a primary key or unique index on exactly 'id'"),
    ("id bigint PRIMARY KEY, qty integer, name text, created_at timestamptz, amount numeric, doc jsonb, "
     "note text, required int NOT NULL", "required is NOT NULL without a default"),
    ("id bigint PRIMARY KEY, qty integer, name text, created_at timestamptz, amount numeric, doc jsonb, "
     "note text GENERATED ALWAYS AS (name) STORED", "generated column"),
])
async def test_column_mismatch(app: App, database_url: str, dest_ddl: str, message: str) -> None:
    await make_table(database_url, "src", 1)
    await execute(database_url, f"CREATE TABLE dst ({dest_ddl})")
    with pytest.raises(PayloadError, match=message):
        await validate(app)


async def test_filters_are_checked_against_the_column_types(app: App, database_url: str) -> None:
    await make_table(database_url, "src", 1)
    await execute(database_url, "ALTER TABLE src ADD COLUMN j json")
    for filters, message in [
        ([["nope", "=", "1"]], "column 'nope' does not exist"),
        ([["id", ">", "1; DROP TABLE src"]], "invalid input syntax for type bigint"),
        ([["created_at", ">=", "yesterday-ish"]], "timestamp with time zone"),
        ([["qty", "in", ["1", "x"]]], "invalid input syntax for type integer"),
        ([["j", "=", "{}"]], "operator does not exist: json = json"),
    ]:
        with pytest.raises(PayloadError, match=message):
            await validate(app, filters=filters, create_table=True)
    await validate(app, filters=[["created_at", ">=", "2024-01-01"], ["note", "is_null"], ["name", "=", "x' OR 1=1"]],
                   create_table=True)


async def test_unknown_connection_names_the_variable(app: App, database_url: str) -> None:
    with pytest.raises(PayloadError, match="RUNNER_SOURCE_WAREHOUSE_URL"):
        await validate(app, source="warehouse")


# --- the CLI: bad input is rejected at enqueue, exit 2, nothing written --------------------------------
TABLES = "SELECT array_agg(oid::regclass::text ORDER BY oid) FROM pg_class WHERE relkind IN ('r', 'p', 'v')"
INJECTIONS = [  # the other shapes of bad input are covered in-process above
    ["public.src; DROP TABLE src", "dst", "--create-table"],
    ["src", 'dst"; DROP TABLE src; --', "--create-table"],
    ["src", "dst", "--create-table", "--key", "id; DROP TABLE src"],
    ["src", "dst", "--create-table", "--where", "1=1 OR id>0"],
    ["src", "dst", "--create-table", "--where", "id>0; DROP TABLE src"],
    ["src", "dst", "--create-table", "--where", "id"],
    ["src", "dst", "--create-table", "--source", "nowhere"],
    ["src", "dst"],
]


@pytest.mark.parametrize("args", INJECTIONS, ids=[str(i) for i in range(len(INJECTIONS))])
async def test_cli_rejects_bad_names_and_injections_at_enqueue(
        runner_env: dict[str, str], database_url: str, args: list[str]) -> None:
    await make_table(database_url, "src", 20)
    tables_before = await fetchval(database_url, TABLES)
    result = run_cli(runner_env, "backfill", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == ""
    assert await fetchval(database_url, "SELECT count(*) FROM runner_jobs") == 0
    assert await fetchval(database_url, "SELECT count(*) FROM src") == 20
    assert await fetchval(database_url, TABLES) == tables_before
