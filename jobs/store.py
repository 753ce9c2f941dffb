"""Job store: every status change is one conditional UPDATE (compare-and-set on status and attempt).

The lease: a worker that claims attempt N of a job owns it until `lease_expires_at`, and renews it with
each write. Leases are written and judged on the database's clock (`db_now`). A renewal succeeds only
while the lease has not expired, and every write a worker makes is fenced by (attempt, owner): once the
reconciler has given the job to a new attempt, the old worker's writes match no row.

Every terminal transition (succeeded, failed, cancelled) writes, in the transaction of the status change,
its terminal event, its callback in the outbox (`jobs.outbox`) and its run time in the histogram.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, insert, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from jobs import outbox
from jobs.catalog import TRIES, Catalog
from jobs.db import db_now, session
from jobs.models import ACTIVE, FINISHED, INF_BUCKET, DurationBucket, Job, JobEvent, JobStatus, now

_CLEARED = {
    "error_code": None,
    "error_message": None,
    "error_is_user": None,
    "finished_at": None,
    "lease_owner": None,
    "lease_expires_at": None,
    "callback_status": None,
    "paused_at": None,
    "queued_reason": None,
}

Events = list[tuple[str, dict]]


@dataclass
class Finished:
    """A terminal transition that happened: the job after it, and its callback's delivery id, if any."""

    job: Job
    callback_id: str | None


class JobStore(Catalog):
    """The job table: `Catalog`'s rows and reads, and every state transition of a job."""

    def create_jobs(self, items: list[tuple[Job, Events]]) -> list[tuple[Job, bool]]:
        """Insert queued jobs with their first events, all in one commit (the API's group commit). Per item,
        the job and whether it is new: a job whose idempotency key is already used, in the table or earlier in
        `items`, gives the job that holds the key. (Core inserts: the API's hottest write.)"""
        keys = [job.idempotency_key for job, _ in items if job.idempotency_key]
        holders = self._by_keys(keys) if keys else {}
        results, new = [], []
        for job, events in items:
            holder = holders.get(job.idempotency_key) if job.idempotency_key else None
            results.append((holder or job, holder is None))
            if holder is None:
                new.append((job, events))
                if job.idempotency_key:
                    holders[job.idempotency_key] = job
        if not new:
            return results
        rows = [
            {
                "job_id": job.id,
                "seq": seq,
                "attempt": job.attempt,
                "created_at": job.created_at,
                "type": kind,
                "data": data,
            }
            for job, events in new
            for seq, (kind, data) in enumerate(events, start=1)
        ]
        for job, _ in new:
            job.enqueued_at = job.created_at  # its task is sent right after this commit
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(Job), [job.model_dump() for job, _ in new])
                if rows:
                    conn.execute(insert(JobEvent), rows)
        except IntegrityError:
            # A concurrent request (another API process) took one of the keys first: one job at a time now.
            if len(items) > 1:
                return [self.create_jobs([item])[0] for item in items]
            key = items[0][0].idempotency_key
            if key and (found := self._by_keys([key]).get(key)):
                return [(found, False)]
            raise
        return results

    # -- transitions --------------------------------------------------------------------------------

    def _cas(self, job_id: str, where: list, values: dict) -> bool:
        stmt = update(Job).where(Job.id == job_id, *where).values(updated_at=now(), **values)
        with session(self.engine) as s:
            changed = s.execute(stmt).rowcount == 1
            s.commit()
        return changed

    def _fenced(self, attempt: int, owner: str) -> list:
        return [Job.attempt == attempt, Job.lease_owner == owner, col(Job.status).in_(ACTIVE)]

    def _terminal(
        self,
        job_id: str,
        where: list,
        status: JobStatus,
        values: dict,
        data: dict | None = None,
    ) -> Finished | None:
        """CAS to a terminal status; with it, in one transaction: the terminal event (its type is the status),
        the callback in the outbox, and the run time in the histogram."""
        assert status in FINISHED
        values = {
            "updated_at": now(),
            "finished_at": now(),
            "lease_owner": None,
            "lease_expires_at": None,
            **values,
            "status": status,
        }
        stmt = update(Job).where(Job.id == job_id, *where).values(**values).returning(Job)
        for _ in range(TRIES):
            with session(self.engine) as s:
                job = s.execute(stmt).scalars().first()
                if job is None:
                    s.rollback()
                    return None
                event = {"attempt": job.attempt, **(data or {})}
                if job.error_code:
                    event["error"] = {
                        "code": job.error_code,
                        "message": job.error_message,
                        "user_error": job.error_is_user,
                    }
                self._insert_event(s, job_id, job.attempt, status.value, event)
                callback_id = outbox.schedule(s, job) if job.callback_url else None
                if callback_id:
                    s.execute(update(Job).where(Job.id == job_id).values(callback_status="pending"))
                    job.callback_status = "pending"
                if job.started_at is not None:
                    self._observe(s, status, max(0.0, job.finished_at - job.started_at))
                try:
                    s.commit()
                except IntegrityError:  # another writer took the event's seq: the whole transition again
                    s.rollback()
                    continue
                s.expunge(job)
                return Finished(job, callback_id)
        raise RuntimeError(f"Job {job_id}: could not write its {status.value} transition")

    @staticmethod
    def _observe(s, status: JobStatus, seconds: float) -> None:
        s.execute(
            update(DurationBucket)
            .where(DurationBucket.status == status.value, DurationBucket.le >= seconds)
            .values(count=DurationBucket.count + 1)
        )
        s.execute(
            update(DurationBucket)
            .where(DurationBucket.status == status.value, DurationBucket.le == INF_BUCKET)
            .values(sum_s=DurationBucket.sum_s + seconds)
        )

    def claim(self, job_id: str, attempt: int, owner: str, ttl_s: float) -> Job | None:
        """Queued attempt -> running under a lease; None if the job is not this attempt's to run."""
        values = {
            "status": JobStatus.running,
            "lease_owner": owner,
            "lease_expires_at": db_now() + ttl_s,
            "started_at": func.coalesce(Job.started_at, now()),
            "queued_reason": None,
        }
        if not self._cas(job_id, [Job.attempt == attempt, Job.status == JobStatus.queued], values):
            return None
        return self.get_job(job_id)

    def record(
        self, job_id: str, attempt: int, owner: str, ttl_s: float, events: Events = (), **fields
    ) -> JobStatus | None:
        """Renew an unexpired lease, update progress fields and append events, in one transaction.

        Returns the job's status (the worker watches for `cancelling`), or None when the lease is lost: taken
        by another attempt, the job finished, or the lease expired before this renewal.
        """
        stmt = (
            update(Job)
            .where(Job.id == job_id, *self._fenced(attempt, owner), Job.lease_expires_at >= db_now())
            .values(lease_expires_at=db_now() + ttl_s, updated_at=now(), **fields)
        )
        for _ in range(TRIES):
            with session(self.engine) as s:
                if s.execute(stmt).rowcount != 1:
                    s.rollback()
                    return None
                for kind, data in events:
                    self._insert_event(s, job_id, attempt, kind, data)
                try:
                    s.commit()
                except IntegrityError:  # the API appended an event with the same seq meanwhile
                    s.rollback()
                    continue
                return s.exec(select(Job.status).where(Job.id == job_id)).one()
        raise RuntimeError(f"Job {job_id}: could not record {len(events)} event(s)")

    def finish(self, job_id: str, attempt: int, owner: str, status: JobStatus, **fields) -> Finished | None:
        """running/cancelling -> succeeded, failed or cancelled, by the lease holder."""
        return self._terminal(job_id, self._fenced(attempt, owner), status, fields)

    def request_cancel(self, job_id: str) -> tuple[JobStatus, Finished | None] | None:
        """queued -> cancelled at once; running -> cancelling (the worker stops the run). Returns the new status
        (and the transition, for a queued job), or None when the job is already finished."""
        done = self._terminal(job_id, [Job.status == JobStatus.queued], JobStatus.cancelled, {}, {"by": "user"})
        if done:
            return JobStatus.cancelled, done
        if self._cas(job_id, [Job.status == JobStatus.running], {"status": JobStatus.cancelling}):
            return JobStatus.cancelling, None
        return None

    def set_paused(self, job_id: str, at: float | None) -> None:
        self._cas(job_id, [], {"paused_at": at})

    def fail_unsent(self, job_id: str, attempt: int, message: str) -> Finished | None:
        """A queued attempt whose task could not be sent -> failed (infrastructure; retry it)."""
        values = {"error_code": "enqueue_failed", "error_message": message, "error_is_user": False}
        return self._terminal(
            job_id, [Job.attempt == attempt, Job.status == JobStatus.queued], JobStatus.failed, values
        )

    def retry(self, job_id: str, auto_attempts: int) -> int | None:
        """failed/cancelled -> queued as a new attempt; returns its number (the caller enqueues it)."""
        job = self.get_job(job_id)
        if job is None or job.status not in (JobStatus.failed, JobStatus.cancelled):
            return None
        new = job.attempt + 1
        values = {
            **_CLEARED,
            "status": JobStatus.queued,
            "attempt": new,
            "max_attempts": new + auto_attempts - 1,
            "enqueued_at": now(),
        }
        if not self._cas(job_id, [Job.attempt == job.attempt, Job.status == job.status], values):
            return None
        return new

    def requeue(
        self, job_id: str, attempt: int, owner: str | None = None, reason: str | None = None, later_s: float = 0
    ) -> bool:
        """An active attempt -> queued as attempt + 1. Fenced by `owner`: its worker hands it back (stopped in time,
        or not placed: `reason`, its task sent `later_s` from now), which costs the job none of its automatic
        attempts; or by an expired lease (the reconciler), which does."""
        where = [Job.attempt == attempt, col(Job.status).in_(ACTIVE)]
        where += [Job.lease_owner == owner] if owner else [Job.lease_expires_at < db_now()]
        values = {**_CLEARED, "status": JobStatus.queued, "attempt": attempt + 1, "enqueued_at": now()}
        if owner:  # the reconciler re-sends a task unclaimed `resend_after_s` after `enqueued_at`
            values |= {"max_attempts": Job.max_attempts + 1, "queued_reason": reason, "enqueued_at": now() + later_s}
        return self._cas(job_id, where, values)

    def expired(self) -> list[Job]:
        """Active jobs whose lease ran out: their worker died or lost the database."""
        query = select(Job).where(col(Job.status).in_(ACTIVE), Job.lease_expires_at < db_now())
        with session(self.engine) as s:
            return list(s.exec(query))

    def fail_expired(self, job: Job, status: JobStatus, **fields) -> Finished | None:
        where = [Job.attempt == job.attempt, Job.status == job.status, Job.lease_expires_at < db_now()]
        return self._terminal(job.id, where, status, {**fields, "error_is_user": fields.get("error_is_user")})

    def unclaimed(self, older_than_s: float) -> list[Job]:
        """Queued jobs whose task was sent more than `older_than_s` ago and that no worker has claimed."""
        query = select(Job).where(Job.status == JobStatus.queued, Job.enqueued_at < db_now() - older_than_s)
        with session(self.engine) as s:
            return list(s.exec(query))

    def mark_enqueued(self, job_id: str, attempt: int) -> bool:
        return self._cas(job_id, [Job.attempt == attempt, Job.status == JobStatus.queued], {"enqueued_at": now()})

    def set_callback_status(self, job_id: str, attempt: int, status: str) -> None:
        self._cas(job_id, [Job.attempt == attempt], {"callback_status": status})
