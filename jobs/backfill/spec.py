"""The backfill payload: parsed and shape-checked here, checked against the catalogs in :mod:`plan`.

A payload names connections, never DSNs::

    {"source": "default", "source_table": "public.src", "dest": "warehouse", "dest_table": "public.dst",
     "key": "id", "filters": [["created_at", ">=", "2024-01-01"], ["note", "is_null"]],
     "batch_size": 10000, "mode": "insert", "create_table": false, "allow_narrowing": false}
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from runner.errors import PayloadError

DEFAULT_CONNECTION = "default"
DEFAULT_SCHEMA = "public"
DEFAULT_BATCH_SIZE = 50_000  # rows; --batch-bytes bounds a batch in bytes too
# backfill verify: source rows per compared key range, ranges compared at once, differing ranges printed
VERIFY_CHUNK_ROWS = 100_000
VERIFY_PARALLEL = 4
VERIFY_MAX_REPORTED = 50
MAX_BATCH_SIZE = 100_000  # a worker holds up to 4 batches of a job in memory (2 queued, 1 read, 1 written)
COMPARISONS = ("=", "!=", "<", "<=", ">", ">=")
NULL_TESTS = ("is_null", "not_null")
OPS = (*COMPARISONS, "in", *NULL_TESTS)
MODES = ("insert", "upsert")
FIELDS = frozenset({"source", "source_table", "dest", "dest_table", "key", "filters", "batch_size", "mode",
                    "create_table", "allow_narrowing", "since_column", "max_rows_per_second", "parallel", "chunk",
                    "batch_bytes"})
MAX_PARALLEL = 64
DEFAULT_BATCH_BYTES = 32 * 1024 * 1024  # per batch; a running backfill holds at most 4 batches
MIN_BATCH_BYTES = 64 * 1024
MAX_BATCH_BYTES = 1024 * 1024 * 1024
_CONNECTION_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
_MAX_NAME = 63  # NAMEDATALEN - 1: a longer name cannot exist in the catalog

Mode = Literal["insert", "upsert"]
FilterValue = str | tuple[str, ...] | None


@dataclass(frozen=True)
class TableName:
    schema: str
    name: str

    @classmethod
    def parse(cls, text: Any, field: str) -> TableName:
        if not isinstance(text, str) or not text.strip():
            raise PayloadError(f"{field} must be a table name such as public.events, got {text!r}")
        parts = text.split(".")
        if len(parts) > 2 or not all(parts):
            raise PayloadError(f"{field} {text!r}: expected schema.table or table")
        schema, name = parts if len(parts) == 2 else (DEFAULT_SCHEMA, parts[0])
        for part in (schema, name):
            check_identifier(part, field)
        return cls(schema, name)

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class Filter:
    column: str
    op: str
    value: FilterValue

    def to_json(self) -> list[Any]:
        if self.op in NULL_TESTS:
            return [self.column, self.op]
        return [self.column, self.op, list(self.value) if isinstance(self.value, tuple) else self.value]

    def describe(self) -> str:
        if self.op in NULL_TESTS:
            return f"{self.column} {self.op}"
        shown = ",".join(self.value) if isinstance(self.value, tuple) else self.value
        return f"{self.column} {self.op} {shown!r}"


@dataclass(frozen=True)
class Chunk:
    """One key range of a parallel backfill, ``after < key <= upto`` (None: open), run as its own job."""

    index: int  # from 1
    of: int
    after: str | None
    upto: str | None

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "of": self.of, "after": self.after, "upto": self.upto}

    def describe(self, key: str) -> str:
        parts = ([] if self.after is None else [f"{key} > {self.after}"]) + \
            ([] if self.upto is None else [f"{key} <= {self.upto}"])
        return " and ".join(parts) or "every key"


@dataclass(frozen=True)
class BackfillSpec:
    source: str
    source_table: TableName
    dest: str
    dest_table: TableName
    key: str | None
    filters: tuple[Filter, ...]
    batch_size: int
    mode: Mode
    create_table: bool
    allow_narrowing: bool = False  # a destination column narrower than its source column is refused unless set
    # Incremental: copy (upsert) only the rows whose since_column is past the previous run's watermark
    since_column: str | None = None
    max_rows_per_second: float | None = None  # a cap on the copy's average rate (None: as fast as it goes)
    parallel: int = 1  # > 1: split into this many key-range chunks, each a job of its own (backfill_chunk)
    chunk: Chunk | None = None  # set on a chunk's own payload
    batch_bytes: int = DEFAULT_BATCH_BYTES  # a batch holds at most about this many bytes of COPY data

    @property
    def stream(self) -> str:
        """What the watermark of an incremental backfill belongs to: the same tables, column and filters."""
        return json.dumps([self.source, str(self.source_table), self.dest, str(self.dest_table), self.since_column,
                           [f.to_json() for f in self.filters]], separators=(",", ":"))

    @property
    def same_connection(self) -> bool:
        return self.source == self.dest

    @property
    def atomic_checkpoint(self) -> bool:
        """The destination is the runner's own database: batch and checkpoint commit together."""
        return self.dest == DEFAULT_CONNECTION

    def to_payload(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "source_table": str(self.source_table),
            "dest": self.dest,
            "dest_table": str(self.dest_table),
            "key": self.key,
            "filters": [f.to_json() for f in self.filters],
            "batch_size": self.batch_size,
            "mode": self.mode,
            "create_table": self.create_table,
            "allow_narrowing": self.allow_narrowing,
            **({"since_column": self.since_column} if self.since_column else {}),
            **({"max_rows_per_second": self.max_rows_per_second} if self.max_rows_per_second else {}),
            **({"parallel": self.parallel} if self.parallel > 1 else {}),
            **({"chunk": self.chunk.to_json()} if self.chunk else {}),
            **({"batch_bytes": self.batch_bytes} if self.batch_bytes != DEFAULT_BATCH_BYTES else {}),
        }

    def chunk_payload(self, chunk: Chunk) -> dict[str, Any]:
        """A chunk's own payload: this copy, of one key range, into a table that exists by then."""
        return dataclasses.replace(self, parallel=1, chunk=chunk, create_table=False).to_payload()


def check_identifier(name: str, field: str) -> None:
    """Names are looked up in the catalogs later; this only rejects what no catalog can hold."""
    if not name or len(name.encode()) > _MAX_NAME or any(ord(ch) < 32 for ch in name):
        raise PayloadError(f"{field}: {name!r} is not a valid PostgreSQL name")


def parse_spec(payload: dict[str, Any]) -> BackfillSpec:
    """Check the payload's shape; raise PayloadError naming the first bad field."""
    if not isinstance(payload, dict):
        raise PayloadError("the backfill payload must be a JSON object")
    unknown = sorted(set(payload) - FIELDS)
    if unknown:
        raise PayloadError(f"unknown backfill field {unknown[0]!r} (known: {', '.join(sorted(FIELDS))})")
    spec = BackfillSpec(
        source=_connection(payload.get("source", DEFAULT_CONNECTION), "source"),
        source_table=TableName.parse(payload.get("source_table"), "source_table"),
        dest=_connection(payload.get("dest", DEFAULT_CONNECTION), "dest"),
        dest_table=TableName.parse(payload.get("dest_table"), "dest_table"),
        key=_column_name(payload.get("key"), "key"),
        filters=_filters(payload.get("filters", [])),
        batch_size=_batch_size(payload.get("batch_size", DEFAULT_BATCH_SIZE)),
        mode=_mode(payload.get("mode", "insert")),
        create_table=_flag(payload.get("create_table", False), "create_table"),
        allow_narrowing=_flag(payload.get("allow_narrowing", False), "allow_narrowing"),
        since_column=_column_name(payload.get("since_column"), "since_column"),
        max_rows_per_second=_rate(payload.get("max_rows_per_second")),
        parallel=_parallel(payload.get("parallel", 1)),
        chunk=_chunk(payload.get("chunk")),
        batch_bytes=_batch_bytes(payload.get("batch_bytes", DEFAULT_BATCH_BYTES)),
    )
    if spec.parallel > 1 and spec.since_column is not None:
        raise PayloadError("parallel and since_column do not go together: an incremental run is one stream "
                           "(its window is small); run the first full copy with parallel, then the increments")
    if spec.parallel > 1 and spec.chunk is not None:
        raise PayloadError("a chunk of a parallel backfill cannot itself be parallel")
    if spec.since_column is not None and spec.mode != "upsert":  # changed rows must replace their old copies
        spec = dataclasses.replace(spec, mode="upsert")
    if spec.same_connection and spec.source_table == spec.dest_table:
        raise PayloadError(f"source and destination are the same table ({spec.source_table} on {spec.source!r})")
    return spec


def _connection(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _CONNECTION_NAME.match(value):
        raise PayloadError(f"{field} must be a connection name (letters, digits, _), got {value!r}")
    return value.lower()


def _parallel(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PARALLEL:
        raise PayloadError(f"parallel must be an integer from 1 to {MAX_PARALLEL}, got {value!r}")
    return value


def _batch_bytes(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BATCH_BYTES <= value <= MAX_BATCH_BYTES:
        raise PayloadError(f"batch_bytes must be an integer from {MIN_BATCH_BYTES:,} to {MAX_BATCH_BYTES:,}, "
                           f"got {value!r}")
    return value


def _chunk(value: Any) -> Chunk | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"index", "of", "after", "upto"}:
        raise PayloadError("chunk must be an object with index, of, after and upto")
    index, of, bounds = value["index"], value["of"], (value["after"], value["upto"])
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (index, of)) or not 1 <= index <= of:
        raise PayloadError(f"chunk index and of must be integers, 1 <= index <= of, got {index!r} and {of!r}")
    if not all(b is None or (isinstance(b, str) and "\x00" not in b) for b in bounds):
        raise PayloadError("chunk after and upto must be keys as text, or null")
    return Chunk(index, of, *bounds)


def _rate(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not 1 <= value <= 1e9:
        raise PayloadError(f"max_rows_per_second must be a number from 1 to 1e9, got {value!r}")
    return float(value)


def _column_name(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise PayloadError(f"{field} must be a column name, got {value!r}")
    check_identifier(value, field)
    return value


def _batch_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BATCH_SIZE:
        raise PayloadError(f"batch_size must be an integer from 1 to {MAX_BATCH_SIZE:,}, got {value!r}")
    return value


def _mode(value: Any) -> Mode:
    if value not in MODES:
        raise PayloadError(f"mode must be 'insert' or 'upsert', got {value!r}")
    return value  # type: ignore[no-any-return]


def _flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise PayloadError(f"{field} must be true or false, got {value!r}")
    return value


def _filters(value: Any) -> tuple[Filter, ...]:
    if not isinstance(value, list):
        raise PayloadError(f"filters must be a list of [column, op, value], got {value!r}")
    return tuple(parse_filter(item) for item in value)


def parse_filter(item: Any) -> Filter:
    if not isinstance(item, list | tuple) or not 2 <= len(item) <= 3:
        raise PayloadError(f"filter {item!r}: expected [column, op, value]")
    column, op = item[0], item[1]
    if not isinstance(column, str):
        raise PayloadError(f"filter {item!r}: the column must be a name")
    check_identifier(column, "filter column")
    if op not in OPS:
        raise PayloadError(f"filter {item!r}: op must be one of {' '.join(OPS)}")
    raw = item[2] if len(item) == 3 else None
    if op in NULL_TESTS:
        if raw is not None:
            raise PayloadError(f"filter {item!r}: {op} takes no value")
        return Filter(column, op, None)
    if op == "in":
        if not isinstance(raw, list) or not raw:
            raise PayloadError(f"filter {item!r}: 'in' needs a non-empty list of values")
        return Filter(column, op, tuple(_scalar(v, item) for v in raw))
    return Filter(column, op, _scalar(raw, item))


def _scalar(value: Any, item: Any) -> str:
    """Every value is sent as text and cast to the column's type by PostgreSQL."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PayloadError(f"filter {item!r}: values must be finite")
        return repr(value)
    if isinstance(value, str):
        if "\x00" in value:
            raise PayloadError(f"filter {item!r}: values must not contain NUL characters")
        return value
    if value is None:
        raise PayloadError(f"filter {item!r}: a null value needs op is_null or not_null")
    raise PayloadError(f"filter {item!r}: values must be strings, numbers or booleans")
