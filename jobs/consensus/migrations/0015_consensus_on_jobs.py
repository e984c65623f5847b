"""consensus transactions leased through the core's jobs: a transaction is held by the runner_jobs row
(job_id) whose attempt (job_epoch) took it, instead of a lease of its own; the work already queued gets
its jobs

Revision ID: 0015
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0013"
branch_labels = None
depends_on = "0014"  # runner_jobs.fifo_key

TABLE = "runner_consensus_transactions"
IN_MACHINE = "('ACTIVATED', 'PROPOSING', 'COMMITTING', 'REVEALING')"
DECIDED = "('ACCEPTED', 'UNDETERMINED', 'LEADER_TIMEOUT', 'VALIDATORS_TIMEOUT')"
# What runner.jobs.consensus enqueues (work.py): one contract job per contract with work, a finality job.
CONTRACT_JOBS = f"""
INSERT INTO runner_jobs (kind, queue, payload, max_attempts, fifo_key)
SELECT 'consensus.contract', 'consensus', jsonb_build_object('contract', to_address), 1000,
       'consensus:' || to_address
FROM (SELECT to_address, min(seq) AS first FROM {TABLE} WHERE status NOT IN ('FINALIZED', 'CANCELED')
      GROUP BY to_address) unfinished
ORDER BY first
"""
FINALITY_JOB = f"""
INSERT INTO runner_jobs (kind, queue, payload, max_attempts, fifo_key)
SELECT 'consensus.finality', 'consensus', '{{}}'::jsonb, 1000, 'consensus:finality'
WHERE EXISTS (SELECT 1 FROM {TABLE} WHERE status IN {DECIDED}
                                       OR (status = 'FINALIZED' AND finalized_event_tx IS NULL))
"""


def upgrade() -> None:
    op.drop_index("runner_consensus_tx_lease_idx", table_name=TABLE)
    op.drop_index("runner_consensus_tx_busy_idx", table_name=TABLE)
    op.drop_column(TABLE, "lease_owner")
    op.drop_column(TABLE, "lease_expires_at")
    op.add_column(TABLE, sa.Column("job_id", sa.BigInteger))  # the job holding it; NULL: nobody
    op.add_column(TABLE, sa.Column("job_epoch", sa.BigInteger))  # that job's lease epoch when it took it
    op.create_index("runner_consensus_tx_busy_idx", TABLE, ["to_address"],
                    postgresql_where=sa.text(f"status IN {IN_MACHINE}"))
    op.execute(CONTRACT_JOBS)
    op.execute(FINALITY_JOB)


def downgrade() -> None:
    op.execute("DELETE FROM runner_jobs WHERE kind IN ('consensus.contract', 'consensus.finality') "
               "AND status IN ('pending', 'running')")
    op.drop_index("runner_consensus_tx_busy_idx", table_name=TABLE)
    op.drop_column(TABLE, "job_epoch")
    op.drop_column(TABLE, "job_id")
    op.add_column(TABLE, sa.Column("lease_owner", sa.Text))
    op.add_column(TABLE, sa.Column("lease_expires_at", sa.DateTime(timezone=True)))
    op.create_index("runner_consensus_tx_lease_idx", TABLE, ["lease_expires_at"],
                    postgresql_where=sa.text("lease_owner IS NOT NULL"))
    busy = f"status IN {IN_MACHINE} OR (status IN {DECIDED} AND lease_owner IS NOT NULL)"
    op.create_index("runner_consensus_tx_busy_idx", TABLE, ["to_address"], postgresql_where=sa.text(busy))
