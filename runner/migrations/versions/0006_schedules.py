"""periodic jobs: the schedules table, and the (schedule, tick) each scheduled job was enqueued for

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runner_schedules",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("payload", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("queue", sa.Text),  # NULL: the kind's queue, else 'default' (as at enqueue)
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cron", sa.Text),
        sa.Column("every_s", sa.Float),
        sa.Column("timezone", sa.Text, nullable=False, server_default="UTC"),
        sa.Column("missed", sa.Text, nullable=False, server_default="skip"),
        sa.Column("missed_limit", sa.Integer, nullable=False, server_default="10"),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("source", sa.Text, nullable=False, server_default="cli"),
        sa.Column("next_tick", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_tick", sa.DateTime(timezone=True)),
        sa.Column("last_job_id", sa.BigInteger),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("(cron IS NULL) <> (every_s IS NULL)", name="runner_schedules_one_rule_check"),
        sa.CheckConstraint("every_s IS NULL OR every_s > 0", name="runner_schedules_every_check"),
        sa.CheckConstraint("missed IN ('skip', 'run-all')", name="runner_schedules_missed_check"),
        sa.CheckConstraint("missed_limit > 0", name="runner_schedules_missed_limit_check"),
        sa.CheckConstraint("source IN ('code', 'cli')", name="runner_schedules_source_check"),
    )
    # Nullable columns without a default: adding them rewrites nothing, whatever the table's size.
    op.add_column("runner_jobs", sa.Column("schedule_name", sa.Text))
    op.add_column("runner_jobs", sa.Column("schedule_tick", sa.DateTime(timezone=True)))
    # Exactly one job per (schedule, tick), whichever worker or replica enqueues it. Partial: jobs without
    # a schedule (nearly all) are not in it, so ordinary enqueues pay nothing for it.
    op.create_index(
        "runner_jobs_schedule_tick_idx",
        "runner_jobs",
        ["schedule_name", "schedule_tick"],
        unique=True,
        postgresql_where=sa.text("schedule_name IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("runner_jobs_schedule_tick_idx", table_name="runner_jobs")
    op.drop_column("runner_jobs", "schedule_tick")
    op.drop_column("runner_jobs", "schedule_name")
    op.drop_table("runner_schedules")
