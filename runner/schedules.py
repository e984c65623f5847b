"""Periodic jobs: a schedule's rule (a cron expression in a timezone, or every N seconds), its ticks, and
what happens to ticks that came due while no worker ran.

Cron expressions are parsed and stepped by cronsim (Debian cron's semantics, including daylight saving
time: a fixed time that a spring-forward change skips fires right after the change, and one that a
fall-back change repeats fires once; wildcard hours fire in every real hour). Five fields, or six with
seconds as the sixth.

A tick is *late* while it is at most RUNNER_SCHEDULE_GRACE seconds old (a busy or restarting worker): it
is always enqueued. Older ticks are *missed*: ``skip`` enqueues only the newest of them, and only when
no late tick is enqueued with them, so a gap gives one job; ``run-all`` enqueues each, the newest
``missed_limit`` of them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from runner import queue_sql as sql
from runner.errors import ScheduleError

if TYPE_CHECKING:
    import asyncpg

    from runner.db import Database

Missed = Literal["skip", "run-all"]
MISSED_POLICIES: tuple[Missed, ...] = ("skip", "run-all")
MIN_EVERY_S = 1.0  # the scheduler's resolution, and cron's (its seconds field)
MAX_EVERY_S = 10 * 366 * 86400.0
MAX_MISSED_LIMIT = 10_000
MAX_TICKS_PER_PASS = 10_000  # late ticks of a 1 s schedule under a long grace stay bounded too
MAX_NAME_CHARS = 200
ONE_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class Rule:
    """When a schedule ticks: ``cron`` in ``timezone``, or every ``every_s`` seconds from its first tick."""

    cron: str | None
    every_s: float | None
    timezone: str = "UTC"

    def first_tick_after(self, after: datetime, anchor: datetime | None = None) -> datetime:
        """The first tick strictly after ``after``; an interval counts from ``anchor`` (its first tick)."""
        if self.every_s is not None:
            if anchor is None or anchor > after:
                return anchor if anchor is not None else after + timedelta(seconds=self.every_s)
            steps = math.floor((after - anchor).total_seconds() / self.every_s) + 1
            return anchor + timedelta(seconds=steps * self.every_s)
        assert self.cron is not None
        local = after.astimezone(ZoneInfo(self.timezone))
        return next(CronSim(self.cron, local)).astimezone(UTC)

    def ticks_back(self, upto: datetime, since: datetime) -> Iterator[datetime]:
        """Ticks from ``upto`` (included) back to ``since`` (included), newest first; ``since`` is a tick."""
        if self.every_s is not None:
            steps = math.floor((upto - since).total_seconds() / self.every_s)
            for k in range(steps, -1, -1):
                yield since + timedelta(seconds=k * self.every_s)
            return
        assert self.cron is not None
        # Reverse iteration starts strictly before its datetime unless that has microseconds.
        local = (upto + ONE_MICROSECOND).astimezone(ZoneInfo(self.timezone))
        for tick in CronSim(self.cron, local, reverse=True):
            tick_utc = tick.astimezone(UTC)
            if tick_utc < since:
                return
            yield tick_utc

    def describe(self) -> str:
        if self.every_s is not None:
            return f"every {self.every_s:g}s"
        return f"cron {self.cron!r} ({self.timezone})"


def parse_rule(cron: str | None, every_s: float | None, timezone: str | None = None) -> Rule:
    """A checked rule, or ScheduleError with one line saying what is wrong."""
    if (cron is None) == (every_s is None):
        raise ScheduleError("give exactly one of a cron expression (--cron) or an interval (--every SECONDS)")
    zone = timezone or "UTC"
    if every_s is not None:
        if timezone not in (None, "UTC"):
            raise ScheduleError("--timezone applies to a cron expression; an interval counts in seconds")
        if not isinstance(every_s, int | float) or not math.isfinite(every_s) or not (
                MIN_EVERY_S <= every_s <= MAX_EVERY_S):
            raise ScheduleError(f"--every must be between {MIN_EVERY_S:g} and {MAX_EVERY_S:g} seconds, "
                                f"got {every_s!r}")
        return Rule(None, float(every_s), "UTC")
    assert cron is not None
    _check_timezone(zone)
    text = " ".join(cron.split())
    if not text or len(text) > 200 or any(not c.isprintable() for c in text):
        raise ScheduleError(f"invalid cron expression {cron[:200]!r}")
    try:
        next(CronSim(text, datetime.now(ZoneInfo(zone))))
    except (CronSimError, StopIteration, ValueError, OverflowError) as error:
        raise ScheduleError(f"invalid cron expression {text!r}: {error or 'it never matches'}") from None
    return Rule(text, None, zone)


def _check_timezone(zone: str) -> None:
    try:
        if not zone or len(zone) > 100 or zone.startswith(("/", ".")) or ".." in zone:
            raise ValueError(zone)
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ScheduleError(f"unknown timezone {zone[:100]!r} (an IANA name such as Europe/Berlin or UTC)") from None


def check_schedule_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS or any(
            not c.isprintable() for c in name):
        raise ScheduleError(f"a schedule name is 1 to {MAX_NAME_CHARS} printable characters, got {name[:100]!r}")
    return name


def check_missed(missed: str, missed_limit: int) -> Missed:
    if missed not in MISSED_POLICIES:
        raise ScheduleError(f"--missed must be one of {', '.join(MISSED_POLICIES)}, got {missed[:50]!r}")
    if isinstance(missed_limit, bool) or not isinstance(missed_limit, int) or not (
            1 <= missed_limit <= MAX_MISSED_LIMIT):
        raise ScheduleError(f"--missed-limit must be between 1 and {MAX_MISSED_LIMIT:,}, got {missed_limit!r}")
    return missed  # type: ignore[return-value]


@dataclass(frozen=True)
class TickPlan:
    ticks: list[datetime]  # to enqueue, oldest first
    next_tick: datetime  # the first tick after now
    missed: int  # missed ticks not enqueued (the policy's or the limit's)


def plan_ticks(rule: Rule, next_tick: datetime, now: datetime, missed: Missed, missed_limit: int,
               grace_s: float) -> TickPlan:
    """Which due ticks (from ``next_tick`` to ``now``) to enqueue, by the missed-tick policy."""
    late_since = now - timedelta(seconds=grace_s)
    late: list[datetime] = []
    old: list[datetime] = []
    for tick in rule.ticks_back(now, next_tick):
        if tick >= late_since:
            if len(late) < MAX_TICKS_PER_PASS:
                late.append(tick)
        elif missed == "run-all" and len(old) < missed_limit:
            old.append(tick)
        elif missed == "skip" and not late and not old:
            old.append(tick)
        else:
            break
    skipped = _count_missed(rule, next_tick, late_since) - len(old)
    chosen = sorted(late + old)
    return TickPlan(chosen, rule.first_tick_after(now, anchor=next_tick), max(0, skipped))


def _count_missed(rule: Rule, since: datetime, before: datetime) -> int:
    """Ticks in [since, before): exact for an interval; for cron, counted up to MAX_TICKS_PER_PASS."""
    if before <= since:
        return 0
    if rule.every_s is not None:
        return math.floor((before - ONE_MICROSECOND - since).total_seconds() / rule.every_s) + 1
    count = 0
    for _ in rule.ticks_back(before - ONE_MICROSECOND, since):
        count += 1
        if count >= MAX_TICKS_PER_PASS:
            break
    return count


@dataclass(frozen=True)
class ScheduleSpec:
    """A schedule as declared (in code or by ``runner schedule add``), checked."""

    name: str
    kind: str
    rule: Rule
    payload: dict[str, Any]
    queue: str | None = None
    priority: int = 0
    missed: Missed = "skip"
    missed_limit: int = 10


def make_spec(name: str, kind: str, *, cron: str | None = None, every: float | None = None,
              timezone: str | None = None, payload: dict[str, Any] | None = None, queue: str | None = None,
              priority: int = 0, missed: str = "skip", missed_limit: int = 10) -> ScheduleSpec:
    check_schedule_name(name)
    rule = parse_rule(cron, every, timezone)
    policy = check_missed(missed, missed_limit)
    if payload is not None and not isinstance(payload, dict):
        raise ScheduleError(f"a schedule's payload is a JSON object, got {type(payload).__name__}")
    return ScheduleSpec(name, kind, rule, dict(payload or {}), queue, priority, policy, missed_limit)


# --- the stored schedules ------------------------------------------------------------------------------
@dataclass(frozen=True)
class FiredTicks:
    schedule: str
    job_ids: list[int]
    ticks: list[datetime]
    missed: int


class ScheduleStore:
    """runner_schedules, and the enqueue of their ticks (SQL: runner.queue_sql)."""

    def __init__(self, db: Database, max_attempts_for: Callable[[str], int]) -> None:
        self.db = db
        self.max_attempts_for = max_attempts_for

    async def clock(self) -> datetime:
        return cast(datetime, await self.db.fetchval(sql.SCHEDULE_CLOCK))

    async def upsert_code(self, specs: Sequence[ScheduleSpec]) -> list[str]:
        """Store the code-declared schedules; the names whose definition was new or changed."""
        if not specs:
            return []
        changed: list[str] = []
        async with self.db.transaction() as connection:
            now = cast(datetime, await connection.fetchval(sql.SCHEDULE_CLOCK))
            for spec in specs:
                name = await connection.fetchval(sql.SCHEDULE_UPSERT_CODE, *self._row(spec, now))
                if name is not None:
                    changed.append(name)
            if changed:
                await connection.execute(sql.NOTIFY_SCHEDULES, "changed")
        return changed

    async def insert(self, spec: ScheduleSpec) -> bool:
        """Store a CLI schedule; False when one of that name exists."""
        async with self.db.transaction() as connection:
            now = cast(datetime, await connection.fetchval(sql.SCHEDULE_CLOCK))
            name = await connection.fetchval(sql.SCHEDULE_INSERT, *self._row(spec, now))
            if name is not None:
                await connection.execute(sql.NOTIFY_SCHEDULES, spec.name)
        return name is not None

    @staticmethod
    def _row(spec: ScheduleSpec, now: datetime) -> tuple[Any, ...]:
        rule = spec.rule  # the first tick: cron's next after now, or one interval from now
        return (spec.name, spec.kind, json.dumps(spec.payload), spec.queue, spec.priority, rule.cron, rule.every_s,
                rule.timezone, spec.missed, spec.missed_limit, rule.first_tick_after(now))

    async def all(self) -> list[dict[str, Any]]:
        return [_decoded(row) for row in await self.db.fetch(sql.SCHEDULE_LIST)]

    async def get(self, name: str) -> dict[str, Any] | None:
        row = await self.db.fetchrow(sql.SCHEDULE_GET, name)
        return None if row is None else _decoded(row)

    async def set_paused(self, name: str, paused: bool) -> bool:
        async with self.db.transaction() as connection:
            next_tick = None
            if not paused:
                row = await connection.fetchrow(sql.SCHEDULE_GET, name)
                if row is None:
                    return False
                now = cast(datetime, await connection.fetchval(sql.SCHEDULE_CLOCK))
                rule = Rule(row["cron"], row["every_s"], row["timezone"])
                anchor = row["next_tick"] if rule.every_s is not None else None
                next_tick = rule.first_tick_after(now, anchor=anchor)
            found = await connection.fetchval(sql.SCHEDULE_SET_PAUSED, name, paused, next_tick)
            if found is not None:
                await connection.execute(sql.NOTIFY_SCHEDULES, name)
        return found is not None

    async def remove(self, name: str) -> bool:
        async with self.db.transaction() as connection:
            found = await connection.fetchval(sql.SCHEDULE_DELETE, name)
            if found is not None:
                await connection.execute(sql.NOTIFY_SCHEDULES, name)
        return found is not None

    async def run_now(self, name: str) -> int | None:
        """Enqueue the schedule's job now, outside its ticks (its tick column: now). None: no such schedule."""
        async with self.db.transaction() as connection:
            row = await connection.fetchrow(sql.SCHEDULE_GET, name)
            if row is None:
                return None
            now = cast(datetime, await connection.fetchval(sql.SCHEDULE_CLOCK))
            ids = await self._enqueue(connection, row, [now])
        return ids[0][0] if ids else None

    async def fire_due(self, grace_s: float, limit: int = 100) -> list[FiredTicks]:
        """Enqueue the due ticks of every due schedule (one transaction) and move each to its next tick."""
        fired: list[FiredTicks] = []
        async with self.db.transaction() as connection:
            for row in await connection.fetch(sql.SCHEDULE_DUE, limit):
                rule = Rule(row["cron"], row["every_s"], row["timezone"])
                plan = plan_ticks(rule, row["next_tick"], row["now"], row["missed"], row["missed_limit"], grace_s)
                inserted = await self._enqueue(connection, row, plan.ticks) if plan.ticks else []
                last_id, last_tick = inserted[-1] if inserted else (None, None)
                await connection.execute(sql.SCHEDULE_ADVANCE, row["name"], plan.next_tick, last_tick, last_id)
                fired.append(FiredTicks(row["name"], [i for i, _ in inserted], [t for _, t in inserted], plan.missed))
        return fired

    async def _enqueue(self, connection: asyncpg.Connection, row: asyncpg.Record,
                       ticks: Sequence[datetime]) -> list[tuple[int, datetime]]:
        rows = await connection.fetch(
            sql.SCHEDULE_ENQUEUE, row["kind"], row["queue"] or "default", row["payload"], row["priority"],
            self.max_attempts_for(row["kind"]), row["name"], list(ticks))
        return [(r["id"], r["schedule_tick"]) for r in rows]

    async def seconds_to_next(self) -> float | None:
        value = await self.db.fetchval(sql.SCHEDULE_SECONDS_TO_NEXT)
        return None if value is None else float(value)


def _decoded(row: asyncpg.Record) -> dict[str, Any]:
    found = dict(row)
    found["payload"] = json.loads(found["payload"])
    found.pop("now", None)
    rule = Rule(found["cron"], found["every_s"], found["timezone"])
    found["rule"] = rule.describe()
    return found
