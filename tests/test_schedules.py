"""Periodic jobs: rules and ticks (DST computed, not waited for), the missed-tick policies, exactly one job
per (schedule, tick) whoever fires it, code-declared schedules on redeploy, and the client API."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from runner.app import App
from runner.errors import PayloadError, ScheduleError, UnknownKind
from runner.loops.scheduler import Scheduler
from runner.schedules import ScheduleSpec, ScheduleStore, make_spec, parse_rule, plan_ticks
from runner.worker import Worker
from tests.pg import wait_until

BERLIN = ZoneInfo("Europe/Berlin")
T0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


# --- rules -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cron", "every", "timezone", "message"), [
    ("61 * * * *", None, None, "invalid cron expression '61 * * * *'"),
    ("* * *", None, None, "invalid cron expression"),
    ("0 3 * * *", None, "Mars/Olympus", "unknown timezone 'Mars/Olympus'"),
    ("0 3 * * *", None, "../../etc/passwd", "unknown timezone"),
    (None, 0, None, "--every must be between 1 and"),
    (None, float("nan"), None, "--every must be between"),
    (None, -5, None, "--every must be between"),
    (None, None, None, "exactly one of"),
    ("0 3 * * *", 60, None, "exactly one of"),
    (None, 60, "Europe/Berlin", "--timezone applies to a cron expression"),
])
def test_a_bad_rule_is_one_clear_error(cron: str | None, every: float | None, timezone: str | None,
                                       message: str) -> None:
    with pytest.raises(ScheduleError, match=message.replace("(", r"\(").replace("*", r"\*").replace(".", r"\.")):
        parse_rule(cron, every, timezone)


def test_a_bad_policy_or_name_is_refused() -> None:
    with pytest.raises(ScheduleError, match="--missed must be one of skip, run-all"):
        make_spec("n", "noop", every=60, missed="all")
    with pytest.raises(ScheduleError, match="--missed-limit must be between 1"):
        make_spec("n", "noop", every=60, missed="run-all", missed_limit=0)
    with pytest.raises(ScheduleError, match="a schedule name is 1 to 200 printable characters"):
        make_spec("bad\nname", "noop", every=60)


def ticks(rule_cron: str, start: datetime, n: int, timezone: str = "Europe/Berlin") -> list[datetime]:
    rule = parse_rule(rule_cron, None, timezone)
    found, at = [], start
    for _ in range(n):
        at = rule.first_tick_after(at)
        found.append(at)
    return found


def test_a_nightly_cron_across_the_spring_forward_change_fires_once_a_day() -> None:
    # 2026-03-29 02:00 Berlin does not exist (clocks jump to 03:00): 02:30 fires right after the change
    got = ticks("30 2 * * *", datetime(2026, 3, 27, 12, tzinfo=BERLIN), 3)
    assert [t.astimezone(BERLIN).isoformat() for t in got] == [
        "2026-03-28T02:30:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"]
    assert got[1] - got[0] == timedelta(hours=23, minutes=30)


def test_a_nightly_cron_across_the_fall_back_change_fires_once_not_twice() -> None:
    # 2026-10-25 02:30 Berlin happens twice (CEST, then CET): a fixed-time job runs once
    got = ticks("30 2 * * *", datetime(2026, 10, 24, 12, tzinfo=BERLIN), 3)
    assert [t.astimezone(BERLIN).isoformat() for t in got] == [
        "2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00", "2026-10-27T02:30:00+01:00"]
    assert got[1] - got[0] == timedelta(hours=25)
    # an hourly job runs in each real hour, the repeated one included
    hourly = ticks("0 * * * *", datetime(2026, 10, 25, 0, 30, tzinfo=BERLIN), 4)
    assert [t - hourly[0] for t in hourly] == [timedelta(hours=h) for h in range(4)]


def test_a_six_field_expression_has_seconds_last() -> None:
    assert ticks("*/15 * * * * *", T0, 3, "UTC") == [T0 + timedelta(seconds=s) for s in (15, 30, 45)]


# --- the missed-tick policies ------------------------------------------------------------------------------
EVERY_S = parse_rule(None, 1.0)


def test_skip_enqueues_one_job_for_a_gap() -> None:
    plan = plan_ticks(EVERY_S, T0, T0 + timedelta(seconds=4.5), "skip", 10, grace_s=0.5)
    assert plan.ticks == [T0 + timedelta(seconds=4)]  # the late one only; 4 missed ones skipped
    assert (plan.missed, plan.next_tick) == (4, T0 + timedelta(seconds=5))
    nightly = parse_rule("0 3 * * *", None, "UTC")
    first = datetime(2026, 6, 1, 3, tzinfo=UTC)
    plan = plan_ticks(nightly, first, first + timedelta(days=3, hours=1), "skip", 10, grace_s=60)
    assert plan.ticks == [first + timedelta(days=3)]  # no late tick: the newest missed one
    assert (plan.missed, plan.next_tick) == (3, first + timedelta(days=4))


def test_run_all_enqueues_each_missed_tick_up_to_the_limit() -> None:
    now = T0 + timedelta(seconds=4.5)
    assert plan_ticks(EVERY_S, T0, now, "run-all", 10, grace_s=0.5).ticks == [
        T0 + timedelta(seconds=s) for s in range(5)]
    limited = plan_ticks(EVERY_S, T0, now, "run-all", 2, grace_s=0.5)
    assert limited.ticks == [T0 + timedelta(seconds=s) for s in (2, 3, 4)]  # the newest 2 missed + the late
    assert limited.missed == 2


def test_late_ticks_within_the_grace_are_always_enqueued() -> None:
    plan = plan_ticks(EVERY_S, T0, T0 + timedelta(seconds=3.2), "skip", 10, grace_s=60)
    assert plan.ticks == [T0 + timedelta(seconds=s) for s in range(4)] and plan.missed == 0


# --- stored schedules --------------------------------------------------------------------------------------
async def scheduled_jobs(app: App, name: str) -> list[asyncpg.Record]:
    return await app.db.fetch("SELECT id, kind, payload::text AS payload, queue, schedule_tick FROM runner_jobs "
                              "WHERE schedule_name = $1 ORDER BY schedule_tick", name)


async def backdate(app: App, name: str, seconds: float) -> None:
    """As if no worker had run for ``seconds``: the schedule's next tick is that far in the past."""
    await app.db.execute("UPDATE runner_schedules SET next_tick = clock_timestamp() - $2 * interval '1 second' "
                         "WHERE name = $1", name, seconds)


@pytest.mark.parametrize(("missed", "limit", "expected"), [("skip", 10, 1), ("run-all", 10, 5), ("run-all", 3, 3)])
async def test_workers_down_for_several_ticks_then_the_policy_applies(
        app: App, missed: str, limit: int, expected: int) -> None:
    await app.add_schedule("gap", "noop", every=1, missed=missed, missed_limit=limit)
    await backdate(app, "gap", 4.5)  # down for 5 ticks: -4.5 s ... -0.5 s, all older than the grace
    [fired] = await app.schedule_store.fire_due(grace_s=0.0)
    jobs = await scheduled_jobs(app, "gap")
    assert len(jobs) == len(fired.job_ids) == expected
    gaps = {b["schedule_tick"] - a["schedule_tick"] for a, b in pairwise(jobs)}
    assert gaps <= {timedelta(seconds=1)}  # run-all: consecutive ticks, the newest ones
    stored = await app.schedule_store.get("gap")
    assert stored is not None and stored["next_tick"] > jobs[-1]["schedule_tick"]
    assert stored["last_tick"] == jobs[-1]["schedule_tick"] and stored["last_job_id"] == jobs[-1]["id"]
    assert await app.schedule_store.fire_due(grace_s=0.0) == []  # nothing due until the next tick


async def test_concurrent_firing_enqueues_each_tick_once(app: App) -> None:
    await app.add_schedule("race", "noop", every=1, missed="run-all", missed_limit=100)
    await backdate(app, "race", 20.5)
    stores = [ScheduleStore(app.db, app.queue.max_attempts_for) for _ in range(3)]
    results = await asyncio.gather(*(store.fire_due(grace_s=0.0) for store in stores))
    jobs = await scheduled_jobs(app, "race")
    assert len(jobs) == 21 == len({j["schedule_tick"] for j in jobs})
    assert sum(len(f.job_ids) for fired in results for f in fired) == 21  # one store fired, the others skipped
    with pytest.raises(asyncpg.UniqueViolationError):  # the database refuses a second job for a tick
        await app.db.execute("INSERT INTO runner_jobs (kind, schedule_name, schedule_tick) VALUES ('noop', $1, $2)",
                             "race", jobs[0]["schedule_tick"])


async def test_the_client_api_adds_lists_pauses_resumes_runs_and_removes(app: App) -> None:
    added = await app.add_schedule("hourly-note", "record", cron="0 * * * *", timezone="Europe/Berlin",
                                   payload={"key": "k"}, priority=3)
    assert (added["rule"], added["paused"], added["source"]) == ("cron '0 * * * *' (Europe/Berlin)", False, "cli")
    assert added["next_tick"].minute == 0 and added["next_tick"] > datetime.now(UTC)
    with pytest.raises(ScheduleError, match="a schedule named 'hourly-note' exists"):
        await app.add_schedule("hourly-note", "noop", every=60)
    await app.pause_schedule("hourly-note")
    await backdate(app, "hourly-note", 7200)
    assert await app.schedule_store.fire_due(grace_s=60) == []  # paused: never due
    await app.pause_schedule("hourly-note", paused=False)  # resumed from the next tick after now
    [resumed] = await app.list_schedules()
    assert not resumed["paused"] and resumed["next_tick"] > datetime.now(UTC)
    job_id = await app.run_schedule("hourly-note")
    job = await app.get(job_id)
    assert (job.kind, job.payload, job.priority, job.schedule_name) == ("record", {"key": "k"}, 3, "hourly-note")
    await app.remove_schedule("hourly-note")
    assert await app.list_schedules() == []
    for call in (app.pause_schedule("gone"), app.remove_schedule("gone"), app.run_schedule("gone")):
        with pytest.raises(ScheduleError, match="no schedule named 'gone'"):
            await call


async def test_a_schedule_is_checked_as_an_enqueue_and_nothing_is_stored_when_wrong(app: App) -> None:
    with pytest.raises(UnknownKind):
        await app.add_schedule("s", "no-such-kind", every=60)
    with pytest.raises(PayloadError):
        await app.add_schedule("s", "sleep", every=60, payload={"seconds": "soon"})
    with pytest.raises(ScheduleError):
        await app.add_schedule("s", "noop", cron="not a cron")
    assert await app.list_schedules() == []


def declared(app: App, **changes: object) -> list[ScheduleSpec]:
    fields = {"every": 60.0, "payload": {"v": 1}, **changes}
    return [make_spec("code-report", "noop", **fields)]  # type: ignore[arg-type]


async def test_a_code_declared_schedule_is_updated_on_redeploy_and_keeps_its_pause(app: App) -> None:
    store = app.schedule_store
    first = Scheduler(store, app.settings, declared(app))
    await first.run_once()
    [stored] = await app.list_schedules()
    assert (stored["source"], stored["every_s"], stored["payload"]) == ("code", 60.0, {"v": 1})
    tick = stored["next_tick"]
    same = Scheduler(store, app.settings, declared(app))  # a restart with the same code changes nothing
    await same.run_once()
    assert (await app.list_schedules())[0]["next_tick"] == tick
    await app.pause_schedule("code-report")
    redeploy = Scheduler(store, app.settings, declared(app, payload={"v": 2}))  # new payload, same rule
    await redeploy.run_once()
    [updated] = await app.list_schedules()
    assert (updated["payload"], updated["next_tick"], updated["paused"]) == ({"v": 2}, tick, True)
    rule_change = Scheduler(store, app.settings, declared(app, every=None, cron="0 4 * * *"))
    await rule_change.run_once()
    [changed] = await app.list_schedules()
    assert (changed["cron"], changed["every_s"], changed["paused"]) == ("0 4 * * *", None, True)
    assert changed["next_tick"].hour == 4


async def test_a_worker_with_a_bad_code_declared_schedule_does_not_start(app: App) -> None:
    deployed = App.assemble(app.settings, app.dsn, app.db, app.queue, app.plugins, app.registry)
    deployed.periodic("bad", kind="sleep", every=5, payload={"seconds": -1})
    with pytest.raises(PayloadError):
        await Worker(deployed, install_signal_handlers=False).run()
    assert await app.list_schedules() == []


async def test_the_scheduler_sleeps_until_woken_by_a_new_schedule(app: App) -> None:
    worker = Worker(app, install_signal_handlers=False)
    task = asyncio.create_task(worker.run())
    try:
        assert worker.scheduler is not None
        await wait_until(lambda: _asleep(worker), timeout_s=30)  # nothing scheduled: its longest sleep (30 s)
        await app.add_schedule("woken", "noop", every=1)  # NOTIFY runner_schedules wakes it
        await wait_until(lambda: _has_jobs(app, "woken", 2), timeout_s=20)
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)


async def _asleep(worker: Worker) -> bool:
    assert worker.scheduler is not None
    return worker.scheduler.last_success > 0 and worker.scheduler.interval_s == 30.0


async def _has_jobs(app: App, name: str, n: int) -> bool:
    return len(await scheduled_jobs(app, name)) >= n


async def test_a_scheduled_job_knows_its_tick(app: App) -> None:
    await app.add_schedule("tick-aware", "noop", every=1)
    await backdate(app, "tick-aware", 0.5)
    [fired] = await app.schedule_store.fire_due(grace_s=60)
    [claimed] = await app.queue.job_claim(["default"], 10, "w", 30, ["noop"])
    assert claimed.schedule_tick == fired.ticks[0]
