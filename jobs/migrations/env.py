"""Alembic environment: runs migrations on the URL given by `jobs.db.upgrade`.

On PostgreSQL the upgrade holds a transaction-level advisory lock: every API pod runs `prefq db upgrade`
before it serves, so several run at once on a release; the first migrates, the others wait for it and
then find the schema at head. The version table is read after the lock is taken.
"""

from alembic import context
from sqlalchemy import engine_from_config, pool, text
from sqlmodel import SQLModel

from jobs import models  # noqa: F401 - registers the tables on SQLModel.metadata

MIGRATION_LOCK = 0x70726566716D6967  # b"prefqmig": the advisory lock key of `prefq db upgrade`

config = context.config
target_metadata = SQLModel.metadata

connectable = engine_from_config(
    config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool
)
with connectable.connect() as connection:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()
