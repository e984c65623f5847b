"""jobs made by a job: the parent a child job belongs to (a parallel backfill's chunks)

Revision ID: 0008
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable without a default: adding it rewrites nothing, whatever the table's size. No foreign key:
    # retention deletes a parent and its children independently, and a key would tax every delete.
    op.add_column("runner_jobs", sa.Column("parent_id", sa.BigInteger))
    # Partial: only child jobs are in it, so ordinary enqueues and completions pay nothing for it.
    op.create_index("runner_jobs_parent_idx", "runner_jobs", ["parent_id"],
                    postgresql_where=sa.text("parent_id IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("runner_jobs_parent_idx", table_name="runner_jobs")
    op.drop_column("runner_jobs", "parent_id")
