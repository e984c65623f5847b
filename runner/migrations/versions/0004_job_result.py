"""a job's result: what its handler returned (jsonb)

Revision ID: 0004
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: adding it rewrites nothing, however many rows the table holds.
    op.add_column("runner_jobs", sa.Column("result", JSONB))


def downgrade() -> None:
    op.drop_column("runner_jobs", "result")
