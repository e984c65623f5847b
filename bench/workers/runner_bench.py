"""runner side of P2 (latency); runs in the runner venv.

    runner_bench.py worker  --latency-out FILE [runner worker options...]
    runner_bench.py produce --rate R --duration D       (RUNNER_DATABASE_URL from the environment)

``worker`` is ``runner worker`` as shipped plus one bench-only kind, ``bench_latency``, whose handler
records ``time.time()`` at its start against the enqueue time carried in the payload. The kind is added
by wrapping ``runner.plugins.load_plugins`` before the CLI is imported (runner finds kinds through the
``runner.plugins`` entry point group; a bench-only kind has no business in pyproject.toml). Nothing else
changes: heartbeats, fencing, cancellation checks and defaults are those of the CLI.

P1, P3, P7 and scale.py use the plain ``runner`` command, not this file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import runner.plugins as runner_plugins

KIND = "bench_latency"
latencies: list[float] = []


async def bench_latency(ctx) -> None:  # type: ignore[no-untyped-def]
    latencies.append(time.time() - ctx.payload["t"])


def _with_bench_kind() -> None:
    shipped = runner_plugins.load_plugins

    def load_plugins() -> list[runner_plugins.Plugin]:
        return [*shipped(), runner_plugins.Plugin(name="bench", kinds=(runner_plugins.JobKind(KIND, bench_latency),))]

    runner_plugins.load_plugins = load_plugins  # before runner.app / runner.cli bind the name


def worker(latency_out: str, argv: list[str]) -> None:
    _with_bench_kind()
    from runner.cli import main

    sys.argv = ["runner", "worker", *argv]
    try:
        main()
    finally:
        with open(latency_out, "w") as handle:
            json.dump(latencies, handle)


async def produce(rate: float, duration: float) -> None:
    from runner.app import App
    from runner.config import load_settings
    from runner.queue import NewJob

    app = await App.open(load_settings())
    try:
        total = int(rate * duration)
        t0 = time.monotonic()
        for i in range(total):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await app.queue.job_enqueue_many([NewJob(KIND, {"t": time.time()})])
        print(json.dumps({"produced": total, "elapsed_s": time.monotonic() - t0}))
    finally:
        await app.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["worker", "produce"])
    parser.add_argument("--latency-out")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--duration", type=float, default=20.0)
    args, rest = parser.parse_known_args()
    if args.command == "worker":
        worker(args.latency_out, rest)
    else:
        asyncio.run(produce(args.rate, args.duration))


if __name__ == "__main__":
    main()
