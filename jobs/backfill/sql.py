"""SQL text for a validated plan. Identifiers come from the catalogs and are quoted; values are bound.

COPY cannot take bind parameters, so the COPY-out query renders its values with :class:`Literals` (E''
strings, escaped for any ``standard_conforming_strings``); every other statement uses :class:`Params`.
Each value is sent as text and cast to the column's catalog type, e.g. ``("created_at" >= ($2::text)::timestamp
with time zone)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from runner.jobs.backfill.catalog import Column
from runner.jobs.backfill.spec import NULL_TESTS, Filter, TableName

STAGE = "runner_backfill_stage"
SQL_OPS = {"=": "=", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


def quote_ident(name: str) -> str:
    """Quote an identifier. Only for names already found in a catalog."""
    return '"' + name.replace('"', '""') + '"'


def qualified(table: TableName) -> str:
    return f"{quote_ident(table.schema)}.{quote_ident(table.name)}"


def literal(text: str) -> str:
    """An escape-string literal: the same value whatever standard_conforming_strings says."""
    if "\x00" in text:
        raise ValueError("a literal cannot contain NUL")
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


class Binder(Protocol):
    def __call__(self, value: str | Sequence[str]) -> str: ...


@dataclass
class Params:
    """Collects bind values; returns ``$n`` placeholders typed as text or text[]."""

    values: list[Any] = field(default_factory=list)
    offset: int = 0

    def __call__(self, value: str | Sequence[str]) -> str:
        self.values.append(value if isinstance(value, str) else list(value))
        return f"${self.offset + len(self.values)}"


class Literals:
    """Renders values inline as escaped literals (for COPY, which has no bind parameters)."""

    def __call__(self, value: str | Sequence[str]) -> str:
        if isinstance(value, str):
            return literal(value)
        return "ARRAY[" + ", ".join(literal(v) for v in value) + "]::text[]"


@dataclass(frozen=True)
class TypedFilter:
    filter: Filter
    type: str  # the column's format_type()


def filter_sql(item: TypedFilter, bind: Binder) -> str:
    f, column = item.filter, quote_ident(item.filter.column)
    if f.op in NULL_TESTS:
        return f"{column} IS {'NOT ' if f.op == 'not_null' else ''}NULL"
    if f.op == "in":
        assert isinstance(f.value, tuple)
        return f"{column} = ANY(({bind(f.value)}::text[])::{item.type}[])"
    assert isinstance(f.value, str)
    return f"{column} {SQL_OPS[f.op]} ({bind(f.value)}::text)::{item.type}"


def not_after_sql(type_: str) -> str:
    """Whether value $1 is at or before value $2, both as text, compared as ``type_`` (keys, watermarks)."""
    return f"SELECT ($1::text)::{type_} <= ($2::text)::{type_}"


def cast_value_sql(type_: str, many: bool) -> str:
    """Checks that a filter value is valid input for its column's type."""
    return f"SELECT ($1::text[])::{type_}[]" if many else f"SELECT ($1::text)::{type_}"


@dataclass(frozen=True)
class Statements:
    """The statements of one backfill, built once per run from the validated plan."""

    source: TableName
    dest: TableName
    columns: tuple[Column, ...]  # the source columns, all copied
    key: Column
    filters: tuple[TypedFilter, ...]
    mode: str

    @property
    def column_list(self) -> str:
        return ", ".join(quote_ident(c.name) for c in self.columns)

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def _key_range(self, bind: Binder, lower: str | None, upper: str | None) -> list[str]:
        key = quote_ident(self.key.name)
        parts = []
        if lower is not None:
            parts.append(f"{key} > ({bind(lower)}::text)::{self.key.type}")
        if upper is not None:
            parts.append(f"{key} <= ({bind(upper)}::text)::{self.key.type}")
        return parts

    def _where(self, bind: Binder, lower: str | None, upper: str | None = None) -> str:
        parts = [filter_sql(f, bind) for f in self.filters] + self._key_range(bind, lower, upper)
        return " AND ".join(f"({p})" for p in parts) or "true"

    # --- source ---------------------------------------------------------------------------------
    def count(self) -> tuple[str, list[Any]]:
        params = Params()
        where = self._where(params, None)
        return f"SELECT count(*) FROM {qualified(self.source)} WHERE {where}", params.values

    def upper_bound(self, lower: str | None, batch_size: int) -> tuple[str, list[Any]]:
        """The batch's last key: the batch_size-th key after ``lower`` within the filters (None: no rows left)."""
        params = Params(offset=1)
        key = quote_ident(self.key.name)
        where = self._where(params, lower)
        # Sorted by b.key, qualified (a bare name would sort by a text output column of the same name), and
        # turned into text only for the one row kept.
        sql = (f"SELECT last.k::text FROM (SELECT b.{key} AS k FROM (SELECT {key} FROM {qualified(self.source)} "
               f"WHERE {where} ORDER BY {key} LIMIT $1) AS b ORDER BY b.{key} DESC LIMIT 1) AS last")
        return sql, [batch_size, *params.values]

    def copy_out(self, lower: str | None, upper: str) -> str:
        """The rows of one batch, ``lower < key <= upper``, in key order, for COPY ... TO STDOUT."""
        where = self._where(Literals(), lower, upper)
        key = quote_ident(self.key.name)
        return f"SELECT {self.column_list} FROM {qualified(self.source)} WHERE {where} ORDER BY {key}"

    def since_max(self, column: Column) -> tuple[str, list[Any]]:
        """An incremental run's new watermark: the since_column's largest value within the filters, as text."""
        params = Params()
        where = self._where(params, None)
        sql = f"SELECT max({quote_ident(column.name)})::text FROM {qualified(self.source)} WHERE {where}"
        return sql, params.values

    def split_points(self, parts: int, sample_percent: float | None) -> tuple[str, list[Any]]:
        """The keys that cut the rows within the filters into ``parts`` ranges of equal row counts (the
        1/parts, 2/parts, ... quantiles of the key), as text; from a block sample of ``sample_percent`` of
        the table when set (large tables), else exact."""
        params = Params(offset=1)
        where = self._where(params, None)
        key = quote_ident(self.key.name)
        sample = "" if sample_percent is None else f" TABLESAMPLE SYSTEM ({float(sample_percent)!r}) REPEATABLE (0)"
        sql = (f"SELECT (percentile_disc($1::float8[]) WITHIN GROUP (ORDER BY {key}))::text[] "
               f"FROM {qualified(self.source)}{sample} WHERE {where}")
        return sql, [[i / parts for i in range(1, parts)], *params.values]

    # --- verify (runner.jobs.backfill.verify) ------------------------------------------------------
    def range_digest(self, table: TableName, lower: str | None, upper: str | None,
                     hashable: frozenset[str]) -> tuple[str, list[Any]]:
        """Rows and an order-independent digest of ``lower < key <= upper`` within the filters: the sum of a
        64-bit hash of each row (``hash_record_extended``), its columns cast to the source's types, so equal
        values of other types (``bigint`` against ``integer``, ``numeric(12,4)`` against ``numeric``) hash
        alike; a type without a hash function (json, xml, point, ...) is hashed as its text. One pass over the
        range, no rows in memory."""
        params = Params()
        where = self._where(params, lower, upper)
        row = ", ".join(f"{quote_ident(c.name)}::{c.type}" + ("" if c.name in hashable else "::text")
                        for c in self.columns)
        digest = f"sum(hash_record_extended(ROW({row}), 0)::numeric)"
        return (f"SELECT count(*) AS rows, coalesce({digest}, 0)::text AS digest FROM {qualified(table)} "
                f"WHERE {where}"), params.values

    @staticmethod
    def hash_probe(column: Column) -> str:
        """Fails for a type without an extended hash function (checked before any row is read)."""
        return f"SELECT hash_record_extended(ROW(NULL::{column.type}), 0)"

    # --- destination ----------------------------------------------------------------------------
    def create_stage(self) -> str:
        columns = ", ".join(f"{quote_ident(c.name)} {c.type}" for c in self.columns)
        return f"CREATE TEMP TABLE {STAGE} ({columns}) ON COMMIT DROP"

    def create_dest(self) -> str:
        columns = [f"{quote_ident(c.name)} {c.type}{' NOT NULL' if c.not_null else ''}" for c in self.columns]
        columns.append(f"PRIMARY KEY ({quote_ident(self.key.name)})")
        return f"CREATE TABLE IF NOT EXISTS {qualified(self.dest)} ({', '.join(columns)})"

    def any_in_range(self, lower: str | None, upper: str | None) -> tuple[str, list[Any]]:
        """Whether the destination holds a key in ``lower < key <= upper`` (either bound may be open)."""
        params = Params()
        where = " AND ".join(self._key_range(params, lower, upper)) or "true"
        return f"SELECT EXISTS (SELECT 1 FROM {qualified(self.dest)} WHERE {where})", params.values

    def stage_keys(self) -> str:
        """The stage's keys as text, in key order (to find a batch's first row that does not fit)."""
        key = quote_ident(self.key.name)
        return f"SELECT {key}::text FROM {STAGE} ORDER BY {key}"

    def insert_from_stage_range(self) -> str:
        """:meth:`insert_from_stage` for the stage rows ``$1 < key <= $2`` (keys as text; $1 NULL: no lower bound)."""
        key, type_ = quote_ident(self.key.name), self.key.type
        return self.insert_from_stage(f" WHERE ($1::text IS NULL OR {key} > ($1::text)::{type_}) "
                                      f"AND {key} <= ($2::text)::{type_}")

    def probe_column(self, probe: str, column: Column) -> str:
        """Assign one stage row's ``column`` ($1: its key as text) to the probe table's single column."""
        key = quote_ident(self.key.name)
        return (f"INSERT INTO {probe} (v) SELECT {quote_ident(column.name)} FROM {STAGE} "
                f"WHERE {key} = ($1::text)::{self.key.type}")

    def insert_from_stage_counted(self) -> str:
        """:meth:`insert_from_stage`, returning (inserted, updated): a row that existed has a non-zero xmax."""
        return (f"WITH written AS ({self.insert_from_stage()} RETURNING (xmax = 0) AS fresh) "
                "SELECT count(*) FILTER (WHERE fresh) AS inserted, count(*) FILTER (WHERE NOT fresh) AS updated "
                "FROM written")

    def insert_from_stage(self, where: str = "") -> str:
        """INSERT ... SELECT from the stage, idempotent by key."""
        key = quote_ident(self.key.name)
        others = [quote_ident(c.name) for c in self.columns if c.name != self.key.name]
        if self.mode == "upsert" and others:
            action = "DO UPDATE SET " + ", ".join(f"{c} = EXCLUDED.{c}" for c in others)
        else:
            action = "DO NOTHING"
        return (f"INSERT INTO {qualified(self.dest)} ({self.column_list}) OVERRIDING SYSTEM VALUE "
                f"SELECT {self.column_list} FROM {STAGE}{where} ON CONFLICT ({key}) {action}")


def range_filters(column: Column, after: str | None, upto: str | None) -> tuple[TypedFilter, ...]:
    """``after < column <= upto`` (None: open): an incremental run's window past the previous watermark, or
    the key range of a parallel backfill's chunk."""
    bounds = [(">", after), ("<=", upto)]
    return tuple(TypedFilter(Filter(column.name, op, value), column.type) for op, value in bounds if value is not None)


WATERMARK_GET = "SELECT watermark FROM runner_backfill_watermarks WHERE stream = $1"
WATERMARK_SET = """
INSERT INTO runner_backfill_watermarks (stream, watermark, job_id) VALUES ($1, $2, $3)
ON CONFLICT (stream) DO UPDATE SET watermark = EXCLUDED.watermark, job_id = EXCLUDED.job_id, updated_at = now()
"""
