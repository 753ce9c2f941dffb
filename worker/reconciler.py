"""The reconciler: a pass over every non-terminal state, repairing what a fault left behind.

- `running`/`cancelling` with an expired lease (the worker died or lost the database): a new attempt, up to
  the job's `max_attempts`, else `failed` (`cancelled` for a job being cancelled).
- `queued`, unclaimed for `resend_after_s`, with no task waiting in its queue (the broker was wiped, the
  API died between commit and send, a worker died holding the message): its task is sent again. A message
  that a dead worker holds unacknowledged is dropped from the broker's unacked set first, so a job has at
  most one message waiting at a time. A duplicate is harmless anyway: the claim is a compare-and-set.
- pending callbacks whose next try is overdue (their delivery task was lost): sent again.

A pass runs under the `reconciler` service lease, so passes never overlap across service workers; its
counts and time are recorded for `prefq doctor`, `/readyz` and `prefq check service`.
"""

from __future__ import annotations

import functools
import logging
import time

import redis
from celery import Celery

from jobs.models import JobStatus
from jobs.outbox import Outbox
from jobs.service import ServiceLeases
from jobs.store import JobStore
from queue_config import enqueue_job, forget_unacked, gpu_queue, send_callback, task_ids_in_broker
from settings import Settings

log = logging.getLogger("prefq.worker")
LEASE = "reconciler"


@functools.cache
def _broker(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=10)


def _send(app: Celery, what: str, fn, *args) -> bool:
    try:
        fn(app, *args)
        return True
    except Exception as exc:  # noqa: BLE001 - kombu raises many kinds of connection errors; the next pass retries
        log.warning("Reconciler: could not send %s: %s", what, exc)
        return False


def _expired(settings: Settings, store: JobStore, app: Celery, counts: dict) -> None:
    for job in store.expired():
        if job.status == JobStatus.cancelling:
            done = store.fail_expired(job, JobStatus.cancelled)
        elif job.attempt < job.max_attempts and store.requeue(job.id, job.attempt):
            log.warning("Job %s: lease of attempt %s expired; queued attempt %s", job.id, job.attempt, job.attempt + 1)
            store.add_event(job.id, job.attempt + 1, "requeued", {"expired_attempt": job.attempt})
            counts["requeued"] += 1
            _send(app, f"job {job.id}", enqueue_job, job.id, job.attempt + 1, job.gpus)
            continue
        else:
            done = store.fail_expired(
                job,
                JobStatus.failed,
                error_code="lease_expired",
                error_is_user=False,
                error_message=f"the worker of attempt {job.attempt} stopped heartbeating "
                f"(attempt {job.attempt} of {job.max_attempts})",
            )
        if done:
            counts["ended"] += 1
            if done.callback_id:
                _send(app, f"callback {done.callback_id}", send_callback, done.callback_id)


def _unclaimed(settings: Settings, store: JobStore, app: Celery, counts: dict) -> None:
    jobs = store.unclaimed(settings.resend_after_s)
    if not jobs:
        return
    client = _broker(settings.broker_url)
    waiting, held = task_ids_in_broker(client, sorted({gpu_queue(j.gpus) for j in jobs}))
    for job in jobs:
        task_id = f"{job.id}.{job.attempt}"
        if task_id in waiting:
            continue  # waits for a free worker: nothing is lost
        reason = "not in the broker"
        if task_id in held:
            tag, delivered_at = held[task_id]
            if time.time() - delivered_at < settings.resend_after_s:
                continue  # just delivered: its worker is claiming it
            forget_unacked(client, tag)  # the worker that took it died; its copy must not come back later
            reason = "held by a worker that did not claim it"
        if store.mark_enqueued(job.id, job.attempt) and _send(
            app, f"job {job.id}", enqueue_job, job.id, job.attempt, job.gpus
        ):
            log.warning("Job %s: attempt %s was queued but its task was %s; sent again", job.id, job.attempt, reason)
            store.add_event(job.id, job.attempt, "resent", {"reason": reason})
            counts["resent"] += 1


def _callbacks(settings: Settings, outbox: Outbox, app: Celery, counts: dict) -> None:
    grace_s = settings.callback_timeout_s + 2 * settings.reconcile_interval_s
    for callback in outbox.overdue(grace_s):
        if _send(app, f"callback {callback.id}", send_callback, callback.id):
            counts["callbacks"] += 1


def reconcile_pass(settings: Settings, store: JobStore, app: Celery, holder: str) -> dict | None:
    """One pass, if no other service worker is in one; returns what it did (None: another pass was running)."""
    leases = ServiceLeases(store.engine)
    if not leases.acquire(LEASE, holder, ttl_s=max(60.0, 4 * settings.reconcile_interval_s)):
        return None
    counts = {"requeued": 0, "ended": 0, "resent": 0, "callbacks": 0}
    started, ok = time.monotonic(), False
    try:
        _expired(settings, store, app, counts)
        _unclaimed(settings, store, app, counts)
        _callbacks(settings, Outbox(store.engine), app, counts)
        ok = True
    finally:
        counts["duration_s"] = round(time.monotonic() - started, 3)
        leases.release(LEASE, holder, counts if ok else None)  # only a whole pass counts as a run
    return counts
