"""fifo_key: jobs that share one run one at a time, in id order (a keyed FIFO lock any job kind can use)

Revision ID: 0014
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runner_jobs", sa.Column("fifo_key", sa.Text))
    # The claim's per-key test: is any (key, 'running') there, and the first (key, 'pending') id.
    # Only unfinished keyed jobs are in it, so it is bounded by live keyed work at any history size.
    op.create_index("runner_jobs_fifo_idx", "runner_jobs", ["fifo_key", "status", "id"],
                    postgresql_where=sa.text("fifo_key IS NOT NULL AND status IN ('pending', 'running')"))


def downgrade() -> None:
    op.drop_index("runner_jobs_fifo_idx", table_name="runner_jobs")
    op.drop_column("runner_jobs", "fifo_key")
