"""Validation against the catalogs, at enqueue and again at run time: the result is a :class:`Plan`.

Checks, each failing with one clear PayloadError: both tables exist (or the destination may be created);
the key is a single NOT NULL column that is unique in the source and in the destination; filters name
real columns and their values are valid input for the column types; every source column exists in the
destination, and PostgreSQL itself accepts ``INSERT INTO dest SELECT <source types>`` (checked with
EXPLAIN in a rolled-back transaction), and no destination column is narrower than its source column
(:mod:`narrowing`; unless ``allow_narrowing``); destination columns the source lacks can be left to defaults.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

import asyncpg

from runner.db import Database
from runner.errors import PayloadError
from runner.jobs.backfill.catalog import Column, Table, describe, schema_exists
from runner.jobs.backfill.narrowing import check_narrowing
from runner.jobs.backfill.spec import BackfillSpec, Filter, TableName
from runner.jobs.backfill.sql import Statements, TypedFilter, cast_value_sql

SOURCE_KINDS = ("r", "p", "m")
PLAIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # a new table has no catalog entry to check its name against
DEST_KINDS = ("r", "p")
# Errors that say something about the data or the schema, not about the connection: permanent.
_CONNECTION_ERRORS = (asyncpg.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError)


@dataclass(frozen=True)
class Plan:
    spec: BackfillSpec
    source: Table
    dest: Table | None  # None: missing, and create_table is set
    statements: Statements
    # binary, unless a column has a user-defined type (OIDs differ between databases)
    copy_format: Literal["binary", "text"]
    copy_direct: bool  # destination types equal the source's: an empty key range can take COPY directly

    @property
    def key(self) -> Column:
        return self.statements.key


def permanent(error: BaseException) -> bool:
    return isinstance(error, asyncpg.PostgresError) and not isinstance(error, _CONNECTION_ERRORS)


@asynccontextmanager
async def as_payload_error(context: str) -> AsyncIterator[None]:
    """Turn a schema or data error from PostgreSQL into a PayloadError (connection errors pass through)."""
    try:
        yield
    except asyncpg.PostgresError as error:
        if not permanent(error):
            raise
        raise PayloadError(f"{context}: {error}") from None


async def build_plan(spec: BackfillSpec, source_db: Database, dest_db: Database) -> Plan:
    async with source_db.connection() as connection:
        source = await _source_table(connection, spec)
        key = _key_column(source, spec)
        filters = tuple(_typed_filter(source, f) for f in spec.filters)
        statements = Statements(spec.source_table, spec.dest_table, source.columns, key, filters, spec.mode)
        await _check_filters(connection, statements)
        if spec.since_column is not None:
            await _check_since_column(connection, source, statements, spec.since_column)
    async with dest_db.connection() as connection:
        dest = await describe(connection, spec.dest_table)
        await _check_dest(connection, spec, statements, dest)
    return Plan(
        spec=spec,
        source=source,
        dest=dest,
        statements=statements,
        copy_format="binary" if all(c.builtin for c in source.columns) else "text",
        copy_direct=dest is None or _same_types(source, dest),
    )


async def create_dest_table(plan: Plan, dest_db: Database) -> None:
    async with as_payload_error(f"creating {plan.spec.dest_table}"), dest_db.connection() as connection:
        await connection.execute(plan.statements.create_dest())


# --- source -----------------------------------------------------------------------------------------
async def _source_table(connection: asyncpg.Connection, spec: BackfillSpec) -> Table:
    table = await describe(connection, spec.source_table)
    where = f"in connection {spec.source!r}"
    if table is None:
        raise PayloadError(f"source table {_show(spec.source_table)} does not exist {where}")
    if table.kind not in SOURCE_KINDS:
        raise PayloadError(f"source {_show(spec.source_table)} is a {table.kind_name}; a table is needed")
    if not table.columns:
        raise PayloadError(f"source table {_show(spec.source_table)} has no columns")
    return table


def _key_column(table: Table, spec: BackfillSpec) -> Column:
    name = _show(table.name)
    if spec.key is None:
        if len(table.primary_key) > 1:
            raise PayloadError(f"source table {name} has a composite primary key ({', '.join(table.primary_key)}); "
                               "pass --key with a column that is unique on its own")
        if not table.primary_key:
            raise PayloadError(f"source table {name} has no primary key; pass --key with a unique column")
        key_name = table.primary_key[0]
    else:
        key_name = spec.key
    column = table.column(key_name)
    if column is None:
        raise PayloadError(f"key column {key_name!r} does not exist in {name}")
    if key_name not in table.unique_columns:
        raise PayloadError(f"key column {key_name!r} is not unique in {name}: it needs a primary key or a unique "
                           "index on exactly that column")
    if not column.not_null:
        raise PayloadError(f"key column {key_name!r} of {name} must be NOT NULL")
    return column


def _typed_filter(table: Table, item: Filter) -> TypedFilter:
    column = table.column(item.column)
    if column is None:
        raise PayloadError(f"filter {item.describe()}: column {item.column!r} does not exist in {_show(table.name)}")
    return TypedFilter(item, column.type)


async def _check_filters(connection: asyncpg.Connection, statements: Statements) -> None:
    for typed in statements.filters:
        value = typed.filter.value
        if value is None:
            continue
        async with as_payload_error(f"filter {typed.filter.describe()}"):
            await connection.fetchval(cast_value_sql(typed.type, isinstance(value, tuple)),
                                      list(value) if isinstance(value, tuple) else value)
    sql, _ = statements.count()
    async with as_payload_error("filters"):
        await connection.prepare(sql)  # parse analysis: every operator exists for its column type


async def _check_since_column(connection: asyncpg.Connection, source: Table, statements: Statements,
                              name: str) -> None:
    column = source.column(name)
    if column is None:
        raise PayloadError(f"since_column {name!r} does not exist in {_show(source.name)}")
    async with as_payload_error(f"since_column {name!r}"):  # max() needs an ordering (json has none)
        await connection.prepare(statements.since_max(column)[0])


# --- destination ------------------------------------------------------------------------------------
async def _check_dest(
    connection: asyncpg.Connection, spec: BackfillSpec, statements: Statements, dest: Table | None
) -> None:
    where = f"in connection {spec.dest!r}"
    if dest is None:
        if not spec.create_table:
            raise PayloadError(f"destination table {_show(spec.dest_table)} does not exist {where} "
                               "(pass --create-table to create it)")
        if not PLAIN_NAME.match(spec.dest_table.name):
            raise PayloadError(f"cannot create {spec.dest_table.name!r}: a table to create needs a plain name "
                               "(letters, digits and _, not starting with a digit)")
        if not await schema_exists(connection, spec.dest_table.schema):
            raise PayloadError(f"schema {spec.dest_table.schema!r} does not exist {where}")
    else:
        _check_dest_columns(dest, statements)
    await _check_insert(connection, statements, create=dest is None)
    if dest is not None and not spec.allow_narrowing:
        _check_narrowing(dest, statements)


def _check_dest_columns(dest: Table, statements: Statements) -> None:
    name = _show(dest.name)
    if dest.kind not in DEST_KINDS:
        raise PayloadError(f"destination {name} is a {dest.kind_name}; a table is needed")
    source_names = set(statements.column_names)
    for column in statements.columns:
        target = dest.column(column.name)
        if target is None:
            raise PayloadError(f"column mismatch: source column {column.name!r} does not exist in {name}")
        if target.generated:
            raise PayloadError(f"column mismatch: {name}.{column.name} is a generated column")
    for target in dest.columns:
        if target.name not in source_names and target.not_null and not (target.has_default or target.generated):
            raise PayloadError(f"column mismatch: {name}.{target.name} is NOT NULL without a default and the "
                               "source has no such column")
    if statements.key.name not in dest.unique_columns:
        raise PayloadError(f"destination {name} needs a primary key or unique index on exactly "
                           f"{statements.key.name!r} (batches are idempotent by key)")


def _check_narrowing(dest: Table, statements: Statements) -> None:
    """PostgreSQL casts bigint to integer and text to varchar(3) on INSERT, and then fails row by row."""
    pairs = [(c, target) for c in statements.columns if (target := dest.column(c.name)) is not None]
    found = check_narrowing(pairs)
    if not found:
        return
    source, target, reason = found[0]
    more = f" (and {len(found) - 1} more: {', '.join(s.name for s, _, _ in found[1:])})" if len(found) > 1 else ""
    raise PayloadError(f"narrowing column {source.name!r}: {_show(statements.source)} has {source.type}, "
                       f"{_show(dest.name)} has {target.type} ({reason}){more}; pass --allow-narrowing "
                       '(payload "allow_narrowing": true) to copy anyway and fail on the first row that does not fit')


async def _check_insert(connection: asyncpg.Connection, statements: Statements, *, create: bool) -> None:
    """Let PostgreSQL decide type compatibility: plan the real INSERT from a stage of the source's types."""
    transaction = connection.transaction()
    await transaction.start()
    try:
        if create:
            async with as_payload_error(f"cannot create {_show(statements.dest)}"):
                await connection.execute(statements.create_dest())
        async with as_payload_error("column mismatch: the destination cannot hold the source's types"):
            await connection.execute(statements.create_stage())
        async with as_payload_error("column mismatch"):
            await connection.execute("EXPLAIN " + statements.insert_from_stage())
    finally:
        await transaction.rollback()


def _same_types(source: Table, dest: Table) -> bool:
    targets = {c.name: c.type for c in dest.columns}
    return all(targets.get(c.name) == c.type for c in source.columns)


def _show(table: TableName) -> str:
    return str(table)
