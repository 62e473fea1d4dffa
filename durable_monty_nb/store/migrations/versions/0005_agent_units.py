"""agent units: the journal of pydantic-ai agent runs inside calls (durable_monty_nb.agents)

Revision ID: 0005_agent_units
Revises: 0004_lighter_calls
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0005_agent_units"
down_revision = "0004_lighter_calls"
branch_labels = None
depends_on = None

LONG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mariadb").with_variant(mysql.LONGTEXT(), "mysql")


def upgrade() -> None:
    op.create_table(
        "dm_agent_units",
        sa.Column("execution_id", sa.String(length=32), nullable=False),
        sa.Column("call_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("unit_key", sa.String(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("result", LONG_TEXT, nullable=False),
        sa.Column("signature", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("execution_id", "call_id", "unit_key"),
    )


def downgrade() -> None:
    op.drop_table("dm_agent_units")
