"""Celery tasks: thin, by id. The logic lives in `worker.supervisor` and `jobs.store`."""

from __future__ import annotations

import logging
import os

from jobs.models import JobPublic, JobStatus
from queue_config import DELIVER_CALLBACK, RECONCILE, RUN_JOB, enqueue_job
from worker import pool
from worker.app import app, settings, storage, store
from worker.callbacks import CallbackError, post_signed
from worker.supervisor import JobRun

log = logging.getLogger("prefq.worker")


@app.task(name=RUN_JOB, bind=True)
def run_job(self, job_id: str, attempt: int) -> None:
    """Run one attempt of a job; a message for an attempt that is not queued (done, cancelled, taken) exits."""
    owner = f"{self.request.hostname}/{os.getpid()}/{self.request.id}"
    job = store().claim(job_id, attempt, owner, settings.lease_ttl_s)
    if job is None:
        log.info("Job %s: attempt %s is not queued; skipping this message", job_id, attempt)
        return
    log.info("Job %s: attempt %s claimed by %s", job_id, attempt, owner)
    store().add_event(job_id, attempt, "claimed", {"worker": self.request.hostname, "attempt": attempt})
    pool.set_current_job(self.request.hostname, job_id)
    try:
        run = JobRun(settings, store(), storage(), job_id, attempt, owner, pool.pid_file(self.request.hostname))
        requeued = run.run(job)
    finally:
        pool.set_current_job(self.request.hostname, None)
    if requeued is not None:
        enqueue_job(app, job_id, requeued, job.gpus)
        return
    job = store().get_job(job_id)
    if job.callback_url and job.status.finished and job.attempt == attempt:
        store().set_callback_status(job_id, "pending")
        app.send_task(DELIVER_CALLBACK, args=[job_id, attempt])


@app.task(name=DELIVER_CALLBACK, bind=True, max_retries=settings.callback_max_retries)
def deliver_callback(self, job_id: str, attempt: int) -> None:
    """POST the finished job to its callback URL, signed; retried with exponential backoff."""
    job = store().get_job(job_id)
    if job is None or job.attempt != attempt or not job.callback_url:
        return
    body = JobPublic.of(job).model_dump_json().encode()
    try:
        post_signed(job.callback_url, body, settings.callback_secret.get_secret_value(), f"job.{job.status.value}",
                    settings.callback_timeout_s)  # fmt: skip
    except CallbackError as exc:
        if self.request.retries >= self.max_retries:
            log.warning("Job %s: callback failed for good: %s", job_id, exc)
            store().set_callback_status(job_id, "failed")
            return
        log.info("Job %s: callback failed (%s), retry %s", job_id, exc, self.request.retries + 1)
        raise self.retry(countdown=min(600, 2 ** self.request.retries)) from exc
    store().set_callback_status(job_id, "delivered")


@app.task(name=RECONCILE)
def reconcile() -> None:
    """Jobs whose worker stopped heartbeating: a new attempt (up to max_attempts), or failed."""
    for job in store().expired():
        if job.status == JobStatus.cancelling:
            store().fail_expired(job, JobStatus.cancelled)
        elif job.attempt < job.max_attempts and store().requeue(job.id, job.attempt):
            log.warning("Job %s: lease of attempt %s expired; queued attempt %s", job.id, job.attempt, job.attempt + 1)
            store().add_event(job.id, job.attempt + 1, "requeued", {"expired_attempt": job.attempt})
            enqueue_job(app, job.id, job.attempt + 1, job.gpus)
        else:
            store().fail_expired(job, JobStatus.failed, error_code="lease_expired", error_is_user=False,
                                 error_message=f"the worker of attempt {job.attempt} stopped heartbeating")  # fmt: skip
