"""each job's attempts: when each started and ended, how, on which worker and lease (the dashboard's timeline)

Revision ID: 0012
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0012"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One object per ended attempt, the newest last, at most queue_sql.ATTEMPT_LOG_LIMIT of them: appended
    # by the statements that end attempts (COMPLETE, COMPLETE_IN_TRANSACTION, RESCUE_STALE,
    # RELEASE_OWNED_EXCEPT). A constant default: no table rewrite on PostgreSQL 11 and later.
    op.add_column("runner_jobs", sa.Column("attempt_log", JSONB, nullable=False,
                                           server_default=sa.text("'[]'::jsonb")))


def downgrade() -> None:
    op.drop_column("runner_jobs", "attempt_log")
