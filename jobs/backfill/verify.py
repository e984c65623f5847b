"""``runner backfill verify SRC DST``: are two tables equal, by key range, without loading either?

The source's key space is cut into ranges of about ``chunk_rows`` keys (keyset steps on the key's index,
never OFFSET over the table); for each range both sides give their row count and an order-independent
digest (:meth:`Statements.range_digest`: a 64-bit hash per row, PostgreSQL 14+), ``parallel`` ranges at
a time. A range that differs is cut into ten by its source keys and compared again, down to ranges of at
most ``narrow_to`` source rows, so the report names small ranges. The first range has no lower bound and
the last no upper bound: destination rows outside the source's keys are counted too. The same filters
apply to both sides.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import asyncpg

from runner.db import Database
from runner.jobs.backfill.plan import Plan, as_payload_error
from runner.jobs.backfill.spec import VERIFY_CHUNK_ROWS, VERIFY_MAX_REPORTED, VERIFY_PARALLEL, TableName
from runner.jobs.backfill.sql import not_after_sql

NARROW_TO = 100
SPLIT_INTO = 10


@dataclass(frozen=True)
class KeyRange:
    lower: str | None  # exclusive; None: unbounded
    upper: str | None  # inclusive; None: unbounded

    def describe(self, key: str) -> str:
        if self.lower is None and self.upper is None:
            return f"every {key}"
        if self.lower is None:
            return f"{key} <= {self.upper}"
        if self.upper is None:
            return f"{key} > {self.lower}"
        return f"{self.lower} < {key} <= {self.upper}"


@dataclass(frozen=True)
class RangeDiff:
    range: KeyRange
    source_rows: int
    dest_rows: int


@dataclass
class VerifyReport:
    source: TableName
    dest: TableName
    key: str
    source_rows: int = 0
    dest_rows: int = 0
    ranges: int = 0
    differing: list[RangeDiff] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def equal(self) -> bool:
        return not self.differing

    def as_dict(self) -> dict[str, Any]:
        return {
            "equal": self.equal, "source": str(self.source), "dest": str(self.dest), "key": self.key,
            "source_rows": self.source_rows, "dest_rows": self.dest_rows, "ranges": self.ranges,
            "seconds": round(self.seconds, 3),
            "differing": [{"lower": d.range.lower, "upper": d.range.upper, "source_rows": d.source_rows,
                           "dest_rows": d.dest_rows, "range": d.range.describe(self.key)}
                          for d in self.differing[:VERIFY_MAX_REPORTED]],
        }


class Verifier:
    def __init__(self, plan: Plan, source_db: Database, dest_db: Database, *, chunk_rows: int = VERIFY_CHUNK_ROWS,
                 parallel: int = VERIFY_PARALLEL, narrow_to: int = NARROW_TO) -> None:
        self.plan = plan
        self.statements = plan.statements
        self.source_db, self.dest_db = source_db, dest_db
        self.chunk_rows = chunk_rows
        self.narrow_to = narrow_to
        self.slots = asyncio.Semaphore(parallel)
        self.hashable: frozenset[str] = frozenset()  # columns whose type has a hash function

    async def run(self) -> VerifyReport:
        started = time.monotonic()
        spec = self.plan.spec
        self.hashable = await self._hashable_columns()
        report = VerifyReport(spec.source_table, spec.dest_table, self.statements.key.name)
        ranges = await self.split(KeyRange(None, None), self.chunk_rows)
        report.ranges = len(ranges)
        results = await asyncio.gather(*(self.compare(r) for r in ranges))
        for key_range, (source, dest) in zip(ranges, results, strict=True):
            report.source_rows += source[0]
            report.dest_rows += dest[0]
            if source != dest:
                report.differing += await self.narrow(key_range, source[0], dest[0])
        report.seconds = time.monotonic() - started
        return report

    async def _hashable_columns(self) -> frozenset[str]:
        found = set()
        async with self.source_db.connection() as connection:
            for column in self.statements.columns:
                try:
                    async with connection.transaction():  # a failed probe must not end the session's work
                        await connection.fetchval(self.statements.hash_probe(column))
                except asyncpg.PostgresError:
                    continue
                found.add(column.name)
        return frozenset(found)

    async def split(self, key_range: KeyRange, step: int) -> list[KeyRange]:
        """``key_range`` cut after every ``step`` source keys (the last piece keeps its upper bound)."""
        bounds: list[str] = []
        lower = key_range.lower
        async with self.source_db.connection() as connection:
            while True:
                sql, args = self.statements.upper_bound(lower, step)
                upper = await connection.fetchval(sql, *args)
                if upper is None or (key_range.upper is not None and await connection.fetchval(
                        not_after_sql(self.statements.key.type), key_range.upper, upper)):
                    break
                bounds.append(upper)
                lower = upper
        edges = [key_range.lower, *bounds, key_range.upper]
        return [KeyRange(a, b) for a, b in pairwise(edges)]

    async def compare(self, key_range: KeyRange) -> tuple[tuple[int, str], tuple[int, str]]:
        async with self.slots:
            return await asyncio.gather(self._digest(self.source_db, self.statements.source, key_range),
                                        self._digest(self.dest_db, self.statements.dest, key_range))

    async def _digest(self, db: Database, table: TableName, key_range: KeyRange) -> tuple[int, str]:
        sql, args = self.statements.range_digest(table, key_range.lower, key_range.upper, self.hashable)
        async with as_payload_error(f"reading {table}"), db.connection() as connection:
            row = await connection.fetchrow(sql, *args)
        assert row is not None
        return int(row["rows"]), str(row["digest"])

    async def narrow(self, key_range: KeyRange, source_rows: int, dest_rows: int) -> list[RangeDiff]:
        """The smallest differing ranges within one that differs."""
        if source_rows <= self.narrow_to:
            return [RangeDiff(key_range, source_rows, dest_rows)]
        pieces = await self.split(key_range, max(1, -(-source_rows // SPLIT_INTO)))
        if len(pieces) <= 1:
            return [RangeDiff(key_range, source_rows, dest_rows)]
        results = await asyncio.gather(*(self.compare(p) for p in pieces))
        found: list[RangeDiff] = []
        for piece, (source, dest) in zip(pieces, results, strict=True):
            if source != dest:
                found += await self.narrow(piece, source[0], dest[0])
        return found
