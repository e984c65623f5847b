"""Shared pieces of bench/queue.py and bench/scale.py: the server, fresh databases, measured processes,
pg_stat_activity sampling, and the competitor venv.

Runs in the runner venv. Nothing here is part of runner or its tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from runner.embedded import EmbeddedPostgres

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
WORKERS = BENCH / "workers"
COMPETITOR_VENV = BENCH / ".venv-competitors"
COMPETITOR_PY = COMPETITOR_VENV / "bin" / "python"
RUNNER_PY = Path(sys.executable)
RUNNER_CLI = RUNNER_PY.parent / "runner"
DEFAULT_HOME = Path(os.environ.get("RUNNER_BENCH_HOME", "/tmp/runner-bench"))
SCRATCH = DEFAULT_HOME / "scratch"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the competitor venv ----------------------------------------------------------------------------
def ensure_competitor_venv() -> None:
    """Create bench/.venv-competitors from bench/requirements.txt when it is missing or incomplete."""
    check = [str(COMPETITOR_PY), "-c", "import pgqueuer, procrastinate, psycopg_pool, matplotlib, uvloop"]
    if COMPETITOR_PY.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return
    log(f"creating {COMPETITOR_VENV} (pgqueuer, procrastinate, matplotlib, py-spy)")
    subprocess.run([sys.executable, "-m", "venv", str(COMPETITOR_VENV)], check=True)
    subprocess.run([str(COMPETITOR_PY), "-m", "pip", "install", "-q", "-r", str(BENCH / "requirements.txt")],
                   check=True)
    subprocess.run(check, check=True)


# --- the server -------------------------------------------------------------------------------------
def with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@dataclass
class Server:
    admin_url: str
    embedded: EmbeddedPostgres | None
    started_here: bool = False

    def url(self, database: str) -> str:
        return with_database(self.admin_url, database)

    @contextlib.asynccontextmanager
    async def admin(self) -> AsyncIterator[asyncpg.Connection]:
        connection = await asyncpg.connect(self.admin_url)
        try:
            yield connection
        finally:
            await connection.close()

    async def execute(self, statement: str) -> None:
        async with self.admin() as connection:
            await connection.execute(statement)

    async def create(self, name: str, template: str | None = None) -> str:
        await self.drop(name)
        await self.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)

    async def drop(self, name: str) -> None:
        await self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def describe(self) -> dict[str, Any]:
        async with self.admin() as connection:
            version = await connection.fetchval("SHOW server_version")
            settings = {
                name: await connection.fetchval(f"SHOW {name}")
                for name in ("max_connections", "shared_buffers", "synchronous_commit", "fsync")
            }
        return {"server_version": version, "embedded": self.embedded is not None, **settings}

    def stop_if_started_here(self) -> None:
        if self.embedded is not None and self.started_here:
            self.embedded.stop()


def start_server() -> Server:
    """RUNNER_BENCH_DATABASE_URL (any database on the server; an admin role), or runner's embedded PG."""
    url = os.environ.get("RUNNER_BENCH_DATABASE_URL")
    if url:
        return Server(with_database(url, urlsplit(url).path.lstrip("/") or "postgres"), None)
    embedded = EmbeddedPostgres(DEFAULT_HOME)
    was_running = embedded.is_running() if (embedded.data_dir / "PG_VERSION").exists() else False
    embedded.ensure_started()
    return Server(embedded.url("postgres"), embedded, started_here=not was_running)


def fresh_name(prefix: str) -> str:
    return f"bench_{prefix}_{uuid.uuid4().hex[:8]}"


# --- measured processes -----------------------------------------------------------------------------
@dataclass
class ProcResult:
    argv: list[str]
    returncode: int
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_mib: float
    output: str

    def check(self) -> ProcResult:
        if self.returncode != 0:
            tail = "\n".join(self.output.strip().splitlines()[-15:])
            raise RuntimeError(f"{' '.join(self.argv[:4])} ... exited {self.returncode}:\n{tail}")
        return self

    def last_json(self) -> dict[str, Any]:
        for line in reversed(self.output.strip().splitlines()):
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    return json.loads(line)  # type: ignore[no-any-return]
        return {}


def log_event_times(output: str, *events: str) -> dict[str, float]:
    """Epoch seconds of the first JSON log line of each named event (runner logs JSON lines off a TTY)."""
    from datetime import datetime

    found: dict[str, float] = {}
    for line in output.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        event = record.get("event")
        if event in events and event not in found and "timestamp" in record:
            found[event] = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
    return found


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all cores), from /proc/stat."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


async def background_busy_cores(seconds: float = 0.5) -> float:
    """Cores busy while this harness runs nothing: other users of the machine, which skew any figure."""
    before = cpu_busy_s()
    await asyncio.sleep(seconds)
    return (cpu_busy_s() - before) / seconds


async def wait_for_quiet(threshold_cores: float, timeout_s: float) -> float:
    """Wait (up to timeout_s) until other processes keep fewer than threshold_cores busy; return the last
    background load seen. A shared machine is the biggest source of noise in these figures."""
    deadline = time.monotonic() + timeout_s
    busy = await background_busy_cores()
    while busy >= threshold_cores and time.monotonic() < deadline:
        await asyncio.sleep(1.5)
        busy = await background_busy_cores()
    return busy


def _proc_cpu_s(pid: int, children_too: bool = False) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    # after the ")" : state=0 ... utime=11 stime=12 cutime=13 cstime=14 (proc(5) numbering minus 3)
    ticks = int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if children_too else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def server_cpu_s(server: Server) -> float | None:
    """CPU seconds the embedded PostgreSQL has used so far: the postmaster, its live children, and (through
    the postmaster's cutime/cstime) every backend that has exited. None for an external server."""
    if server.embedded is None:
        return None
    try:
        postmaster = int((server.embedded.data_dir / "postmaster.pid").read_text().split()[0])
        total = _proc_cpu_s(postmaster, children_too=True)
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    with open(f"/proc/{entry}/stat") as handle:
                        ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
                    if ppid == postmaster:
                        total += _proc_cpu_s(int(entry))
        return total
    except (OSError, ValueError, IndexError):
        return None


class Proc:
    """A subprocess timed from just before fork to the moment it is reaped (whole process), with its
    exact peak RSS and CPU time from wait4's rusage."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], log_path: Path) -> None:
        self.argv = [str(a) for a in argv]
        self.env = env
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.started_wall = 0.0
        self._waiter: asyncio.Future[ProcResult] | None = None

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.log_path, "wb")  # the child keeps its own copy of the descriptor
        self.started = time.perf_counter()
        self.started_wall = time.time()
        self.popen = subprocess.Popen(self.argv, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                      cwd=ROOT, start_new_session=True)
        handle.close()
        # A thread of its own per child (not the default executor, which a few long waits would fill).
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[ProcResult] = loop.create_future()
        self._waiter = waiter

        def reap() -> None:
            try:
                result = self._reap()
            except BaseException as error:  # pragma: no cover - wait4 on our own child does not fail
                loop.call_soon_threadsafe(waiter.set_exception, error)
            else:
                loop.call_soon_threadsafe(waiter.set_result, result)

        threading.Thread(target=reap, name=f"reap-{self.popen.pid}", daemon=True).start()
        return self

    def _reap(self) -> ProcResult:
        assert self.popen is not None
        _, status, usage = os.wait4(self.popen.pid, 0)
        ended = time.perf_counter()
        code = os.waitstatus_to_exitcode(status)
        self.popen.returncode = code
        return ProcResult(self.argv, code, ended - self.started, usage.ru_utime, usage.ru_stime,
                          usage.ru_maxrss / 1024, self.log_path.read_text(errors="replace"))

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def running(self) -> bool:
        return self._waiter is not None and not self._waiter.done()

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    async def wait(self, timeout_s: float) -> ProcResult:
        assert self._waiter is not None
        try:
            return await asyncio.wait_for(asyncio.shield(self._waiter), timeout_s)
        except TimeoutError:
            self.signal(signal.SIGKILL)
            result = await self._waiter
            raise RuntimeError(f"{' '.join(self.argv[:4])} ... did not finish within {timeout_s:g}s "
                               f"(log: {self.log_path})\n{result.output[-2000:]}") from None


async def run(argv: Sequence[str], env: dict[str, str], log_path: Path, timeout_s: float = 600) -> ProcResult:
    return (await Proc(argv, env, log_path).start().wait(timeout_s)).check()


def base_env(**extra: str) -> dict[str, str]:
    """The parent's environment without RUNNER_* (a stray setting must not skew or break a run).

    Bytecode is cached (outside the checkout) even when the parent set PYTHONDONTWRITEBYTECODE: an
    installed package has its .pyc files, and compiling runner's modules from source on every start
    (an editable checkout without them) added ~0.15 s to each process measured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.setdefault("PYTHONPYCACHEPREFIX", str(DEFAULT_HOME / "pycache"))
    env.update(extra)
    return env


def runner_env(url: str, **extra: str) -> dict[str, str]:
    """A measured runner process's environment: its database, a scratch home, no HTTP port, no consensus."""
    return base_env(RUNNER_DATABASE_URL=url, RUNNER_HOME=str(SCRATCH / "runner-home"), RUNNER_HTTP_PORT="0",
                    RUNNER_CONSENSUS_ENABLED="false", **extra)


# --- pg_stat_activity -------------------------------------------------------------------------------
SAMPLER_APP = "bench-sampler"


@dataclass
class ConnectionSampler:
    """Every interval: client connections to one database (overall and by application_name prefix) and,
    with ``running_sql``, how many jobs are running. Its own connections are not counted."""

    server: Server
    database: str
    app_prefix: str | None = None
    running_sql: str | None = None
    database_url: str | None = None
    interval_s: float = 0.05
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)  # (t, total, by app, running)
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ConnectionSampler:
        self._admin = await asyncpg.connect(self.server.admin_url, server_settings={"application_name": SAMPLER_APP})
        self._target: asyncpg.Connection | None = None
        if self.running_sql and self.database_url:
            self._target = await asyncpg.connect(self.database_url, server_settings={"application_name": SAMPLER_APP})
        self._t0 = time.monotonic()
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._admin.close()
        if self._target is not None:
            await self._target.close()

    async def _sample(self) -> tuple[int, int, int]:
        row = await self._admin.fetchrow(
            """SELECT count(*) AS total,
                      count(*) FILTER (WHERE $2::text IS NOT NULL AND application_name LIKE $2 || '%') AS app
               FROM pg_stat_activity
               WHERE datname = $1 AND backend_type = 'client backend' AND application_name <> $3""",
            self.database, self.app_prefix, SAMPLER_APP)
        assert row is not None
        running = 0
        if self._target is not None and self.running_sql:
            with contextlib.suppress(asyncpg.UndefinedTableError):
                running = int(await self._target.fetchval(self.running_sql))
        return int(row["total"]), int(row["app"]), running

    async def _loop(self) -> None:
        while True:
            total, app, running = await self._sample()
            self.samples.append((time.monotonic() - self._t0, total, app, running))
            await asyncio.sleep(self.interval_s)

    def peak(self, by_app: bool = False) -> int:
        return max((s[2] if by_app else s[1] for s in self.samples), default=0)

    def peak_running(self) -> int:
        return max((s[3] for s in self.samples), default=0)

    def values_while_running(self) -> list[int]:
        """Connection counts sampled while jobs were running (the load window)."""
        return [s[1] for s in self.samples if s[3] > 0]


async def wait_for_connection(server: Server, database: str, timeout_s: float = 60, minimum: int = 1) -> None:
    deadline = time.monotonic() + timeout_s
    async with server.admin() as connection:
        while time.monotonic() < deadline:
            n = await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'",
                database)
            if n >= minimum:
                return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"no worker connected to {database} within {timeout_s:g}s")


async def fetchval(url: str, query: str, *args: Any) -> Any:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchval(query, *args)
    finally:
        await connection.close()


# --- statistics and the machine ---------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def machine() -> dict[str, Any]:
    with open("/proc/meminfo") as handle:
        mem_kib = int(handle.readline().split()[1])
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "ram_gib": round(mem_kib / 1024 / 1024, 1), "cpu": cpu,
            "python": platform.python_version(), "kernel": platform.release()}


def package_versions() -> dict[str, str]:
    from importlib.metadata import version

    script = ("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
              "('pgqueuer', 'procrastinate', 'psycopg', 'asyncpg', 'uvloop', 'psycopg-pool')}))")
    out = subprocess.run([str(COMPETITOR_PY), "-c", script], capture_output=True, text=True, check=True).stdout
    versions = {f"competitors:{k}": v for k, v in json.loads(out).items()}
    versions.update({"runner": version("runner-pg"), "runner:asyncpg": version("asyncpg")})
    return versions


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "runner", "jobs", "config"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return result.stdout.strip() + ("+dirty" if dirty else "")


def write_report(out_dir: Path | str, stem: str, text: str, data: Any, *, raw_only: bool = False) -> None:
    """A bench's report: ``<stem>.md`` in ``out_dir``, and its figures as JSON beside it, or, with
    ``raw_only``, under SCRATCH/work (every round's figures, not kept in the repository)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text if text.endswith("\n") else text + "\n")
    raw = SCRATCH / "work" / f"{stem}.json" if raw_only else out / f"{stem}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(data, indent=2, default=str) + "\n")
