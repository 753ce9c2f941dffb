"""The outbox of callbacks: a row per terminal transition of a job with a callback URL.

`schedule` adds the row inside the transaction of the transition. The service worker claims a row before
each try (so that two copies of a delivery task do not both post), records the outcome, and the reconciler
finds rows whose next try is overdue (their task was lost) and sends them again.
"""

from __future__ import annotations

import secrets

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import select

from jobs.db import db_now, session
from jobs.models import Callback, Job, JobPublic, now


def schedule(s, job: Job) -> str:
    """Add the callback of `job`'s terminal transition in the session `s` (the transition's); returns its id."""
    callback = Callback(
        id=f"cb_{secrets.token_hex(12)}",
        job_id=job.id,
        attempt=job.attempt,
        event=f"job.{job.status.value}",
        url=job.callback_url,
        payload=JobPublic.of(job).model_dump(mode="json"),
    )
    s.add(callback)
    return callback.id


class Outbox:
    def __init__(self, engine: Engine):
        self.engine = engine

    def get(self, callback_id: str) -> Callback | None:
        with session(self.engine) as s:
            return s.get(Callback, callback_id)

    def claim(self, callback_id: str, busy_s: float) -> Callback | None:
        """A pending callback whose try is due, claimed for `busy_s` (the try's time bound); None otherwise."""
        stmt = (
            update(Callback)
            .where(Callback.id == callback_id, Callback.status == "pending", Callback.next_try_at <= db_now())
            .values(tries=Callback.tries + 1, next_try_at=db_now() + busy_s)
            .returning(Callback)
        )
        with session(self.engine) as s:
            row = s.execute(stmt).scalars().first()
            s.commit()
            return row

    def _end(self, callback: Callback, status: str, **values) -> None:
        with session(self.engine) as s:
            s.execute(update(Callback).where(Callback.id == callback.id).values(status=status, **values))
            s.execute(
                update(Job)
                .where(Job.id == callback.job_id, Job.attempt == callback.attempt)
                .values(callback_status=status)
            )
            s.commit()

    def delivered(self, callback: Callback) -> None:
        self._end(callback, "delivered", delivered_at=now(), last_error=None)

    def gave_up(self, callback: Callback, error: str) -> None:
        self._end(callback, "failed", last_error=error[:2000])

    def try_failed(self, callback: Callback, error: str, retry_in_s: float) -> None:
        with session(self.engine) as s:
            s.execute(
                update(Callback)
                .where(Callback.id == callback.id)
                .values(last_error=error[:2000], next_try_at=db_now() + retry_in_s)
            )
            s.commit()

    def overdue(self, grace_s: float, limit: int = 500) -> list[Callback]:
        """Pending callbacks whose next try is more than `grace_s` late: their delivery task was lost."""
        query = (
            select(Callback).where(Callback.status == "pending", Callback.next_try_at < db_now() - grace_s).limit(limit)
        )
        with session(self.engine) as s:
            return list(s.exec(query))
