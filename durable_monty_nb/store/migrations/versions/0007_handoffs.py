"""hand-overs: detached executions waiting for (or driven by) a runner

Revision ID: 0007_handoffs
Revises: 0006_gathered_calls
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0007_handoffs"
down_revision = "0006_gathered_calls"
branch_labels = None
depends_on = None

LONG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mariadb").with_variant(mysql.LONGTEXT(), "mysql")


def upgrade() -> None:
    op.create_table(
        "dm_handoffs",
        sa.Column("execution_id", sa.String(length=32), nullable=False),
        sa.Column("executor", sa.String(length=64), nullable=False),
        sa.Column("options", LONG_TEXT, nullable=False),
        sa.Column("inputs", LONG_TEXT, nullable=False),
        sa.Column("functions", LONG_TEXT, nullable=False),
        sa.Column("signature", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.Column("armed", sa.Integer(), nullable=False),
        sa.Column("cancel_requested_at", sa.Double(), nullable=True),
        sa.Column("runner", sa.String(length=255), nullable=True),
        sa.Column("claimed_at", sa.Double(), nullable=True),
        sa.Column("refusal", LONG_TEXT, nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("execution_id"),
    )


def downgrade() -> None:
    op.drop_table("dm_handoffs")
