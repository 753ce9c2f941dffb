"""evaluations: their table, and the evaluation of an evaluation run's job; the nodes a job spans

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    text = sqlmodel.sql.sqltypes.AutoString
    op.create_table(
        "evals",
        sa.Column("id", text(), nullable=False),
        sa.Column("tenant", text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("name", text(), nullable=False),
        sa.Column("data_source_config", sa.JSON(), nullable=False),
        sa.Column("testing_criteria", sa.JSON(), nullable=False),
        sa.Column("user_metadata", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_evals_tenant"), "evals", ["tenant"], unique=False)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("eval_id", text(), nullable=True))
        batch_op.add_column(sa.Column("nodes", sa.Integer(), nullable=False, server_default="1"))
        batch_op.create_index(batch_op.f("ix_jobs_eval_id"), ["eval_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_eval_id"))
        batch_op.drop_column("nodes")
        batch_op.drop_column("eval_id")
    op.drop_index(op.f("ix_evals_tenant"), table_name="evals")
    op.drop_table("evals")
