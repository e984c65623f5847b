"""pgqueuer 1.6 side of the benchmark; runs in bench/.venv-competitors (never imports runner).

Through pgqueuer's Python API, as ``pgq run`` would do it (``pgqueuer.run(factory, ...)`` on uvloop, its
CLI's loop when uvloop is installed), because ``pgq run`` itself breaks with typer >= 0.29.

    pgq_bench.py install  --dsn URL
    pgq_bench.py enqueue  --dsn URL --kind noop|sleep --count N [--seconds S]
    pgq_bench.py worker   --dsn URL [--drain] [--max-concurrent N] [--latency-out FILE]
    pgq_bench.py produce  --dsn URL --rate R --duration D
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from contextlib import asynccontextmanager

import asyncpg
import pgqueuer
import uvloop
from pgqueuer import AsyncpgDriver, PgQueuer, Queries
from pgqueuer.models import Job
from pgqueuer.types import QueueExecutionMode

ENQUEUE_BATCH = 1000
APP_NAME = "pgqueuer-bench"


async def connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, server_settings={"application_name": APP_NAME})


async def install(dsn: str) -> None:
    connection = await connect(dsn)
    try:
        await Queries(AsyncpgDriver(connection)).install()
    finally:
        await connection.close()


async def enqueue(dsn: str, kind: str, count: int, seconds: float) -> None:
    connection = await connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(connection))
        payload = json.dumps({"seconds": seconds}).encode() if kind == "sleep" else None
        started = time.perf_counter()
        for start in range(0, count, ENQUEUE_BATCH):
            n = min(ENQUEUE_BATCH, count - start)
            await queries.enqueue([kind] * n, [payload] * n, [0] * n)
        print(json.dumps({"enqueue_s": time.perf_counter() - started, "count": count}))
    finally:
        await connection.close()


async def produce(dsn: str, rate: float, duration: float) -> None:
    connection = await connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(connection))
        total = int(rate * duration)
        t0 = time.monotonic()
        for i in range(total):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await queries.enqueue("latency", json.dumps({"t": time.time()}).encode(), 0)
        print(json.dumps({"produced": total, "elapsed_s": time.monotonic() - t0}))
    finally:
        await connection.close()


def worker(dsn: str, drain: bool, max_concurrent: int | None, latency_out: str | None) -> None:
    latencies: list[float] = []

    @asynccontextmanager
    async def factory():  # type: ignore[no-untyped-def]
        connection = await connect(dsn)
        pgq = PgQueuer.from_asyncpg_connection(connection)

        @pgq.entrypoint("noop")
        async def noop(job: Job) -> None:
            return None

        @pgq.entrypoint("sleep")
        async def sleep(job: Job) -> None:
            await asyncio.sleep(json.loads(job.payload or b"{}").get("seconds", 0))

        @pgq.entrypoint("latency")
        async def latency(job: Job) -> None:
            latencies.append(time.time() - json.loads(job.payload or b"{}")["t"])

        try:
            yield pgq
        finally:
            await connection.close()

    mode = QueueExecutionMode.drain if drain else QueueExecutionMode.continuous
    try:
        uvloop.run(pgqueuer.run(factory, mode=mode, max_concurrent_tasks=max_concurrent))
    finally:
        if latency_out:
            with open(latency_out, "w") as handle:
                json.dump(latencies, handle)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["install", "enqueue", "worker", "produce"])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--kind", default="noop")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--drain", action="store_true")
    parser.add_argument("--max-concurrent", type=int, default=None)
    parser.add_argument("--latency-out")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--duration", type=float, default=20.0)
    args = parser.parse_args()
    if args.command == "install":
        asyncio.run(install(args.dsn))
    elif args.command == "enqueue":
        asyncio.run(enqueue(args.dsn, args.kind, args.count, args.seconds))
    elif args.command == "produce":
        asyncio.run(produce(args.dsn, args.rate, args.duration))
    else:
        worker(args.dsn, args.drain, args.max_concurrent, args.latency_out)


if __name__ == "__main__":
    main()
