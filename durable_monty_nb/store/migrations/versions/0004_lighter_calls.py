"""lighter call rows: no copy of the execution's key in each call, reuse indexed by call key

Revision ID: 0004_lighter_calls
Revises: 0003_signals

Reuse finds a call by its call key among the executions of one key (``dm_executions.key``,
indexed), so the key no longer needs repeating in every call row and in the reuse index: with
a notebook's key (``report.ipynb::cell-3f2a9c1e5b7d``) that was about a sixth of a call's bytes.
New call rows also carry a 128-bit HMAC (32 hex digits); older rows keep theirs and still verify.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_lighter_calls"
down_revision = "0003_signals"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_dm_calls_reuse", table_name="dm_calls")
    with op.batch_alter_table("dm_calls") as batch:  # SQLite: the table is rebuilt
        batch.drop_column("exec_key")
    op.create_index("ix_dm_calls_call_key", "dm_calls", ["call_key"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_dm_calls_call_key", table_name="dm_calls")
    with op.batch_alter_table("dm_calls") as batch:
        batch.add_column(sa.Column("exec_key", sa.String(length=255), nullable=False, server_default=""))
    op.execute("UPDATE dm_calls SET exec_key = (SELECT e.key FROM dm_executions e WHERE e.id = dm_calls.execution_id)")
    op.create_index("ix_dm_calls_reuse", "dm_calls", ["exec_key", "call_key"], unique=False)
