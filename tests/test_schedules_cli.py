"""``runner schedule ...`` and schedules across worker processes: one job per tick with three of them."""

from __future__ import annotations

import json
import signal
from datetime import timedelta
from itertools import pairwise
from pathlib import Path

import pytest

from runner.app import App
from tests.conftest import run_cli, start_worker, wait_exit
from tests.pg import wait_until
from tests.test_cli import one_error_line


def schedules(runner_env: dict[str, str]) -> list[dict[str, object]]:
    listed = run_cli(runner_env, "schedule", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def test_add_list_pause_resume_run_remove(runner_env: dict[str, str]) -> None:
    added = run_cli(runner_env, "schedule", "add", "nightly", "record", "--cron", "0 3 * * *",
                    "--timezone", "Europe/Berlin", "--payload", '{"key": "n"}', "--missed", "run-all",
                    "--missed-limit", "3")
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("nightly: cron '0 3 * * *' (Europe/Berlin), next tick ")
    [stored] = schedules(runner_env)
    assert (stored["kind"], stored["payload"], stored["missed"], stored["missed_limit"], stored["source"]) == (
        "record", {"key": "n"}, "run-all", 3, "cli")
    table = run_cli(runner_env, "schedule", "list", COLUMNS="200")
    assert "nightly" in table.stdout and "run-all (3)" in table.stdout
    assert run_cli(runner_env, "schedule", "pause", "nightly").stdout.strip() == "nightly: paused"
    assert schedules(runner_env)[0]["paused"] is True
    assert run_cli(runner_env, "schedule", "resume", "nightly").stdout.strip() == "nightly: resumed"
    ran = run_cli(runner_env, "schedule", "run", "nightly")
    assert ran.returncode == 0 and int(ran.stdout) > 0
    shown = json.loads(run_cli(runner_env, "show", ran.stdout.strip(), "--json").stdout)
    assert (shown["kind"], shown["schedule_name"]) == ("record", "nightly")
    status = json.loads(run_cli(runner_env, "status", "--json").stdout)
    assert [s["name"] for s in status["schedules"]] == ["nightly"]
    assert run_cli(runner_env, "schedule", "remove", "nightly").returncode == 0
    assert schedules(runner_env) == []
    gone = run_cli(runner_env, "schedule", "remove", "nightly")
    assert gone.returncode == 2 and "no schedule named 'nightly'" in one_error_line(gone.stderr)


@pytest.mark.parametrize(("args", "message"), [
    (["--cron", "0 25 * * *"], "invalid cron expression '0 25 * * *'"),
    (["--cron", "0 3 * * *", "--timezone", "Europe/Nowhere"], "unknown timezone 'Europe/Nowhere'"),
    (["--every", "0"], "--every must be between 1 and"),
    (["--every", "nan"], "--every must be between 1 and"),
    ([], "give exactly one of a cron expression"),
    (["--every", "5", "--cron", "* * * * *"], "give exactly one of a cron expression"),
    (["--every", "5", "--missed", "sometimes"], "--missed must be one of skip, run-all"),
    (["--every", "5", "--payload", "[1]"], "--payload: the payload must be a JSON object"),
    (["--every", "5", "--payload", '{"seconds": -3}'], "'seconds' must be a non-negative number"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_is_stored(
        runner_env: dict[str, str], args: list[str], message: str) -> None:
    result = run_cli(runner_env, "schedule", "add", "s", "sleep", *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in one_error_line(result.stderr)
    assert schedules(runner_env) == []


def test_an_unknown_kind_is_refused(runner_env: dict[str, str]) -> None:
    result = run_cli(runner_env, "schedule", "add", "s", "no-such-kind", "--every", "60")
    assert result.returncode == 2
    assert "unknown job kind 'no-such-kind'" in one_error_line(result.stderr)
    assert schedules(runner_env) == []


async def test_three_worker_processes_enqueue_each_tick_once(
        runner_env: dict[str, str], app: App, tmp_path: Path) -> None:
    added = run_cli(runner_env, "schedule", "add", "every-second", "noop", "--every", "1")
    assert added.returncode == 0, added.stderr
    workers = [start_worker(runner_env, log_path=tmp_path / f"w{i}.log", RUNNER_WORKER_ID=f"sched-{i}")
               for i in range(3)]
    try:
        async def ten_seconds_of_ticks() -> bool:
            n = await app.db.fetchval("SELECT count(*) FROM runner_jobs WHERE schedule_name = 'every-second'")
            return bool(n >= 11)

        await wait_until(ten_seconds_of_ticks, timeout_s=120)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        codes = [await wait_exit(worker, 60) for worker in workers]
    assert codes == [0, 0, 0]
    ticks = [r["schedule_tick"] for r in await app.db.fetch(
        "SELECT schedule_tick FROM runner_jobs WHERE schedule_name = 'every-second' ORDER BY schedule_tick")]
    assert len(ticks) >= 11 and len(set(ticks)) == len(ticks)  # no tick twice
    assert {b - a for a, b in pairwise(ticks)} == {timedelta(seconds=1)}  # none missed
    fired_by = {i for i in range(3) if "schedule fired" in (tmp_path / f"w{i}.log").read_text()}
    assert fired_by  # whichever worker fired each tick; the database kept it to one job

    # No worker for 6 ticks, then one starts: with --missed skip, the ticks older than the grace (2 s)
    # are not enqueued; the late ones are, and then every tick again.
    last_before = ticks[-1]

    async def six_ticks_later() -> bool:
        return bool(await app.db.fetchval(
            "SELECT clock_timestamp() > $1::timestamptz + interval '6.5 seconds'", last_before))

    await wait_until(six_ticks_later, timeout_s=30)
    restarted = start_worker(runner_env, log_path=tmp_path / "w-restarted.log", RUNNER_WORKER_ID="sched-again",
                             RUNNER_SCHEDULE_GRACE="2")
    try:
        async def three_more() -> bool:
            return bool(await app.db.fetchval(
                "SELECT count(*) >= 3 FROM runner_jobs WHERE schedule_name = 'every-second' AND schedule_tick > $1",
                last_before))

        await wait_until(three_more, timeout_s=120)
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert await wait_exit(restarted, 60) == 0
    after = [r["schedule_tick"] for r in await app.db.fetch(
        "SELECT schedule_tick FROM runner_jobs WHERE schedule_name = 'every-second' AND schedule_tick > $1 "
        "ORDER BY schedule_tick", last_before)]
    assert after[0] - last_before >= timedelta(seconds=4)  # the missed ticks of the gap were skipped
    assert {b - a for a, b in pairwise(after)} == {timedelta(seconds=1)}
    assert "schedule ticks missed while no worker ran" in (tmp_path / "w-restarted.log").read_text()
