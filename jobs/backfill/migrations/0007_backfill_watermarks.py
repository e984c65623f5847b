"""incremental backfills: the watermark each stream (tables, column, filters) reached

Revision ID: 0007
Revises: (its own branch; depends on 0001)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = None
branch_labels = ("backfill",)
depends_on = "0001"


def upgrade() -> None:
    # Written in the same transaction as the job's completion: a run that did not succeed moves nothing.
    op.create_table(
        "runner_backfill_watermarks",
        sa.Column("stream", sa.Text, primary_key=True),
        sa.Column("watermark", sa.Text, nullable=False),  # the since_column's value, as text
        sa.Column("job_id", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )


def downgrade() -> None:
    op.drop_table("runner_backfill_watermarks")
