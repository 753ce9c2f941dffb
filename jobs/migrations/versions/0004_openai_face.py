"""the OpenAI face: a job's suffix, integrations and pause, a file's status and errors

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("suffix", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column("integrations", sa.JSON(), nullable=False, server_default="[]"))
        batch_op.add_column(sa.Column("paused_at", sa.Float(), nullable=True))
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("status", sqlmodel.sql.sqltypes.AutoString(), nullable=False, server_default="processed")
        )
        batch_op.add_column(sa.Column("errors", sa.JSON(), nullable=False, server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("errors")
        batch_op.drop_column("status")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("paused_at")
        batch_op.drop_column("integrations")
        batch_op.drop_column("suffix")
