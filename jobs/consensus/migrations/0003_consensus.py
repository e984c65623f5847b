"""consensus transactions, contract states and the ConsensusMain deployment

Revision ID: 0003
Revises: (its own branch; depends on 0001)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003"
down_revision = None
branch_labels = ("consensus",)
depends_on = "0001"

STATUSES = (
    "PENDING", "ACTIVATED", "PROPOSING", "COMMITTING", "REVEALING", "ACCEPTED", "UNDETERMINED",
    "LEADER_TIMEOUT", "VALIDATORS_TIMEOUT", "FINALIZED", "CANCELED",
)
IN_MACHINE = "('ACTIVATED', 'PROPOSING', 'COMMITTING', 'REVEALING')"
DECIDED = "('ACCEPTED', 'UNDETERMINED', 'LEADER_TIMEOUT', 'VALIDATORS_TIMEOUT')"
TABLE = "runner_consensus_transactions"


def _state_table(name: str) -> None:
    op.create_table(
        name,
        sa.Column("address", sa.Text, primary_key=True),
        sa.Column("state", JSONB, nullable=False),
        sa.Column("tx_hash", sa.Text, nullable=False),  # the transaction that produced this state
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )


def upgrade() -> None:
    now = sa.func.now()
    statuses = ", ".join(f"'{s}'" for s in STATUSES)
    op.create_table(
        TABLE,
        sa.Column("hash", sa.Text, primary_key=True),
        # submission order: per-contract FIFO and finality follow it
        sa.Column("seq", sa.BigInteger, sa.Identity(always=False), nullable=False, unique=True),
        sa.Column("status", sa.Text, nullable=False, server_default="PENDING"),
        sa.Column("from_address", sa.Text, nullable=False),
        sa.Column("to_address", sa.Text, nullable=False),
        sa.Column("input", JSONB, nullable=False),
        sa.Column("leader", sa.Text),
        sa.Column("votes", JSONB),
        sa.Column("result", JSONB),  # the leader's receipt
        sa.Column("state_patch", JSONB),  # what an ACCEPTED transaction changed; applied again at finality
        # ACCEPTED, UNDETERMINED, LEADER_TIMEOUT or VALIDATORS_TIMEOUT: kept once the status is FINALIZED
        sa.Column("outcome", sa.Text),
        sa.Column("reason", sa.Text),  # why it ended where it did (timeouts, disagreement, recovery cap)
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=now),
        sa.Column("activated_at", sa.DateTime(timezone=True)),
        sa.Column("timestamp_awaiting_finalization", sa.DateTime(timezone=True)),
        sa.Column("finalized_at", sa.DateTime(timezone=True)),
        sa.Column("lease_owner", sa.Text),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
        sa.Column("lease_epoch", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("recovery_count", sa.Integer, nullable=False, server_default="0"),
        # the chain transaction that carried each transition's ConsensusMain event
        sa.Column("activated_event_tx", sa.Text),
        sa.Column("proposed_event_tx", sa.Text),
        sa.Column("committed_event_tx", sa.Text),
        sa.Column("revealed_event_tx", sa.Text),
        sa.Column("decided_event_tx", sa.Text),
        sa.Column("finalized_event_tx", sa.Text),
        sa.CheckConstraint(f"status IN ({statuses})", name="runner_consensus_transactions_status_check"),
    )
    # the head of each contract's queue (claims walk it with a loose index scan)
    op.create_index("runner_consensus_tx_pending_idx", TABLE, ["to_address", "seq"],
                    postgresql_where=sa.text("status = 'PENDING'"))
    # "has this contract anything in flight?"
    busy = f"status IN {IN_MACHINE} OR (status IN {DECIDED} AND lease_owner IS NOT NULL)"
    op.create_index("runner_consensus_tx_busy_idx", TABLE, ["to_address"], postgresql_where=sa.text(busy))
    # predecessors not yet finalized, finality candidates, drain checks
    op.create_index("runner_consensus_tx_unfinished_idx", TABLE, ["to_address", "seq"],
                    postgresql_where=sa.text("status NOT IN ('FINALIZED', 'CANCELED')"))
    # decided, awaiting finality (and decided events still owed)
    op.create_index("runner_consensus_tx_decided_idx", TABLE, ["seq"], postgresql_where=sa.text(f"status IN {DECIDED}"))
    op.create_index("runner_consensus_tx_lease_idx", TABLE, ["lease_expires_at"],
                    postgresql_where=sa.text("lease_owner IS NOT NULL"))
    op.create_index("runner_consensus_tx_owed_final_event_idx", TABLE, ["seq"],
                    postgresql_where=sa.text("status = 'FINALIZED' AND finalized_event_tx IS NULL"))
    _state_table("runner_consensus_accepted_states")
    _state_table("runner_consensus_finalized_states")
    op.create_table(
        "runner_consensus_deployments",
        sa.Column("chain_id", sa.BigInteger, primary_key=True),
        sa.Column("contract", sa.Text, primary_key=True),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("block_number", sa.BigInteger, nullable=False),
        sa.Column("deployed_at", sa.DateTime(timezone=True), nullable=False, server_default=now),
    )


def downgrade() -> None:
    op.drop_table("runner_consensus_deployments")
    op.drop_table("runner_consensus_finalized_states")
    op.drop_table("runner_consensus_accepted_states")
    op.drop_table(TABLE)
