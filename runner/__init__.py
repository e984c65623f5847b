"""runner: an asyncio worker for PostgreSQL-backed jobs with one bounded pool and fenced leases.

The public API, in full (see the README's "Use runner from your application")::

    import runner

    app = runner.App()

    @app.job("send_note", max_attempts=3, timeout=30)
    async def send_note(ctx: runner.JobContext) -> dict:
        return {"sent": True}

    async with app:
        job_id = await app.enqueue("send_note", {"to": "ada"}, connection=conn)
        job: runner.Job = await app.wait(job_id, timeout=60)

Names are imported on first use, so ``import runner`` (and the CLI's start) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "App": "runner.app",
    "load_app": "runner.app",
    "Job": "runner.job",
    "JobStatus": "runner.job",
    "JobContext": "runner.context",
    "JobKind": "runner.plugins",
    "Plugin": "runner.plugins",
    "Backoff": "runner.policy",
    "NewJob": "runner.queue",
    "Settings": "runner.config",
    "RunnerError": "runner.errors",
    "UsageError": "runner.errors",
    "UnknownKind": "runner.errors",
    "JobNotFound": "runner.errors",
    "PayloadError": "runner.errors",
    "JobFailed": "runner.errors",
    "RetryLater": "runner.errors",
    "Snooze": "runner.errors",
    "JobCancelled": "runner.errors",
    "LeaseLost": "runner.errors",
    "PoolExhausted": "runner.errors",
    "DatabaseUnavailable": "runner.errors",
    "AppNotOpen": "runner.errors",
    "WaitTimeout": "runner.errors",
    "ScheduleError": "runner.errors",
}
__all__ = [
    "App",
    "AppNotOpen",
    "Backoff",
    "DatabaseUnavailable",
    "Job",
    "JobCancelled",
    "JobContext",
    "JobFailed",
    "JobKind",
    "JobNotFound",
    "JobStatus",
    "LeaseLost",
    "NewJob",
    "PayloadError",
    "Plugin",
    "PoolExhausted",
    "RetryLater",
    "RunnerError",
    "ScheduleError",
    "Settings",
    "Snooze",
    "UnknownKind",
    "UsageError",
    "WaitTimeout",
    "load_app",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'runner' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from runner.app import App, load_app
    from runner.config import Settings
    from runner.context import JobContext
    from runner.errors import (
        AppNotOpen,
        DatabaseUnavailable,
        JobCancelled,
        JobFailed,
        JobNotFound,
        LeaseLost,
        PayloadError,
        PoolExhausted,
        RetryLater,
        RunnerError,
        Snooze,
        UnknownKind,
        UsageError,
        WaitTimeout,
    )
    from runner.job import Job, JobStatus
    from runner.plugins import JobKind, Plugin
    from runner.policy import Backoff
    from runner.queue import NewJob
