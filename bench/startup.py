"""CLI start-up: ``python bench/startup.py`` (about a minute).

Runs, in one run and interleaved (round after round, each command once per round), the installed
``runner`` console script as users do:

- ``runner --help``: no settings, no database; only the CLI and the plugins' command registrations;
- ``runner db url``: settings (pydantic-settings) and logging, no connection;
- ``runner status``: a database command against a running PostgreSQL, measured twice: to the moment it
  opens its pool (its ``opening pool`` debug log line, JSON, against the time of the fork) and whole
  (fork to reap: imports, pool, two queries, the table, exit).

Each figure is the median of ``--runs`` runs (after one warm-up run of each, so no run pays for compiling
bytecode); min and max are shown beside it. It also lists the heaviest top-level imports of ``--help`` and
``status`` (``python -X importtime``), which is where start-up time goes. Prints a table and writes
bench/results/startup.md (and startup.json).

The server is RUNNER_BENCH_DATABASE_URL (an admin role), else runner's embedded PostgreSQL under
RUNNER_BENCH_HOME (default /tmp/runner-bench), started for the run if it was not running; a fresh database
is created, migrated with ``runner migrate`` and dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (
    RESULTS,
    RUNNER_CLI,
    RUNNER_PY,
    SCRATCH,
    Proc,
    ProcResult,
    base_env,
    fresh_name,
    git_commit,
    log,
    log_event_times,
    machine,
    median,
    run,
    start_server,
    wait_for_quiet,
    write_report,
)

HELP_TARGET_S = 0.3
DB_START_TARGET_S = 0.5
POOL_EVENT = "opening pool"
COMMANDS: dict[str, list[str]] = {
    "runner --help": ["--help"],
    "runner db url": ["db", "url"],
    "runner status": ["status"],
}


def env_for(url: str) -> dict[str, str]:
    # Debug JSON logs: the status command's "opening pool" line carries the moment it opens its pool.
    return base_env(RUNNER_DATABASE_URL=url, RUNNER_HOME=str(SCRATCH / "startup-home"), RUNNER_LOG_FORMAT="json",
                    RUNNER_LOG_LEVEL="debug", RUNNER_HTTP_ENABLED="false", COLUMNS="120")


async def measure(name: str, argv: list[str], env: dict[str, str], round_: int) -> tuple[ProcResult, float | None]:
    proc = Proc([str(RUNNER_CLI), *argv], env, SCRATCH / "logs" / "startup" / f"{name.replace(' ', '_')}-{round_}.log")
    result = (await proc.start().wait(60)).check()
    opened = log_event_times(result.output, POOL_EVENT).get(POOL_EVENT)
    return result, (opened - proc.started_wall if opened is not None else None)


IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def heaviest_imports(argv: list[str], env: dict[str, str], top: int = 8) -> list[tuple[str, float]]:
    """Top-level imports (of the process, not nested ones) by cumulative milliseconds."""
    out = subprocess.run([str(RUNNER_PY), "-X", "importtime", str(RUNNER_CLI), *argv], env=env,
                         capture_output=True, text=True, timeout=60).stderr
    found: list[tuple[str, float]] = []
    for line in out.splitlines():
        match = IMPORT_LINE.match(line)
        if match and len(match[3]) == 1:  # "| name": imported by the program itself
            found.append((match[4], int(match[2]) / 1e6))  # microseconds
    return sorted(found, key=lambda item: -item[1])[:top]


def stats(values: list[float]) -> dict[str, float]:
    return {"median": median(values), "min": min(values), "max": max(values), "n": len(values)}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    server = start_server()
    name = fresh_name("startup")
    try:
        url = await server.create(name)
        env = env_for(url)
        await run([RUNNER_CLI, "migrate"], env, SCRATCH / "logs" / "startup" / "migrate.log")
        import asyncpg

        connection = await asyncpg.connect(url)
        try:  # a few jobs, so status has rows to count and a table to draw
            await connection.execute(
                "INSERT INTO runner_jobs (kind, queue, payload, run_at) SELECT 'noop', 'q' || (g % 3), '{}', "
                "now() + (g % 2) * interval '1 hour' FROM generate_series(1, 100) g")
        finally:
            await connection.close()
        background = await wait_for_quiet(args.quiet_cores, args.quiet_wait)
        log(f"background load {background:.2f} cores; {args.runs} rounds of {len(COMMANDS)} commands")
        for command, argv in COMMANDS.items():  # warm-up: bytecode compiled, files in the page cache
            await measure(command, argv, env, -1)
        wall: dict[str, list[float]] = {c: [] for c in COMMANDS}
        cpu: dict[str, list[float]] = {c: [] for c in COMMANDS}
        pool_open: list[float] = []
        for round_ in range(args.runs):
            for command, argv in COMMANDS.items():
                result, opened = await measure(command, argv, env, round_)
                wall[command].append(result.wall_s)
                cpu[command].append(result.user_s + result.sys_s)
                if command == "runner status" and opened is not None:
                    pool_open.append(opened)
        imports = {"runner --help": heaviest_imports(["--help"], env),
                   "runner status": heaviest_imports(["status"], env)}
    finally:
        try:
            await server.drop(name)
        finally:
            server.stop_if_started_here()
    rows = [{"command": c, "wall": stats(wall[c]), "cpu": stats(cpu[c])} for c in COMMANDS]
    help_median = median(wall["runner --help"])
    pool_median = median(pool_open) if pool_open else None
    return {
        "started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "command": "python bench/startup.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        "runs": args.runs,
        "machine": machine(),
        "server": server_kind(server),
        "runner_commit": git_commit(),
        "background_busy_cores": background,
        "rows": rows,
        "status_pool_open": stats(pool_open) if pool_open else None,
        "targets": [
            {"target": f"runner --help <= {HELP_TARGET_S:g} s", "measured": help_median,
             "met": help_median <= HELP_TARGET_S},
            {"target": f"runner status: pool opened <= {DB_START_TARGET_S:g} s after the fork",
             "measured": pool_median, "met": pool_median is not None and pool_median <= DB_START_TARGET_S},
        ],
        "imports": imports,
    }


def server_kind(server: Any) -> str:
    return "embedded" if server.embedded is not None else "RUNNER_BENCH_DATABASE_URL"


def ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f}"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# CLI start-up ({report['started_at']}, commit {report['runner_commit']})",
        "",
        f"Median of {report['runs']} runs each, interleaved, after one warm-up run; wall time from fork to reap "
        f"of the `runner` console script. {m['nproc']} cores ({m['cpu']}), Python {m['python']}; PostgreSQL: "
        f"{report['server']}, same host; background load before the runs {report['background_busy_cores']:.2f} cores.",
        "",
        "| command | wall ms (median) | min | max | CPU ms (median) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in report["rows"]:
        lines.append(f"| `{row['command']}` | {ms(row['wall']['median'])} | {ms(row['wall']['min'])} | "
                     f"{ms(row['wall']['max'])} | {ms(row['cpu']['median'])} |")
    pool = report["status_pool_open"]
    if pool is not None:
        lines.append(f"| `runner status` until it opens its pool | {ms(pool['median'])} | {ms(pool['min'])} | "
                     f"{ms(pool['max'])} | |")
    lines += ["", "| target | measured | met |", "| --- | ---: | --- |"]
    for target in report["targets"]:
        lines.append(f"| {target['target']} | {ms(target['measured'])} ms | {'yes' if target['met'] else 'no'} |")
    for command, imports in report["imports"].items():
        lines += ["", f"Heaviest top-level imports of `{command}` (cumulative ms, `python -X importtime`): "
                  + ", ".join(f"{name} {seconds * 1000:.0f}" for name, seconds in imports)]
    lines += ["", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="runs of each command (the median is reported)")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--quiet-cores", type=float, default=0.5,
                        help="first wait until other processes use fewer cores than this")
    parser.add_argument("--quiet-wait", type=float, default=60.0, help="...but at most this many seconds")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    report = asyncio.run(main_async(args))
    write_report(args.out_dir, "startup", markdown(report), report)
    print(markdown(report))


if __name__ == "__main__":
    main()
