"""procrastinate 3.10 side of the benchmark; runs in bench/.venv-competitors (never imports runner).

    procrastinate_bench.py install  --dsn URL
    procrastinate_bench.py enqueue  --dsn URL --kind noop|sleep --count N [--seconds S]
    procrastinate_bench.py worker   --dsn URL [--drain] [--concurrency N] [--pool-max N] [--latency-out FILE]
    procrastinate_bench.py produce  --dsn URL --rate R --duration D

The worker is ``App.run_worker_async(concurrency=N, wait=not drain)``, what ``procrastinate worker
--one-shot --concurrency=N`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from procrastinate import App, PsycopgConnector

ENQUEUE_BATCH = 1000
APP_NAME = "procrastinate-bench"
latencies: list[float] = []


def make_app(dsn: str, pool_max: int | None = None) -> App:
    kwargs: dict[str, Any] = {"conninfo": dsn, "kwargs": {"application_name": APP_NAME}}
    if pool_max is not None:
        kwargs.update(min_size=min(4, pool_max), max_size=pool_max)
    app = App(connector=PsycopgConnector(**kwargs))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    @app.task(name="sleep")
    async def sleep(seconds: float = 0.0) -> None:
        await asyncio.sleep(seconds)

    @app.task(name="latency")
    async def latency(t: float) -> None:
        latencies.append(time.time() - t)

    return app


async def install(dsn: str) -> None:
    app = make_app(dsn)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


async def enqueue(dsn: str, kind: str, count: int, seconds: float) -> None:
    app = make_app(dsn)
    async with app.open_async():
        task = app.tasks[kind]
        kwargs: dict[str, Any] = {"seconds": seconds} if kind == "sleep" else {}
        started = time.perf_counter()
        for start in range(0, count, ENQUEUE_BATCH):
            await task.batch_defer_async(*[kwargs] * min(ENQUEUE_BATCH, count - start))
        print(json.dumps({"enqueue_s": time.perf_counter() - started, "count": count}))


async def produce(dsn: str, rate: float, duration: float) -> None:
    app = make_app(dsn)
    async with app.open_async():
        task = app.tasks["latency"]
        total = int(rate * duration)
        t0 = time.monotonic()
        for i in range(total):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await task.defer_async(t=time.time())
        print(json.dumps({"produced": total, "elapsed_s": time.monotonic() - t0}))


async def worker(dsn: str, drain: bool, concurrency: int, pool_max: int | None) -> None:
    app = make_app(dsn, pool_max)
    async with app.open_async():
        await app.run_worker_async(concurrency=concurrency, wait=not drain)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["install", "enqueue", "worker", "produce"])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--kind", default="noop")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--drain", action="store_true")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--pool-max", type=int, default=None)
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
        try:
            asyncio.run(worker(args.dsn, args.drain, args.concurrency, args.pool_max))
        finally:
            if args.latency_out:
                Path(args.latency_out).write_text(json.dumps(latencies))


if __name__ == "__main__":
    main()
