"""``runner.Job``: a job as the database holds it, typed, as ``App.get``, ``App.list`` and ``App.wait`` return it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Literal

JobStatus = Literal["pending", "running", "succeeded", "failed", "cancelled"]
FINISHED_STATUSES: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    kind: str
    queue: str
    status: JobStatus
    payload: dict[str, Any]
    priority: int
    attempts: int  # failed attempts so far (a rescue after a crash counts in ``recoveries`` instead)
    max_attempts: int
    recoveries: int
    progress_done: int
    progress_total: int | None
    checkpoint: dict[str, Any] | None
    result: Any  # what the handler returned (JSON), once succeeded
    last_error: str | None  # the last failure: its message first, then the traceback (bounded)
    cancel_requested: bool
    dedupe_key: str | None
    lease_owner: str | None
    lease_epoch: int
    run_at: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    schedule_name: str | None = None  # a periodic job: its schedule, and the tick it was enqueued for
    schedule_tick: datetime | None = None
    parent_id: int | None = None  # a child job (a parallel backfill's chunk): the job that made it
    fifo_key: str | None = None  # one job of this key runs at a time, in id order

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
