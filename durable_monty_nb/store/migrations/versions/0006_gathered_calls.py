"""gathered calls: the gather a call was announced by (one host call for a whole comprehension)

Revision ID: 0006_gathered_calls
Revises: 0005_agent_units

A gather over a comprehension of notebook calls reaches the host as one Monty call that
announces them all; each announced call keeps a row of its own, with the Monty call id of that
gather in ``gather_id`` (null for calls Monty announced one by one), so a resume knows which
answers make up the gather's result. ``dm_executions.batching`` says which rewrite of the
code Monty runs (null for executions started before: their checkpoints run the code as written).
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_gathered_calls"
down_revision = "0005_agent_units"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("dm_calls", sa.Column("gather_id", sa.Integer(), nullable=True))
    op.add_column("dm_executions", sa.Column("batching", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dm_calls") as batch:  # SQLite: the table is rebuilt
        batch.drop_column("gather_id")
    with op.batch_alter_table("dm_executions") as batch:
        batch.drop_column("batching")
