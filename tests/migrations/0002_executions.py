"""execution log for the tests' `record` kind (tests/kinds.py; not part of runner's production schema)

Revision ID: 0002
Revises: (its own branch; depends on 0001)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = None
branch_labels = ("test_kinds",)
depends_on = "0001"


def upgrade() -> None:
    op.create_table(
        "runner_executions",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("job_id", sa.BigInteger, nullable=False),
        sa.Column("lease_epoch", sa.BigInteger, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("worker_id", sa.Text, nullable=False),
        sa.Column("executed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("runner_executions_job_idx", "runner_executions", ["job_id"])


def downgrade() -> None:
    op.drop_table("runner_executions")
