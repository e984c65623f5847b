"""consensus rounds: the round each transaction's events carry, and its leader rotations

Revision ID: 0009
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0003"
branch_labels = None
depends_on = None

TABLE = "runner_consensus_transactions"


def upgrade() -> None:
    # 0, then one more per new proposal (a leader rotation; later, a re-run after an appeal)
    op.add_column(TABLE, sa.Column("round", sa.Integer, nullable=False, server_default="0"))
    # leaders rotated in since the transaction was last claimed from PENDING afresh (the budget's count)
    op.add_column(TABLE, sa.Column("rotation_count", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column(TABLE, "rotation_count")
    op.drop_column(TABLE, "round")
