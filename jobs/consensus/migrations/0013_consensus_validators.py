"""consensus validators as data: address, stake and where its signing key is (never the key); each
transaction's draw (seed and committee)

Revision ID: 0013
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0013"
down_revision = "0011"
branch_labels = None
depends_on = None

TABLE = "runner_consensus_validators"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("address", sa.Text, primary_key=True),
        sa.Column("stake", sa.BigInteger, nullable=False),
        # env:NAME, file:PATH or dev:N: where a worker finds the private key; NULL: it signs nothing
        sa.Column("key_ref", sa.Text),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.CheckConstraint("stake > 0", name="runner_consensus_validators_stake_positive"),
    )
    # the run's draw: seed, run round, committee and its stakes (recomputable from the table)
    op.add_column("runner_consensus_transactions", sa.Column("draw", JSONB))


def downgrade() -> None:
    op.drop_column("runner_consensus_transactions", "draw")
    op.drop_table(TABLE)
