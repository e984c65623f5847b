"""The typed context handed to every job handler."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog

from runner.errors import JobCancelled, LeaseLost, PayloadError, UsageError
from runner.logs import get_logger
from runner.queue import ClaimedJob

MAX_RESULT_CHARS = 1_000_000


def encode_result(value: Any) -> str:
    """A handler's result as JSON text; a value JSON cannot hold fails the job (retrying cannot fix it)."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as error:
        raise PayloadError(f"the handler's result is not JSON: {type(error).__name__}: {str(error)[:200]}") from None
    if len(text) > MAX_RESULT_CHARS:
        raise PayloadError(f"the handler's result is {len(text):,} characters of JSON; at most "
                           f"{MAX_RESULT_CHARS:,} are stored (keep large outputs in your own tables)")
    if "\\u0000" in text:
        raise PayloadError("the handler's result contains a NUL character, which PostgreSQL's jsonb cannot store")
    return text


if TYPE_CHECKING:
    from runner.app import App
    from runner.db import Database


@dataclass
class JobContext:
    """What a handler sees: its job, the shared app (pool, settings, chain), and fenced writes.

    Handlers borrow connections with ``async with ctx.db.connection()`` only around database work, so a
    connection is never held while the handler computes, sleeps or waits on the chain.

    Exactly once: write the job's effect and ``await ctx.complete_in(connection)`` in one transaction on the
    runner's database; both commit or neither does. Anything a handler does outside such a transaction
    (other databases, HTTP calls, the chain) is at-least-once: a stalled worker's job can run again.
    """

    job: ClaimedJob
    app: App
    worker_id: str
    _cancelled: bool = False  # a plain flag: an Event per job cost more than a no-op job
    completed_in_transaction: bool = False  # complete_in ran; its transaction's result is final

    @cached_property
    def log(self) -> structlog.stdlib.BoundLogger:
        # Made on first use: most jobs never log, and binding costs more than a no-op job.
        return get_logger("runner.job").bind(
            job_id=self.job.id, kind=self.job.kind, attempt=self.attempt, worker_id=self.worker_id)

    @property
    def job_id(self) -> int:
        return self.job.id

    @property
    def payload(self) -> dict[str, Any]:
        return self.job.payload

    @property
    def attempt(self) -> int:
        return self.job.attempts + 1

    @property
    def db(self) -> Database:
        return self.app.db

    @property
    def scheduled_for(self) -> datetime | None:
        """A periodic job's tick (UTC): the time its schedule enqueued it for; None for other jobs."""
        return self.job.schedule_tick

    @property
    def saved_checkpoint(self) -> dict[str, Any] | None:
        return self.job.checkpoint

    def cancel_requested(self) -> bool:
        return self._cancelled

    def raise_if_cancelled(self) -> None:
        if self._cancelled:
            raise JobCancelled(f"job {self.job.id} was cancelled")

    def request_cancel(self) -> None:
        self._cancelled = True

    async def complete_in(self, connection: asyncpg.Connection, result: Any = None) -> None:
        """Mark this job succeeded inside ``connection``'s open transaction, fenced by the lease epoch.

        The completion (and ``result``, stored as the job's result) commits with whatever else that
        transaction wrote, or not at all. Raises :class:`LeaseLost` when another worker now owns the job
        (let it propagate: the transaction rolls back). Once called, the transaction decides the job's end;
        what the handler returns afterwards is not stored.
        """
        if not connection.is_in_transaction():
            raise UsageError("ctx.complete_in needs a connection inside a transaction (async with conn.transaction())")
        encoded = None if result is None else encode_result(result)
        if not await self.app.queue.job_complete_in_transaction(connection, self.job.id, self.job.lease_epoch,
                                                                encoded):
            raise LeaseLost(f"job {self.job.id}: lease epoch {self.job.lease_epoch} is no longer current")
        self.completed_in_transaction = True

    async def progress(self, done: int, total: int | None = None) -> None:
        await self.save(done=done, total=total)

    async def progress_in(self, connection: asyncpg.Connection, *, done: int, total: int | None = None) -> None:
        """Progress written inside the caller's transaction, so it commits (or not) with the work."""
        await self.save(done=done, total=total, connection=connection)

    async def checkpoint(
        self,
        state: dict[str, Any],
        *,
        done: int | None = None,
        total: int | None = None,
        connection: asyncpg.Connection | None = None,
    ) -> None:
        """Persist the checkpoint (and progress) fenced by the lease epoch.

        Pass the ``connection`` of the transaction that wrote the batch to commit both atomically.
        """
        await self.save(done=done, total=total, checkpoint=state, connection=connection)

    async def save(
        self,
        *,
        done: int | None = None,
        total: int | None = None,
        checkpoint: dict[str, Any] | None = None,
        connection: asyncpg.Connection | None = None,
    ) -> None:
        saved = await self.app.queue.job_save_progress(
            self.job.id, self.job.lease_epoch, done=done, total=total, checkpoint=checkpoint,
            connection=connection,
        )
        if not saved:
            raise LeaseLost(f"job {self.job.id}: lease epoch {self.job.lease_epoch} is no longer current")
