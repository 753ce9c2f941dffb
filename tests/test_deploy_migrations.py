"""`prefq db upgrade` run by several pods of a release at once (the API's init container) leaves one schema at
head, on the local PostgreSQL: the advisory lock in jobs/migrations/env.py makes the others wait."""

from __future__ import annotations

import subprocess
import sys
import time

import psycopg

from tests.conftest import ROOT, python_env
from tests.services import PG_ADMIN, create_pg_database, drop_pg_database

RUNS = 4
UPGRADE = """
import sys, time
from jobs.db import upgrade
start = float(sys.argv[1])
time.sleep(max(0.0, start - time.time()))  # every run starts its upgrade at the same moment
upgrade(sys.argv[2])
"""


def test_concurrent_upgrades_all_succeed_and_migrate_once():
    url, name = create_pg_database()
    try:
        start = time.time() + 4  # after the imports of every process
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", UPGRADE, str(start), url],
                cwd=ROOT,
                env=python_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(RUNS)
        ]
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0] * RUNS, "\n".join(outputs)
        with psycopg.connect(PG_ADMIN.rsplit("/", 1)[0] + f"/{name}") as conn:
            versions = conn.execute("SELECT version_num FROM alembic_version").fetchall()
            tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert len(versions) == 1
        assert {"jobs", "job_events", "datasets", "workers"} <= tables
    finally:
        drop_pg_database(name)


def test_the_migrations_build_the_schema_the_models_declare(tmp_path, pg_url):
    """What `prefq db upgrade` builds is what jobs/models.py declares (alembic's autogenerate finds nothing to add)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlmodel import SQLModel

    import jobs.models  # noqa: F401 - the tables
    from jobs.db import make_engine, upgrade

    for url in (f"sqlite:///{tmp_path / 'schema.db'}", pg_url):
        upgrade(url)
        engine = make_engine(url)
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == [], url
        engine.dispose()
