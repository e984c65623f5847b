"""consensus appeals: a pending appeal request, the appeal rounds so far, and failed appeals (which shorten
the window)

Revision ID: 0011
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0011"
down_revision = "0009"
branch_labels = None
depends_on = None

TABLE = "runner_consensus_transactions"
DECIDED = "('ACCEPTED', 'UNDETERMINED', 'LEADER_TIMEOUT', 'VALIDATORS_TIMEOUT')"


def upgrade() -> None:
    # 'validator' or 'leader' while an appeal asked for is not settled; a worker claims it
    op.add_column(TABLE, sa.Column("appeal_requested", sa.Text))
    # one object per appeal: kind, round, validators, votes, outcome, the chain txs of its events
    op.add_column(TABLE, sa.Column("appeals", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")))
    # appeals that changed nothing: each shortens the next window (RUNNER_CONSENSUS_APPEAL_WINDOW_FACTOR)
    op.add_column(TABLE, sa.Column("appeal_failed", sa.Integer, nullable=False, server_default="0"))
    op.create_index("runner_consensus_tx_appeal_idx", TABLE, ["seq"],
                    postgresql_where=sa.text(f"appeal_requested IS NOT NULL AND status IN {DECIDED}"))


def downgrade() -> None:
    op.drop_index("runner_consensus_tx_appeal_idx", table_name=TABLE)
    op.drop_column(TABLE, "appeal_failed")
    op.drop_column(TABLE, "appeals")
    op.drop_column(TABLE, "appeal_requested")
