"""What the catalogs say about a table: its columns (with PostgreSQL-formatted types), keys and unique indexes.

Every lookup binds the names as values; nothing here interpolates user text.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from runner.jobs.backfill.spec import TableName

FIRST_USER_OID = 16384  # FirstNormalObjectId: types below it are built in, with the same OID everywhere

TABLE = """
SELECT c.oid, c.relkind::text AS relkind
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2
"""

# base_*: what the values are, for the narrowing check (runner.jobs.backfill.narrowing): a domain's base type
# and typmod (one level), and an array's element type (the typmod of varchar(3)[] is its element's).
COLUMNS = """
SELECT a.attname AS name, pg_catalog.format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull AS not_null,
       a.attgenerated <> '' AS generated, (a.atthasdef OR a.attidentity <> '') AS has_default,
       a.atttypid < $2 AS builtin,
       CASE WHEN b.typcategory = 'A' AND b.typelem <> 0 THEN b.typelem ELSE b.oid END < $2 AS base_builtin,
       pg_catalog.format_type(CASE WHEN b.typcategory = 'A' AND b.typelem <> 0 THEN b.typelem ELSE b.oid END,
                              NULL) AS base_type,
       CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END AS base_typmod,
       b.typcategory = 'A' AND b.typelem <> 0 AS base_array
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
JOIN pg_catalog.pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

PRIMARY_KEY = """
SELECT a.attname
FROM pg_catalog.pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = $1 AND i.indisprimary
ORDER BY k.ord
"""

# Columns that are unique on their own: usable as a keyset key and as an ON CONFLICT arbiter.
UNIQUE_COLUMNS = """
SELECT DISTINCT a.attname
FROM pg_catalog.pg_index i
JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
WHERE i.indrelid = $1 AND i.indisunique AND i.indimmediate AND i.indnkeyatts = 1
  AND i.indpred IS NULL AND i.indexprs IS NULL
"""

SCHEMA_EXISTS = "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1)"

KIND_NAMES = {"r": "table", "p": "partitioned table", "v": "view", "m": "materialized view",
              "f": "foreign table", "S": "sequence", "i": "index", "I": "partitioned index", "c": "composite type",
              "t": "TOAST table"}


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # format_type(): valid SQL, already quoted by PostgreSQL where needed
    not_null: bool
    generated: bool
    has_default: bool
    builtin: bool
    # What the values are (the narrowing check): the base type's format_type() without typmod (a domain's base,
    # an array's element), whether that is built in, its typmod (-1: none) and whether the column is an array.
    base_type: str = ""
    base_builtin: bool = False
    base_typmod: int = -1
    base_array: bool = False


@dataclass(frozen=True)
class Table:
    name: TableName
    kind: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    unique_columns: frozenset[str]

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)

    @property
    def kind_name(self) -> str:
        return KIND_NAMES.get(self.kind, self.kind)


async def describe(connection: asyncpg.Connection, name: TableName) -> Table | None:
    """The table as the catalog knows it, or None when no relation has that exact schema and name."""
    row = await connection.fetchrow(TABLE, name.schema, name.name)
    if row is None:
        return None
    oid = row["oid"]
    columns = tuple(Column(**dict(r)) for r in await connection.fetch(COLUMNS, oid, FIRST_USER_OID))
    primary_key = tuple(r["attname"] for r in await connection.fetch(PRIMARY_KEY, oid))
    unique = frozenset(r["attname"] for r in await connection.fetch(UNIQUE_COLUMNS, oid))
    return Table(name, row["relkind"], columns, primary_key, unique)


async def schema_exists(connection: asyncpg.Connection, schema: str) -> bool:
    return bool(await connection.fetchval(SCHEMA_EXISTS, schema))
