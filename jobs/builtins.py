"""Built-in kinds for smoke checks and examples.

- ``noop``: does nothing.
- ``sleep``: ``{"seconds": float}``.

The test and benchmark kinds (``record``, ``fail``) and their table live in the test suite's own
application (``tests/kinds.py``, loaded with ``RUNNER_APP=tests.kinds:app``), not in the production schema.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, Any

from runner.errors import PayloadError
from runner.plugins import JobKind, Plugin

if TYPE_CHECKING:
    from runner.app import App
    from runner.context import JobContext


async def noop(ctx: JobContext) -> None:
    return None


def payload_seconds(payload: dict[str, Any], key: str = "seconds") -> float:
    """``payload[key]`` (default 0) as seconds; PayloadError unless it is a finite non-negative number."""
    seconds = payload.get(key, 0)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds) \
            or seconds < 0:
        raise PayloadError(f"'{key}' must be a non-negative number, got {seconds!r}")
    return float(seconds)


async def validate_seconds(payload: dict[str, Any], _app: App) -> None:
    payload_seconds(payload)


async def sleep(ctx: JobContext) -> None:
    await asyncio.sleep(payload_seconds(ctx.payload))


plugin = Plugin(
    name="builtins",
    kinds=(
        JobKind("noop", noop),
        JobKind("sleep", sleep, validate_seconds),
    ),
)
