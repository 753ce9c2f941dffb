"""the model registry: registered models, their versions and aliases

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    text = sqlmodel.sql.sqltypes.AutoString
    op.create_table(
        "registered_models",
        sa.Column("tenant", text(), nullable=False),
        sa.Column("name", text(), nullable=False),
        sa.Column("description", text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "name"),
    )
    op.create_table(
        "model_versions",
        sa.Column("tenant", text(), nullable=False),
        sa.Column("name", text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("job_id", text(), nullable=False),
        sa.Column("fine_tuned_model", text(), nullable=False),
        sa.Column("source_uri", text(), nullable=False),
        sa.Column("base_model", text(), nullable=False),
        sa.Column("method", text(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("description", text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["tenant", "name"], ["registered_models.tenant", "registered_models.name"]),
        sa.PrimaryKeyConstraint("tenant", "name", "version"),
    )
    op.create_index(op.f("ix_model_versions_job_id"), "model_versions", ["job_id"], unique=False)
    op.create_table(
        "model_aliases",
        sa.Column("tenant", text(), nullable=False),
        sa.Column("name", text(), nullable=False),
        sa.Column("alias", text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["tenant", "name"], ["registered_models.tenant", "registered_models.name"]),
        sa.PrimaryKeyConstraint("tenant", "name", "alias"),
    )


def downgrade() -> None:
    op.drop_table("model_aliases")
    op.drop_index(op.f("ix_model_versions_job_id"), table_name="model_versions")
    op.drop_table("model_versions")
    op.drop_table("registered_models")
