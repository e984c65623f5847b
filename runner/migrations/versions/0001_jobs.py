"""jobs and workers tables

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = ("runner",)
depends_on = None

UNFINISHED = "status IN ('pending', 'running')"


def upgrade() -> None:
    now = sa.func.now()
    op.create_table(
        "runner_jobs",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("queue", sa.Text, nullable=False, server_default="default"),
        sa.Column("payload", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("status", sa.Text, nullable=False, server_default="pending"),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("run_at", sa.DateTime(timezone=True), nullable=False, server_default=now),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_attempts", sa.Integer, nullable=False, server_default="5"),
        sa.Column("recoveries", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lease_owner", sa.Text),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
        sa.Column("lease_epoch", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("progress_done", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("progress_total", sa.BigInteger),
        sa.Column("checkpoint", JSONB),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("last_error", sa.Text),
        sa.Column("dedupe_key", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=now),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')",
            name="runner_jobs_status_check",
        ),
        sa.CheckConstraint("max_attempts > 0", name="runner_jobs_max_attempts_check"),
    )
    op.create_index(
        "runner_jobs_claim_idx",
        "runner_jobs",
        [sa.text("priority DESC"), "run_at", "id"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "runner_jobs_lease_idx", "runner_jobs", ["lease_expires_at"], postgresql_where=sa.text("status = 'running'")
    )
    op.create_index(
        "runner_jobs_dedupe_idx",
        "runner_jobs",
        ["dedupe_key"],
        unique=True,
        postgresql_where=sa.text(f"dedupe_key IS NOT NULL AND {UNFINISHED}"),
    )
    op.create_index(
        "runner_jobs_finished_idx",
        "runner_jobs",
        ["finished_at"],
        postgresql_where=sa.text("status IN ('succeeded', 'failed', 'cancelled')"),
    )
    op.create_table(
        "runner_workers",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("queues", sa.Text, nullable=False, server_default=""),
        sa.Column("concurrency", sa.Integer, nullable=False, server_default="0"),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, server_default=now),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), nullable=False, server_default=now),
    )


def downgrade() -> None:
    op.drop_table("runner_workers")
    op.drop_table("runner_jobs")
