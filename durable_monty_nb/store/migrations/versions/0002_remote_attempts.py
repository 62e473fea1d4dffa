"""remote executors: attempts, shipped functions, the worker of a call

Revision ID: 0002_remote_attempts
Revises: 0001_initial
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002_remote_attempts"
down_revision = "0001_initial"
branch_labels = None
depends_on = None

LONG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mariadb").with_variant(mysql.LONGTEXT(), "mysql")
LONG_BINARY = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mariadb").with_variant(mysql.LONGBLOB(), "mysql")


def upgrade() -> None:
    op.create_table(
        "dm_attempts",
        sa.Column("attempt_id", sa.String(length=80), nullable=False),
        sa.Column("execution_id", sa.String(length=32), nullable=False),
        sa.Column("call_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("executor", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("result", LONG_TEXT, nullable=True),
        sa.Column("error_types", LONG_TEXT, nullable=True),
        sa.Column("error_message", LONG_TEXT, nullable=True),
        sa.Column("traceback", LONG_TEXT, nullable=True),
        sa.Column("started_at", sa.Double(), nullable=True),
        sa.Column("finished_at", sa.Double(), nullable=True),
        sa.Column("signature", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("attempt_id"),
    )
    op.create_index(op.f("ix_dm_attempts_execution_id"), "dm_attempts", ["execution_id"], unique=False)
    op.create_table(
        "dm_functions",
        sa.Column("key", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("data", LONG_BINARY, nullable=False),
        sa.Column("signature", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.add_column("dm_calls", sa.Column("worker", sa.String(length=255), nullable=True))


def downgrade() -> None:
    op.drop_column("dm_calls", "worker")
    op.drop_table("dm_functions")
    op.drop_index(op.f("ix_dm_attempts_execution_id"), table_name="dm_attempts")
    op.drop_table("dm_attempts")
