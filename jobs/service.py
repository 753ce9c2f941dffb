"""What the service processes share in the database: named leases (one reconciler pass at a time, one
exporter of database-wide metrics), and the database-wide figures that the exporter reads."""

from __future__ import annotations

from sqlalchemy import func, update
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from jobs.db import db_now, session
from jobs.models import DurationBucket, Job, ServiceLease, now


class ServiceLeases:
    def __init__(self, engine: Engine):
        self.engine = engine

    def acquire(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take (or renew) the lease `name` for `holder`, if it is free, expired or already `holder`'s."""
        stmt = (
            update(ServiceLease)
            .where(ServiceLease.name == name, (ServiceLease.holder == holder) | (ServiceLease.expires_at < db_now()))
            .values(holder=holder, expires_at=db_now() + ttl_s)
        )
        with session(self.engine) as s:
            taken = s.execute(stmt).rowcount == 1
            s.commit()
        return taken

    def release(self, name: str, holder: str, result: dict | None = None) -> None:
        """Free the lease; with `result`, record it as the last run's."""
        values = {"holder": None, "expires_at": 0.0}
        if result is not None:
            values.update(last_run_at=now(), last_result=result)
        with session(self.engine) as s:
            s.execute(
                update(ServiceLease).where(ServiceLease.name == name, ServiceLease.holder == holder).values(**values)
            )
            s.commit()

    def get(self, name: str) -> ServiceLease | None:
        with session(self.engine) as s:
            return s.get(ServiceLease, name)


def count_by_status(engine: Engine) -> dict[str, int]:
    with session(engine) as s:
        rows = s.exec(select(Job.status, func.count()).group_by(Job.status)).all()
    return {getattr(status, "value", status): n for status, n in rows}


def duration_buckets(engine: Engine) -> list[DurationBucket]:
    """The run-time histogram's rows, by status and upper bound."""
    with session(engine) as s:
        return list(s.exec(select(DurationBucket).order_by(col(DurationBucket.status), col(DurationBucket.le))))
