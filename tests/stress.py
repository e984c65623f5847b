"""The stress fixture's parts: CPU hogs beside the workers, a small pool budget, and a worker paused with
SIGSTOP until the database says its leases have expired (a VM pause, a frozen loop)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.app import App
from tests.pg import wait_until

HOG = "while True: pass"
# Every worker of a stress test gets a pool this small: 2 control connections and 1 for its 200 handlers.
SMALL_POOL = {"RUNNER_POOL_MAX_SIZE": "3", "RUNNER_POOL_MIN_SIZE": "1"}


@contextmanager
def cpu_hogs(count: int = 2) -> Iterator[list[subprocess.Popen[bytes]]]:
    hogs = [subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.DEVNULL) for _ in range(count)]
    try:
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()


@dataclass
class Stress:
    """Handed to a test: the env a stressed worker needs, and the pause that outlives a lease."""

    app: App
    env: dict[str, str]
    hogs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def worker_env(self, **extra: str) -> dict[str, str]:
        return {**SMALL_POOL, **extra}

    @asynccontextmanager
    async def paused_past_lease(
        self, process: subprocess.Popen[str], worker_id: str, timeout_s: float = 90
    ) -> AsyncIterator[int]:
        """SIGSTOP the worker for the block and after it, until none of its jobs is leased to it any more
        (each expired and was rescued by another worker), then SIGCONT it. Yields the jobs it held."""
        os.kill(process.pid, signal.SIGSTOP)
        try:
            held = await self.app.db.fetchval(
                "SELECT count(*) FROM runner_jobs WHERE status = 'running' AND lease_owner = $1", worker_id)
            yield int(held)
            await wait_until(lambda: self.app.db.fetchval(
                "SELECT count(*) = 0 FROM runner_jobs WHERE status = 'running' AND lease_owner = $1", worker_id),
                timeout_s)
        finally:
            os.kill(process.pid, signal.SIGCONT)


def log_lines(path: Path, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of one event from a worker's log file."""
    lines = []
    for line in path.read_text().splitlines():
        if f'"{event}"' in line:
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return [entry for entry in lines if entry.get("event") == event]
