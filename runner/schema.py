"""The queue's schema as SQLAlchemy Core metadata. Alembic migrations create it; a test checks they agree."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

JOB_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")
UNFINISHED = "status IN ('pending', 'running')"

metadata = MetaData()

jobs = Table(
    "runner_jobs",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("kind", Text, nullable=False),
    Column("queue", Text, nullable=False, server_default="default"),
    Column("payload", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("status", Text, nullable=False, server_default="pending"),
    Column("priority", Integer, nullable=False, server_default="0"),
    Column("run_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("max_attempts", Integer, nullable=False, server_default="5"),
    Column("recoveries", Integer, nullable=False, server_default="0"),
    Column("lease_owner", Text),
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("lease_epoch", BigInteger, nullable=False, server_default="0"),
    Column("progress_done", BigInteger, nullable=False, server_default="0"),
    Column("progress_total", BigInteger),
    Column("checkpoint", JSONB),
    Column("cancel_requested", Boolean, nullable=False, server_default=text("false")),
    Column("last_error", Text),
    Column("dedupe_key", Text),
    Column("result", JSONB),  # revision 0004: added last, so it sits after finished_at in the table
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("schedule_name", Text),  # revision 0006: the schedule and tick a periodic job was enqueued for
    Column("schedule_tick", DateTime(timezone=True)),
    Column("parent_id", BigInteger),  # revision 0008: the job that made this one (a parallel backfill's chunk)
    # revision 0012: its ended attempts, the newest last, capped (queue_sql.ATTEMPT_LOG_LIMIT)
    Column("attempt_log", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("fifo_key", Text),  # revision 0014: jobs sharing a key run one at a time, in id order
    CheckConstraint(f"status IN {JOB_STATUSES!r}".replace('"', "'"), name="runner_jobs_status_check"),
    CheckConstraint("max_attempts > 0", name="runner_jobs_max_attempts_check"),
    # Storage parameters for churn (fillfactor, autovacuum): revision 0005, which explains them.
    # The claim walks this index in claim order and stops after LIMIT rows: an index scan at any size.
    Index(
        "runner_jobs_claim_idx",
        text("priority DESC"),
        "run_at",
        "id",
        postgresql_where=text("status = 'pending'"),
    ),
    # Revision 0005: unfinished jobs by status, queue and kind: the drain check, the exact pending/running
    # counts and every read of running jobs (the rescuer too), bounded by live work at any history size.
    # It replaced an index on lease_expires_at, which every heartbeat writes: heartbeats can now be HOT.
    Index("runner_jobs_unfinished_idx", "status", "queue", "kind", postgresql_where=text(UNFINISHED)),
    Index(
        "runner_jobs_dedupe_idx",
        "dedupe_key",
        unique=True,
        postgresql_where=text(f"dedupe_key IS NOT NULL AND {UNFINISHED}"),
    ),
    # No plain index on status: every claim and completion changes it, and that index doubled the claim's
    # cost (measured). Finished jobs are found for retention through this partial index instead.
    # Revision 0006: exactly one job per (schedule, tick) across every worker and replica.
    Index(
        "runner_jobs_schedule_tick_idx",
        "schedule_name",
        "schedule_tick",
        unique=True,
        postgresql_where=text("schedule_name IS NOT NULL"),
    ),
    # Revision 0014: the claim's test for a keyed job (one of its key running, or an older one pending).
    Index(
        "runner_jobs_fifo_idx",
        "fifo_key",
        "status",
        "id",
        postgresql_where=text(f"fifo_key IS NOT NULL AND {UNFINISHED}"),
    ),
    # Revision 0008: a parent's children (only child jobs are in it).
    Index("runner_jobs_parent_idx", "parent_id", postgresql_where=text("parent_id IS NOT NULL")),
    Index(
        "runner_jobs_finished_idx",
        "finished_at",
        postgresql_where=text("status IN ('succeeded', 'failed', 'cancelled')"),
    ),
)

workers = Table(
    "runner_workers",
    metadata,
    Column("id", Text, primary_key=True),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("queues", Text, nullable=False, server_default=""),
    Column("concurrency", Integer, nullable=False, server_default="0"),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("last_heartbeat_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("pool", JSONB),  # revision 0010: its pool use as of the last heartbeat
)

schedules = Table(
    "runner_schedules",
    metadata,
    Column("name", Text, primary_key=True),
    Column("kind", Text, nullable=False),
    Column("payload", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("queue", Text),
    Column("priority", Integer, nullable=False, server_default="0"),
    Column("cron", Text),
    Column("every_s", Float),
    Column("timezone", Text, nullable=False, server_default="UTC"),
    Column("missed", Text, nullable=False, server_default="skip"),
    Column("missed_limit", Integer, nullable=False, server_default="10"),
    Column("paused", Boolean, nullable=False, server_default=text("false")),
    Column("source", Text, nullable=False, server_default="cli"),
    Column("next_tick", DateTime(timezone=True), nullable=False),
    Column("last_tick", DateTime(timezone=True)),
    Column("last_job_id", BigInteger),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("(cron IS NULL) <> (every_s IS NULL)", name="runner_schedules_one_rule_check"),
    CheckConstraint("every_s IS NULL OR every_s > 0", name="runner_schedules_every_check"),
    CheckConstraint("missed IN ('skip', 'run-all')", name="runner_schedules_missed_check"),
    CheckConstraint("missed_limit > 0", name="runner_schedules_missed_limit_check"),
    CheckConstraint("source IN ('code', 'cli')", name="runner_schedules_source_check"),
)
