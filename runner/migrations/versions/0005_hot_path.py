"""the hot path at any history size: indexes on unfinished jobs, a table laid out for churn

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UNFINISHED = "status IN ('pending', 'running')"

# Churn: every job writes at least three row versions (enqueue, claim, completion) plus one per heartbeat.
# - fillfactor 80 leaves a fifth of each heap page free, so an update that changes no indexed column (a
#   heartbeat, a progress save) can be a HOT update: the new version goes on the same page, no index entry
#   is written, and the old one is pruned without VACUUM. It applies to pages written from now on.
# - autovacuum on this table at 1% dead rows (the default is 20%: 400,000 dead rows at 2 M rows of history)
#   with no cost delay, so dead versions of claimed and completed jobs are reclaimed while they are few;
#   ANALYZE at 2% keeps the statistics of the partial indexes (which change with every claim) and the
#   estimated counts of finished jobs (pg_stats) close.
# Claims and completions change `status`, which every partial index's predicate reads: they are never HOT.
STORAGE = {
    "fillfactor": "80",
    "autovacuum_vacuum_scale_factor": "0.01",
    "autovacuum_vacuum_threshold": "1000",
    "autovacuum_vacuum_insert_scale_factor": "0.02",
    "autovacuum_vacuum_cost_delay": "0",
    "autovacuum_analyze_scale_factor": "0.02",
    "autovacuum_analyze_threshold": "1000",
}


def upgrade() -> None:
    # Plain CREATE INDEX, not CONCURRENTLY: migrations run in a transaction. It holds a SHARE lock on
    # runner_jobs (writes wait) for as long as the build takes: one read of the table (about a second per
    # million rows), and the index holds unfinished jobs only.
    #
    # Unfinished jobs by status, queue and kind: the drain check, the exact counts of pending and running
    # jobs, and every read of running jobs (the rescuer, the release of owned jobs, `status`'s running
    # list: status = 'running' is an index condition, so they read running entries only, not a backlog of
    # pending ones). Bounded by live work, never by history. status, queue and kind are not written by a
    # heartbeat or a progress save (and a claim or completion changes status, never HOT anyway).
    op.create_index(
        "runner_jobs_unfinished_idx",
        "runner_jobs",
        ["status", "queue", "kind"],
        postgresql_where=sa.text(UNFINISHED),
    )
    # It replaces the index on lease_expires_at of running jobs: a heartbeat writes lease_expires_at, and
    # with that column indexed no heartbeat could be a HOT update. The rescue now reads the running jobs
    # through the index above (an index scan bounded by the workers' concurrency) and sorts them.
    op.drop_index("runner_jobs_lease_idx", table_name="runner_jobs")
    options = ", ".join(f"{name} = {value}" for name, value in STORAGE.items())
    op.execute(f"ALTER TABLE runner_jobs SET ({options})")


def downgrade() -> None:
    op.execute(f"ALTER TABLE runner_jobs RESET ({', '.join(STORAGE)})")
    op.create_index(
        "runner_jobs_lease_idx", "runner_jobs", ["lease_expires_at"], postgresql_where=sa.text("status = 'running'")
    )
    op.drop_index("runner_jobs_unfinished_idx", table_name="runner_jobs")
