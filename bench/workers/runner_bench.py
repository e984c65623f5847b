"""runner side of P2 (latency); runs in the runner venv.

    runner_bench.py worker  --latency-out FILE [runner worker options...]
    runner_bench.py produce --rate R --duration D       (RUNNER_DATABASE_URL from the environment)

``worker`` is ``runner worker`` as shipped plus one bench-only kind, ``bench_latency``, whose handler
records ``time.time()`` at its start against the enqueue time carried in the payload. The kind is declared
on this script's own ``runner.App`` and loaded the way an application's are (``RUNNER_APP=__main__:app``:
this very module, so the handler fills the list this script writes out). Nothing else changes: heartbeats,
fencing, cancellation checks and defaults are those of the CLI.

P1, P3, P7 and scale.py use the plain ``runner`` command, not this file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import runner

KIND = "bench_latency"
latencies: list[float] = []
app = runner.App(name="bench")


@app.job(KIND)
async def bench_latency(ctx: runner.JobContext) -> None:
    latencies.append(time.time() - ctx.payload["t"])


def worker(latency_out: str, argv: list[str]) -> None:
    os.environ["RUNNER_APP"] = "__main__:app"  # this script's app (not a second import of it)
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
