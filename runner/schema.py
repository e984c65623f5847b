"""The queue's schema as SQLAlchemy Core metadata. Alembic migrations create it; a test checks they agree."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
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
)
