"""hand-overs: the live counts of a detached run as its runner sees them (running, queued, ...)

Revision ID: 0008_handoff_progress
Revises: 0007_handoffs
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0008_handoff_progress"
down_revision = "0007_handoffs"
branch_labels = None
depends_on = None

LONG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mariadb").with_variant(mysql.LONGTEXT(), "mysql")


def upgrade() -> None:
    op.add_column("dm_handoffs", sa.Column("progress", LONG_TEXT, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dm_handoffs") as batch:  # SQLite: the table is rebuilt
        batch.drop_column("progress")
