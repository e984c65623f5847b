"""Built-in kinds for tests and benchmarks: ``noop`` and ``sleep``."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from runner.app import App
from runner.context import JobContext
from runner.errors import PayloadError
from runner.plugins import JobKind, Plugin


async def noop(ctx: JobContext) -> None:
    return None


def _seconds(payload: dict[str, Any]) -> float:
    seconds = payload.get("seconds", 0)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds) \
            or seconds < 0:
        raise PayloadError(f"sleep: 'seconds' must be a non-negative number, got {seconds!r}")
    return float(seconds)


async def validate_sleep(payload: dict[str, Any], _app: App) -> None:
    _seconds(payload)


async def sleep(ctx: JobContext) -> None:
    await asyncio.sleep(_seconds(ctx.payload))


plugin = Plugin(
    name="builtins",
    kinds=(JobKind("noop", noop), JobKind("sleep", sleep, validate_sleep)),
)
