"""Celery tasks: thin, by id. The logic lives in `worker.supervisor` (and the phases of an attempt it runs),
`worker.reconciler`, `worker.tracking` and `jobs/`."""

from __future__ import annotations

import json
import logging
import os
import socket
import time

from celery.utils.time import get_exponential_backoff_interval

from jobs.outbox import Outbox
from jobs.perimeter import Refused, check_callback_url
from queue_config import DELIVER_CALLBACK, MIRROR_MODEL_VERSION, RECONCILE, RUN_JOB, enqueue_job, send_callback
from worker import pool
from worker.app import app, settings, storage, store
from worker.callbacks import CallbackError, post_signed
from worker.reconciler import reconcile_pass
from worker.supervisor import run_attempt
from worker.tracking import mirror_model_version as mirror

log = logging.getLogger("prefq.worker")
CALLBACK_BACKOFF_MAX_S = 600


def _dispatch(what: str, fn, *args) -> None:
    """Send a follow-up message; if the broker refuses, the reconciler sends it later (nothing is lost)."""
    try:
        fn(app, *args)
    except Exception as exc:  # noqa: BLE001 - kombu raises many kinds of connection errors
        log.warning("Could not send %s now (%s); the reconciler will", what, exc)


@app.task(name=RUN_JOB, bind=True)
def run_job(self, job_id: str, attempt: int) -> None:
    """Run one attempt of a job; a message for an attempt that is not queued (done, cancelled, taken) exits."""
    owner = f"{self.request.hostname}/{os.getpid()}/{self.request.id}"
    claim_sent = time.monotonic()
    job = store().claim(job_id, attempt, owner, settings.lease_ttl_s)
    if job is None:
        log.info("Job %s: attempt %s is not queued; skipping this message", job_id, attempt)
        return
    log.info("Job %s: attempt %s claimed by %s", job_id, attempt, owner)
    pool.set_current_job(self.request.hostname, job_id)
    try:
        with pool.handing_back_on_sigterm(self.request.hostname):
            result = run_attempt(
                settings,
                store(),
                storage(),
                job,
                owner,
                pool.pid_file(self.request.hostname),
                claim_sent,
                pool.stopping,
            )
    finally:
        pool.set_current_job(self.request.hostname, None)
    if result.requeued is not None:
        _dispatch(f"job {job_id}", enqueue_job, job_id, result.requeued, job.gpus, None, result.requeued_in_s)
    if result.finished and result.finished.callback_id:
        _dispatch(f"callback {result.finished.callback_id}", send_callback, result.finished.callback_id)


@app.task(name=DELIVER_CALLBACK, bind=True, max_retries=None)
def deliver_callback(self, callback_id: str) -> None:
    """POST a callback of the outbox, signed, with a delivery id; a failed try comes back after a jittered
    exponential backoff (Celery's), up to `callback_max_retries` tries."""
    outbox = Outbox(store().engine)
    callback = outbox.claim(callback_id, busy_s=settings.callback_timeout_s + 5)
    if callback is None:
        return  # delivered, given up, or another copy of this task has the try
    body = json.dumps(callback.payload).encode()
    try:  # again at delivery: the name may resolve elsewhere now (DNS rebinding)
        address = check_callback_url(callback.url, settings.callback_allow_private)
    except Refused as exc:
        log.warning("Job %s: callback %s refused at delivery: %s", callback.job_id, callback.id, exc)
        outbox.gave_up(callback, str(exc))
        return
    try:
        post_signed(
            callback.url,
            body,
            settings.callback_secret.get_secret_value(),
            callback.event,
            callback.id,
            settings.callback_timeout_s,
            address,
        )
    except CallbackError as exc:
        if callback.tries >= settings.callback_max_retries:
            log.warning(
                "Job %s: callback %s failed for good after %s tries: %s",
                callback.job_id,
                callback.id,
                callback.tries,
                exc,
            )
            outbox.gave_up(callback, str(exc))
            return
        countdown = get_exponential_backoff_interval(2, callback.tries, CALLBACK_BACKOFF_MAX_S, full_jitter=True)
        log.info(
            "Job %s: callback %s failed (%s); try %s in %ss",
            callback.job_id,
            callback.id,
            exc,
            callback.tries + 1,
            countdown,
        )
        outbox.try_failed(callback, str(exc), retry_in_s=countdown)
        raise self.retry(countdown=countdown) from exc
    outbox.delivered(callback)


@app.task(name=RECONCILE, bind=True)
def reconcile(self) -> None:
    """Repair what faults left behind (see `worker.reconciler`); one pass at a time across service workers (and
    across the threads of one: the holder is the pass's own task id)."""
    counts = reconcile_pass(settings, store(), app, holder=f"{socket.gethostname()}/{os.getpid()}/{self.request.id}")
    if counts and any(v for k, v in counts.items() if k != "duration_s"):
        log.info("Reconciler: %s", counts)


@app.task(
    name=MIRROR_MODEL_VERSION,
    autoretry_for=(Exception,),
    retry_backoff=5,
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=12,
)
def mirror_model_version(
    tenant: str,
    name: str,
    version: int,
    source_uri: str,
    aliases: list[str],
    metrics: dict[str, float],
    job_id: str | None = None,
) -> None:
    """Mirror a version of a tenant's registered model, and its aliases, into MLflow's registry (see
    `worker.tracking.mirror_model_version`); retried with jittered backoff while MLflow is away. Without
    `PREFQ_MLFLOW_TRACKING_URI` it does nothing."""
    if settings.mlflow_tracking_uri is None:
        log.info("Model %s version %s: no MLflow tracking URI, not mirrored", name, version)
        return
    mirror(settings, tenant, name, version, source_uri, aliases, metrics, job_id)
