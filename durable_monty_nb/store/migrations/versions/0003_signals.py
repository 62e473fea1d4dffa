"""signals: the mailbox of each execution (deliveries and external call completions)

Revision ID: 0003_signals
Revises: 0002_remote_attempts
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0003_signals"
down_revision = "0002_remote_attempts"
branch_labels = None
depends_on = None

LONG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mariadb").with_variant(mysql.LONGTEXT(), "mysql")


def upgrade() -> None:
    op.create_table(
        "dm_signals",
        sa.Column("execution_id", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("value", LONG_TEXT, nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("signature", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("consumed_by", sa.Integer(), nullable=True),
        sa.Column("consumed_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("execution_id", "seq"),
    )
    op.create_index("ix_dm_signals_waiting", "dm_signals", ["execution_id", "consumed_by", "name"], unique=False)
    op.create_index("ux_dm_signals_idempotency", "dm_signals", ["execution_id", "idempotency_key"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_dm_signals_idempotency", table_name="dm_signals")
    op.drop_index("ix_dm_signals_waiting", table_name="dm_signals")
    op.drop_table("dm_signals")
