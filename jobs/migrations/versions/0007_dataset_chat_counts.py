"""a dataset's conversation counts: rows with tools or tool calls, and assistant messages of weight 0

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tool_examples", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("untrained_messages", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("untrained_messages")
        batch_op.drop_column("tool_examples")
