"""Alembic environment: runs migrations on the URL given by `jobs.db.upgrade`."""

from alembic import context
from sqlalchemy import engine_from_config, pool
from sqlmodel import SQLModel

from jobs import models  # noqa: F401 - registers the tables on SQLModel.metadata

config = context.config
target_metadata = SQLModel.metadata

connectable = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.",
                                 poolclass=pool.NullPool)  # fmt: skip
with connectable.connect() as connection:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
