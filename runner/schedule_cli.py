"""``runner schedule ...``: periodic jobs from the command line (the same calls as ``runner.App``)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from runner.cli import console, fail, json_default, parse_payload, settings_or_exit, with_app
from runner.errors import UsageError

if TYPE_CHECKING:
    from rich.table import Table

    from runner.app import App

schedule_cli = typer.Typer(no_args_is_help=True, help="Periodic jobs: cron or interval schedules, one job per tick.")


@schedule_cli.command("add")
def add_command(
    name: Annotated[str, typer.Argument(help="Schedule name (unique)")],
    kind: Annotated[str, typer.Argument(help="Job kind each tick enqueues")],
    cron: Annotated[str | None, typer.Option(help="Cron expression: 5 fields, or 6 with seconds last")] = None,
    every: Annotated[float | None, typer.Option(help="Or: one tick every SECONDS (at least 1)")] = None,
    payload: Annotated[str | None, typer.Option(help="JSON object each job gets")] = None,
    timezone: Annotated[str | None, typer.Option(help="IANA timezone of the cron expression [default: UTC]")] = None,
    missed: Annotated[str, typer.Option(help="Ticks missed while no worker ran: skip (one job) or run-all")] = "skip",
    missed_limit: Annotated[int, typer.Option(help="run-all: at most this many missed ticks")] = 10,
    queue: Annotated[str | None, typer.Option(help="Queue (default: the kind's queue, else 'default')")] = None,
    priority: Annotated[int, typer.Option(help="Higher runs first")] = 0,
) -> None:
    """Store a schedule. Nothing is stored if anything is wrong with it (exit 2)."""
    settings = settings_or_exit()
    try:
        body = parse_payload(payload or "{}", "--payload", settings.max_payload_bytes)
        from runner.schedules import make_spec

        make_spec(name, kind, cron=cron, every=every, timezone=timezone, payload=body, queue=queue,
                  priority=priority, missed=missed, missed_limit=missed_limit)  # before opening the pool
    except UsageError as error:
        raise fail(str(error), 2) from None

    async def add(app: App) -> dict[str, Any]:
        return await app.add_schedule(name, kind, cron=cron, every=every, timezone=timezone, payload=body,
                                      queue=queue, priority=priority, missed=missed, missed_limit=missed_limit)

    stored = with_app(settings, add)
    print(f"{stored['name']}: {stored['rule']}, next tick {_when(stored['next_tick'])}")


@schedule_cli.command("list")
def list_command(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable")] = False) -> None:
    """Every schedule with its rule, state, and last and next tick."""
    settings = settings_or_exit()
    schedules = with_app(settings, lambda app: app.list_schedules())
    if as_json:
        print(json.dumps(schedules, default=json_default))
        return
    console().print(schedules_table(schedules))


def schedules_table(schedules: list[dict[str, Any]]) -> Table:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="schedules")
    for column in ("name", "kind", "rule", "state", "missed", "last tick", "next tick", "last job", "from"):
        table.add_column(column)
    for s in schedules:
        table.add_row(escape(s["name"]), escape(s["kind"]), escape(s["rule"]), "paused" if s["paused"] else "active",
                      s["missed"] if s["missed"] == "skip" else f"run-all ({s['missed_limit']})",
                      _when(s["last_tick"]), "-" if s["paused"] else _when(s["next_tick"]),
                      str(s["last_job_id"] or "-"), s["source"])
    return table


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.isoformat(timespec="seconds")


def _named(action: str, name: str) -> None:
    settings = settings_or_exit()

    async def act(app: App) -> None:
        if action == "pause":
            await app.pause_schedule(name)
        elif action == "resume":
            await app.pause_schedule(name, paused=False)
        else:
            await app.remove_schedule(name)

    with_app(settings, act)
    print(f"{name}: {action}d" if action != "resume" else f"{name}: resumed")


@schedule_cli.command("pause")
def pause_command(name: str) -> None:
    """Stop a schedule's ticks (kept; a worker start does not resume it)."""
    _named("pause", name)


@schedule_cli.command("resume")
def resume_command(name: str) -> None:
    """Start a paused schedule again, from its next tick after now (the paused ones are not owed)."""
    _named("resume", name)


@schedule_cli.command("remove")
def remove_command(name: str) -> None:
    """Delete a schedule (its jobs stay). A schedule declared in code comes back at the next worker start."""
    _named("remove", name)


@schedule_cli.command("run")
def run_command(name: str) -> None:
    """Enqueue the schedule's job now, outside its ticks (prints the job id)."""
    settings = settings_or_exit()
    print(with_app(settings, lambda app: app.run_schedule(name)))


def register(cli: typer.Typer) -> None:
    cli.add_typer(schedule_cli, name="schedule")
