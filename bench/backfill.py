"""Backfill benchmark (not a test): runner's backfill against raw COPY pipes and an old-style loop.

    python bench/backfill.py [--rows 1000000] [--batch-size 50000] [--parallel 2,4] [--workers 2]
                             [--json bench/results/backfill.json]

One run, one server (RUNNER_BENCH_DATABASE_URL, or an embedded PostgreSQL under RUNNER_BENCH_HOME,
default /tmp/runner-bench). A source database gets a table of --rows rows (bigint key, int, text,
timestamptz, numeric, jsonb; some NULLs), then each method copies it into a fresh destination table with
the same primary key, and every copy is checked exact (row count and md5 over the ordered rows):

- raw pipe: ``COPY (SELECT ...) TO STDOUT (FORMAT binary)`` piped into ``COPY ... FROM STDIN`` (asyncpg,
  two connections and a queue; and psql | psql): the practical ceiling;
- runner backfill across databases (``--source bsrc --dest bdst``) and within one database, run by an
  in-process worker; the time is the job's own (started_at to finished_at, counting included);
- for comparison within one database: keyset batches of ``INSERT ... SELECT ... ON CONFLICT``;
- old style: OFFSET pages of 10,000 rows and ``executemany`` INSERTs, as the seed incident did: with
  psycopg2 in a thread, as it ran (psycopg2's executemany sends one INSERT per row; needs
  ``pip install psycopg2-binary``, left out otherwise), and on asyncpg, whose executemany pipelines a page.

- parallel: ``--parallel N`` backfills (N key-range chunks) run by --workers worker processes (started
  before the job, RUNNER_BACKFILL_CHUNKS_PER_WORKER = N / workers), beside N raw pipes run at once (each
  ``psql | psql`` of one key range, and N asyncpg pipes in one process): the machine's limit for N streams;
- ``backfill verify`` of the copy (in-process), in rows per second of the source.

Targets: single stream >= 85% of one raw pipe; --parallel N >= 80% of N raw pipes at once; verify
>= 500k rows/s; >= 10x the old-style loop.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

# bench/ holds a queue.py: drop the folder from sys.path so `import queue` finds the standard library.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import asyncpg  # noqa: E402

from bench._common import Server, base_env, fresh_name, log, machine, start_server, wait_for_quiet  # noqa: E402
from runner.jobs.backfill.spec import DEFAULT_BATCH_SIZE  # noqa: E402

SOURCE_TABLE = "src"
OLD_STYLE_PAGE = 10_000
COLUMNS = "id, qty, name, created_at, amount, doc, note"
CREATE_TABLE = """
CREATE TABLE {name} (
    id bigint PRIMARY KEY, qty integer, name text NOT NULL, created_at timestamptz NOT NULL,
    amount numeric(14, 2), doc jsonb, note text
)"""
SEED = f"""
INSERT INTO {SOURCE_TABLE}
SELECT g, CASE WHEN g % 11 = 0 THEN NULL ELSE (g * 7) % 1000 END, 'customer-' || g,
       timestamptz '2024-01-01 00:00:00+00' + g * interval '17 seconds',
       CASE WHEN g % 10 = 0 THEN NULL ELSE round(((g % 100000) * 1.37)::numeric, 2) END,
       CASE WHEN g % 7 = 0 THEN NULL
            ELSE jsonb_build_object('id', g, 'tags', jsonb_build_array('a', g % 13), 'ok', g % 2 = 0) END,
       CASE WHEN g % 3 = 0 THEN NULL ELSE md5(g::text) END
FROM generate_series(1, $1::bigint) AS g
"""
# md5 over the ordered rows, per million keys (one string_agg of 10 M rows would pass PostgreSQL's 1 GB limit)
DIGEST = ("SELECT sum(n)::bigint, md5(string_agg(h, '' ORDER BY b)) FROM (SELECT t.id / 1000000 AS b, count(*) AS n, "
          "md5(string_agg(t::text, E'\\n' ORDER BY t.id)) AS h FROM {name} t GROUP BY 1) x")


@dataclass
class Result:
    method: str
    rows: int
    seconds: float
    exact: bool
    background_cores: float  # busy cores of other processes just before the run

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


@dataclass
class Bench:
    server: Server
    source_db: str
    dest_db: str
    runner_db: str
    rows: int
    batch_size: int
    quiet_cores: float
    quiet_wait_s: float
    digest: tuple[int, str] | None = None

    def url(self, database: str) -> str:
        return self.server.url(database)


# --- set-up -----------------------------------------------------------------------------------------
async def connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url, server_settings={"application_name": "bench-backfill"})


async def seed(bench: Bench) -> None:
    connection = await connect(bench.url(bench.source_db))
    try:
        await connection.execute(CREATE_TABLE.format(name=SOURCE_TABLE))
        started = time.perf_counter()
        await connection.execute(SEED, bench.rows)
        await connection.execute(f"VACUUM ANALYZE {SOURCE_TABLE}")
        log(f"seeded {bench.rows:,} rows in {time.perf_counter() - started:.1f}s")
        bench.digest = tuple(await connection.fetchrow(DIGEST.format(name=SOURCE_TABLE)))  # type: ignore[assignment]
    finally:
        await connection.close()


async def fresh_table(url: str, name: str, create: bool = True) -> None:
    connection = await connect(url)
    try:
        await connection.execute(f"DROP TABLE IF EXISTS {name}")
        if create:
            await connection.execute(CREATE_TABLE.format(name=name))
    finally:
        await connection.close()


async def is_exact(bench: Bench, url: str, name: str) -> bool:
    connection = await connect(url)
    try:
        await connection.execute(f"VACUUM ANALYZE {name}")
        return tuple(await connection.fetchrow(DIGEST.format(name=name))) == bench.digest
    finally:
        await connection.close()


# --- the methods ------------------------------------------------------------------------------------
async def raw_asyncpg(bench: Bench) -> float:
    """COPY TO STDOUT on one connection streamed, chunk by chunk, into COPY FROM STDIN on another."""
    started = time.perf_counter()
    await asyncpg_pipe(bench, "true")
    return time.perf_counter() - started


async def asyncpg_pipe(bench: Bench, where: str) -> None:
    """The rows matching ``where`` through one asyncpg pipe: COPY out streamed into COPY in."""
    source, dest = await connect(bench.url(bench.source_db)), await connect(bench.url(bench.dest_db))
    chunks: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=64)

    async def sink(data: bytes) -> None:
        await chunks.put(data)

    async def stream() -> AsyncIterator[bytes]:
        while (chunk := await chunks.get()) is not None:
            yield chunk

    async def copy_out() -> None:
        await source.copy_from_query(f"SELECT {COLUMNS} FROM {SOURCE_TABLE} WHERE {where}", output=sink,
                                     format="binary")
        await chunks.put(None)

    try:
        await asyncio.gather(copy_out(), dest.copy_to_table("dst", source=stream(), format="binary"))
    finally:
        await source.close()
        await dest.close()


def key_ranges(rows: int, n: int) -> list[tuple[int, int]]:
    """n ranges ``lo < id <= hi`` of equal row counts (the bench's ids are 1..rows)."""
    bounds = [rows * i // n for i in range(n + 1)]
    return list(itertools.pairwise(bounds))


async def raw_asyncpg_many(bench: Bench, n: int) -> float:
    """n asyncpg pipes at once in this process, one key range each."""
    started = time.perf_counter()
    await asyncio.gather(*(asyncpg_pipe(bench, f"id > {lo} AND id <= {hi}") for lo, hi in key_ranges(bench.rows, n)))
    return time.perf_counter() - started


async def raw_psql_many(bench: Bench, n: int) -> float:
    """n ``psql | psql`` pipes at once, one key range each: no Python in the way."""
    psql = psql_path()
    assert psql is not None

    def pipe(lo: int, hi: int) -> subprocess.Popen[bytes]:
        out = [str(psql), "-X", "-q", "-d", bench.url(bench.source_db), "-c",
               f"COPY (SELECT {COLUMNS} FROM {SOURCE_TABLE} WHERE id > {lo} AND id <= {hi}) TO STDOUT "
               "(FORMAT binary)"]
        into = [str(psql), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", bench.url(bench.dest_db), "-c",
                "COPY dst FROM STDIN (FORMAT binary)"]
        producer = subprocess.Popen(out, stdout=subprocess.PIPE)
        consumer = subprocess.Popen(into, stdin=producer.stdout, stdout=subprocess.DEVNULL)
        assert producer.stdout is not None
        producer.stdout.close()
        consumer.producer = producer  # type: ignore[attr-defined]
        return consumer

    def run() -> float:
        started = time.perf_counter()
        consumers = [pipe(lo, hi) for lo, hi in key_ranges(bench.rows, n)]
        failed = [c for c in consumers if c.wait() != 0 or c.producer.wait() != 0]  # type: ignore[attr-defined]
        if failed:
            raise RuntimeError("psql | psql failed")
        return time.perf_counter() - started

    return await asyncio.to_thread(run)


async def runner_parallel(bench: Bench, n: int, workers: int) -> float:
    """A --parallel n backfill across databases, run by ``workers`` worker processes started beforehand;
    the parent job's own duration (counting and splitting included)."""
    from runner.app import App
    from runner.config import load_settings

    env = base_env(**{k: v for k, v in os.environ.items() if k.startswith("RUNNER_")},
                   RUNNER_BACKFILL_CHUNKS_PER_WORKER=str(max(1, -(-n // workers))))
    processes = [subprocess.Popen([sys.executable, "-m", "runner", "worker"], env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(workers)]
    app = await App.open(load_settings())
    try:
        while len(await app.db.fetch("SELECT id FROM runner_workers")) < workers:  # every worker is up
            await asyncio.sleep(0.1)
        payload = {"source": "bsrc", "source_table": f"public.{SOURCE_TABLE}", "dest": "bdst",
                   "dest_table": "public.dst", "batch_size": bench.batch_size, "parallel": n, "create_table": True}
        job_id = await app.enqueue("backfill", payload, max_attempts=1)
        job = await app.wait(job_id, poll=0.05)
    finally:
        await app.close()
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=60)
    if job.status != "succeeded":
        raise RuntimeError(f"parallel backfill job {job_id} {job.status}: {job.last_error}")
    assert job.started_at is not None and job.finished_at is not None
    return (job.finished_at - job.started_at).total_seconds()


async def verify_copy(bench: Bench) -> float:
    """``runner backfill verify`` of the copy in bdst against the source, in-process; its seconds."""
    from runner.app import App
    from runner.config import load_settings
    from runner.jobs.backfill.plan import build_plan
    from runner.jobs.backfill.pools import close_named_pools, named_pools
    from runner.jobs.backfill.spec import parse_spec
    from runner.jobs.backfill.verify import Verifier

    spec = parse_spec({"source": "bsrc", "source_table": f"public.{SOURCE_TABLE}", "dest": "bdst",
                       "dest_table": "public.dst", "allow_narrowing": True})
    app = await App.open(load_settings())
    try:
        pools = named_pools(app)
        async with pools.use("bsrc") as source_db, pools.use("bdst") as dest_db:
            plan = await build_plan(spec, source_db, dest_db)
            started = time.perf_counter()
            report = await Verifier(plan, source_db, dest_db).run()
            seconds = time.perf_counter() - started
        await close_named_pools(app)
    finally:
        await app.close()
    if not report.equal:
        raise RuntimeError(f"verify found {len(report.differing)} differing ranges in an exact copy")
    return seconds


def psql_path() -> Path | None:
    from runner.embedded import _wheel_install_dir

    try:
        path = _wheel_install_dir() / "bin" / "psql"
    except Exception:
        return None
    return path if path.exists() else None


async def raw_psql(bench: Bench) -> float:
    """psql -c 'COPY (SELECT ...) TO STDOUT' | psql -c 'COPY dst FROM STDIN', both binary."""
    psql = psql_path()
    assert psql is not None
    out = [str(psql), "-X", "-q", "-d", bench.url(bench.source_db), "-c",
           f"COPY (SELECT {COLUMNS} FROM {SOURCE_TABLE}) TO STDOUT (FORMAT binary)"]
    into = [str(psql), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", bench.url(bench.dest_db), "-c",
            "COPY dst FROM STDIN (FORMAT binary)"]

    def pipe() -> float:
        started = time.perf_counter()
        producer = subprocess.Popen(out, stdout=subprocess.PIPE)
        consumer = subprocess.Popen(into, stdin=producer.stdout, stdout=subprocess.DEVNULL)
        assert producer.stdout is not None
        producer.stdout.close()
        if consumer.wait() != 0 or producer.wait() != 0:
            raise RuntimeError("psql | psql failed")
        return time.perf_counter() - started

    return await asyncio.to_thread(pipe)


def old_style_psycopg2(bench: Bench) -> float:
    """The seed incident's loop as it ran: psycopg2 in a thread, OFFSET pages in key order, and
    ``cursor.executemany`` of each page (psycopg2 sends one INSERT per row), a commit per page."""
    import psycopg2
    import psycopg2.extras

    source, dest = psycopg2.connect(bench.url(bench.source_db)), psycopg2.connect(bench.url(bench.dest_db))
    psycopg2.extras.register_default_jsonb(source, loads=lambda text: text)  # pass jsonb through as text
    try:
        started = time.perf_counter()
        offset = 0
        with source.cursor() as read, dest.cursor() as write:
            while True:
                read.execute(f"SELECT {COLUMNS} FROM {SOURCE_TABLE} ORDER BY id LIMIT %s OFFSET %s",
                             (OLD_STYLE_PAGE, offset))
                rows = read.fetchall()
                if not rows:
                    break
                write.executemany(f"INSERT INTO dst ({COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)", rows)
                dest.commit()
                offset += len(rows)
        return time.perf_counter() - started
    finally:
        source.close()
        dest.close()


async def old_style_asyncpg(bench: Bench) -> float:
    """The same loop on asyncpg, whose ``executemany`` pipelines the page's INSERTs in one round trip."""
    source, dest = await connect(bench.url(bench.source_db)), await connect(bench.url(bench.dest_db))
    page = f"SELECT {COLUMNS} FROM {SOURCE_TABLE} ORDER BY id LIMIT $1 OFFSET $2"
    insert = f"INSERT INTO dst ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
    for connection in (source, dest):  # jsonb passes through as text
        await connection.set_type_codec("jsonb", encoder=str, decoder=str, schema="pg_catalog")
    try:
        started = time.perf_counter()
        offset = 0
        while rows := await source.fetch(page, OLD_STYLE_PAGE, offset):
            await dest.executemany(insert, rows)
            offset += len(rows)
        return time.perf_counter() - started
    finally:
        await source.close()
        await dest.close()


def have_psycopg2() -> bool:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return False
    return True


async def insert_select(bench: Bench) -> float:
    """Within one database, keyset batches of INSERT ... SELECT ... ON CONFLICT DO NOTHING (the road not
    taken: runner's COPY pipeline serves one database too)."""
    connection = await connect(bench.url(bench.source_db))
    batch = (f"WITH b AS MATERIALIZED (SELECT {COLUMNS} FROM {SOURCE_TABLE} WHERE id > $1 ORDER BY id LIMIT $2), "
             f"w AS (INSERT INTO dst ({COLUMNS}) SELECT {COLUMNS} FROM b ON CONFLICT (id) DO NOTHING) "
             "SELECT max(id) FROM b")
    try:
        started = time.perf_counter()
        last = 0
        while (upper := await connection.fetchval(batch, last, bench.batch_size)) is not None:
            last = upper
        return time.perf_counter() - started
    finally:
        await connection.close()


async def runner_backfill(bench: Bench, *, same_database: bool) -> float:
    """Enqueue one backfill job, run it with an in-process worker, return the job's own duration."""
    from runner.app import App
    from runner.config import load_settings
    from runner.worker import Worker

    payload = {"source": "bsrc", "source_table": f"public.{SOURCE_TABLE}",
               "dest": "bsrc" if same_database else "bdst", "dest_table": "public.dst",
               "batch_size": bench.batch_size, "create_table": True}
    app = await App.open(load_settings())
    try:
        job_id = await app.enqueue("backfill", payload, max_attempts=1)
        await Worker(app, drain=True, install_signal_handlers=False).run()
        job = await app.queue.job_get(job_id)
    finally:
        await app.close()
    if job["status"] != "succeeded":
        raise RuntimeError(f"backfill job {job_id} {job['status']}: {job['last_error']}")
    return (job["finished_at"] - job["started_at"]).total_seconds()


# --- the run ----------------------------------------------------------------------------------------
async def measure(bench: Bench, method: str, run: Callable[[], Awaitable[float]], dest_db: str,
                  create: bool | None = True) -> Result:
    """create: a fresh destination table (False: none, the method makes it; None: keep the last copy)."""
    if create is not None:
        await fresh_table(bench.url(dest_db), "dst", create=create)
    background = await wait_for_quiet(bench.quiet_cores, bench.quiet_wait_s)
    log(f"{method} ... (other processes keep {background:.2f} cores busy)")
    seconds = await run()
    exact = await is_exact(bench, bench.url(dest_db), "dst")
    result = Result(method, bench.rows, seconds, exact, round(background, 2))
    log(f"{method}: {result.rows_per_s:,.0f} rows/s ({seconds:.2f}s){'' if exact else ' NOT EXACT'}")
    return result


async def run_all(bench: Bench, skip_old: bool, parallel: list[int], workers: int) -> list[Result]:
    results = [await measure(bench, "raw pipe: asyncpg COPY out -> COPY in", lambda: raw_asyncpg(bench),
                             bench.dest_db)]
    if psql_path() is not None:
        results.append(await measure(bench, "raw pipe: psql | psql", lambda: raw_psql(bench), bench.dest_db))
    results.append(await measure(bench, "runner backfill, across databases",
                                 lambda: runner_backfill(bench, same_database=False), bench.dest_db, create=False))
    results.append(await measure(bench, "runner backfill verify (of the copy above)", lambda: verify_copy(bench),
                                 bench.dest_db, create=None))
    for n in parallel:
        results.append(await measure(bench, f"{n} raw pipes at once: asyncpg, one process",
                                     functools.partial(raw_asyncpg_many, bench, n), bench.dest_db))
        if psql_path() is not None:
            results.append(await measure(bench, f"{n} raw pipes at once: psql | psql",
                                         functools.partial(raw_psql_many, bench, n), bench.dest_db))
        results.append(await measure(bench, f"runner backfill --parallel {n}, {workers} workers",
                                     functools.partial(runner_parallel, bench, n, workers), bench.dest_db,
                                     create=False))
    results.append(await measure(bench, "runner backfill, within one database",
                                 lambda: runner_backfill(bench, same_database=True), bench.source_db, create=False))
    results.append(await measure(bench, "within one database: keyset INSERT ... SELECT ... ON CONFLICT",
                                 lambda: insert_select(bench), bench.source_db))
    if not skip_old:
        if have_psycopg2():
            results.append(await measure(bench, "old style (as the seed ran it): psycopg2, OFFSET pages, executemany",
                                         lambda: asyncio.to_thread(old_style_psycopg2, bench), bench.dest_db))
        else:
            log("psycopg2 is not installed (pip install psycopg2-binary): the seed's own loop is left out")
        results.append(await measure(bench, "old style on asyncpg: OFFSET pages, pipelined executemany",
                                     lambda: old_style_asyncpg(bench), bench.dest_db))
    return results


def report(results: list[Result], bench: Bench, info: dict[str, object]) -> str:
    by_method = {r.method: r for r in results}
    single_raw = max((r for r in results if r.method.startswith("raw pipe")), key=lambda r: r.rows_per_s)
    runner = by_method["runner backfill, across databases"]
    olds = [r for r in results if r.method.startswith("old")]
    lines = ["| method | rows | seconds | rows/s | vs best single raw pipe | exact | background cores |",
             "|---|---:|---:|---:|---:|:-:|---:|"]
    for r in results:
        lines.append(f"| {r.method} | {r.rows:,} | {r.seconds:.2f} | {r.rows_per_s:,.0f} | "
                     f"{r.rows_per_s / single_raw.rows_per_s:.0%} | {'yes' if r.exact else 'NO'} | "
                     f"{r.background_cores:.2f} |")
    lines.append("")
    lines.append(f"single stream: runner (across databases) / best raw pipe = "
                 f"{runner.rows_per_s / single_raw.rows_per_s:.0%} (target >= 85%)")
    for r in results:
        if r.method.startswith("runner backfill --parallel"):
            n = r.method.split()[3].rstrip(",")
            raws = [x for x in results if x.method.startswith(f"{n} raw pipes at once")]
            best = max(raws, key=lambda x: x.rows_per_s)
            lines.append(f"parallel {n}: runner / best of {n} raw pipes at once ({best.method.split(': ')[1]}) = "
                         f"{r.rows_per_s / best.rows_per_s:.0%} (target >= 80%); "
                         f"{r.rows_per_s / runner.rows_per_s:.2f}x runner's single stream")
    verify = by_method.get("runner backfill verify (of the copy above)")
    if verify is not None:
        lines.append(f"verify: {verify.rows_per_s:,.0f} rows/s (target >= 500,000)")
    for old in olds:
        lines.append(f"runner (across databases) / {old.method} = {runner.rows_per_s / old.rows_per_s:.1f}x "
                     "(target >= 10x)")
    lines.append(f"batch size {bench.batch_size:,}; {json.dumps(info)}")
    return "\n".join(lines)


def configure_runner_env(bench: Bench) -> None:
    for key in [k for k in os.environ if k.startswith("RUNNER_") and not k.startswith("RUNNER_BENCH_")]:
        del os.environ[key]
    os.environ.update({
        "RUNNER_DATABASE_URL": bench.url(bench.runner_db),
        "RUNNER_SOURCE_BSRC_URL": bench.url(bench.source_db),
        "RUNNER_SOURCE_BDST_URL": bench.url(bench.dest_db),
        "RUNNER_HTTP_ENABLED": "false",
        "RUNNER_CONSENSUS_ENABLED": "false",  # measure the backfill alone
        "RUNNER_LOG_LEVEL": "warning",
        "RUNNER_HOME": str(Path(os.environ.get("RUNNER_BENCH_HOME", "/tmp/runner-bench")) / "runner-home"),
    })


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="runner's default")
    parser.add_argument("--skip-old", action="store_true", help="leave out the (slow) old-style loop")
    parser.add_argument("--parallel", default="2,4", help="chunk counts to measure, comma-separated ('' for none)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for the parallel runs")
    parser.add_argument("--quiet-cores", type=float, default=0.5,
                        help="before each run, wait until other processes keep fewer cores than this busy...")
    parser.add_argument("--quiet-wait", type=float, default=60.0, help="...but at most this many seconds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from runner.logs import configure_logging
    from runner.migrate import migrate
    from runner.plugins import load_plugins

    configure_logging("console", "warning")

    server = start_server()
    names = [fresh_name("bfsrc"), fresh_name("bfdst"), fresh_name("bfrun")]
    for name in names:
        await server.create(name)
    bench = Bench(server, *names, rows=args.rows, batch_size=args.batch_size, quiet_cores=args.quiet_cores,
                  quiet_wait_s=args.quiet_wait)
    try:
        await migrate(bench.url(bench.runner_db), load_plugins())
        configure_runner_env(bench)
        await seed(bench)
        parallel = [int(n) for n in args.parallel.split(",") if n.strip()]
        results = await run_all(bench, args.skip_old, parallel, args.workers)
        info = {"machine": machine(), "server": await server.describe()}
    finally:
        for name in names:
            await server.drop(name)
        server.stop_if_started_here()
    print(report(results, bench, info))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": [asdict(r) | {"rows_per_s": r.rows_per_s} for r in results],
                                         "batch_size": bench.batch_size, **info}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
