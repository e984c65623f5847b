"""each worker's pool use, written with its heartbeat (the dashboard's workers table)

Revision ID: 0010
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0010"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # {"size", "max", "in_use", "waiters", "exhaustion_retries", "give_ups"} as of the last heartbeat
    op.add_column("runner_workers", sa.Column("pool", JSONB))


def downgrade() -> None:
    op.drop_column("runner_workers", "pool")
