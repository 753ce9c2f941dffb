"""An attempt's end: the final model uploaded and the job `succeeded`; `failed` with an error code, a message and
whose fault it was; `cancelled`; or handed back as the next attempt, which resumes from the newest checkpoint.

Each is one write fenced by the attempt and its owner (`jobs.store`): an attempt that lost its lease changes nothing.
The write is retried through a database outage for up to a lease; after that the reconciler takes the job over.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_random_exponential

from jobs import layout
from jobs.models import JobStatus
from jobs.store import Finished
from storage import StorageError, put_dir
from training.spec import EXIT_OK, EXIT_STOPPED
from worker.attempt import Attempt, JobFailed, Result
from worker.follow import Outcome

log = logging.getLogger("prefq.worker")


def conclude(a: Attempt, outcome: Outcome) -> Result:
    """The end of an attempt whose run exited; `JobFailed` for a run that failed."""
    if outcome.lease_expiring:  # stopped in time; the next attempt resumes from the newest uploaded checkpoint
        return Result(requeued=hand_back(a, "lease_expiring_attempt"))
    if outcome.cancelled:
        return Result(finished=finish(a, JobStatus.cancelled))
    if outcome.returncode == EXIT_OK and outcome.done:
        # an evaluation run's results are the job's artifacts; it has no model
        evaluation = a.job.method == "eval"
        prefix = (layout.artifacts_prefix if evaluation else layout.model_prefix)(a.job.tenant, a.job_id)
        try:
            put_dir(a.storage, Path(outcome.done["final_path"]), prefix)
        except (StorageError, OSError) as exc:
            what = "the evaluation's results" if evaluation else "the final model"
            raise JobFailed("storage_error", f"upload of {what} failed: {exc}", user_error=False) from exc
        metrics = outcome.done.get("metrics", {})
        return Result(
            finished=finish(
                a,
                JobStatus.succeeded,
                result_uri=None if evaluation else a.storage.uri(prefix),
                step=metrics.get("step", 0),
                eval_metrics=metrics.get("eval") or {},
            )
        )
    if outcome.error:
        err = outcome.error
        if not err.get("user_error"):  # for the operator: the run's own traceback, in the worker's log
            log.warning("Job %s: the run's last lines:\n%s", a.job_id, "".join(_stderr_tail(a.work, 150)))
        raise JobFailed(err.get("code", "training_failed"), err.get("message", ""), bool(err.get("user_error")))
    if outcome.returncode == EXIT_STOPPED and outcome.unplaced:  # nothing started: queued, tried again later
        later = a.settings.ray_placement_retry_s
        return Result(requeued=hand_back(a, "unplaced_attempt", outcome.unplaced, later), requeued_in_s=later)
    # the worker is shutting down (or the run was told to stop some other way): another attempt resumes it.
    # A run stopped before it could install its SIGTERM handler dies of the signal: the same hand-back.
    if outcome.returncode == EXIT_STOPPED or outcome.stopping:
        return Result(requeued=hand_back(a, "interrupted_attempt"))
    tail = "".join(_stderr_tail(a.work))
    raise JobFailed("run_crashed", f"training exited with {outcome.returncode}: {tail}", user_error=False)


def fail(a: Attempt, exc: JobFailed) -> Result:
    log.warning("Job %s: attempt %s failed: %s: %s", a.job_id, a.attempt, exc.code, exc.message)
    return Result(
        finished=finish(
            a, JobStatus.failed, error_code=exc.code, error_message=exc.message[:4000], error_is_user=exc.user_error
        )
    )


def finish(a: Attempt, status: JobStatus, **fields) -> Finished | None:
    """Move the job to `status` with `fields`, if the attempt still holds it."""
    a.tracker.finish(status, fields.get("result_uri"))  # before the job shows its end: tracking shows it too
    a.lease.flush(a.settings.lease_ttl_s)
    a.lease.close()
    done = _store_call(a, a.store.finish, a.job_id, a.attempt, a.owner, status, **fields)
    log.info("Job %s: attempt %s %s", a.job_id, a.attempt, status.value if done else "lost its lease")
    return done


def hand_back(a: Attempt, reason: str, waiting: str | None = None, later_s: float = 0) -> int | None:
    """Queue the job again as the next attempt (it resumes from the newest checkpoint), if still ours; `waiting`,
    what it waits for, is its `queued_reason` until a worker takes it again, `later_s` from now (its task is sent
    for then). An attempt handed back is no failed attempt: the job keeps as many automatic attempts as it had."""
    a.tracker.finish(None)
    a.lease.flush(a.settings.lease_ttl_s)
    a.lease.close()
    if not _store_call(a, a.store.requeue, a.job_id, a.attempt, a.owner, waiting, later_s):
        return None
    data = {reason: a.attempt} | ({"message": waiting} if waiting else {})
    _store_call(a, a.store.add_event, a.job_id, a.attempt + 1, "requeued", data)
    return a.attempt + 1


def _store_call(a: Attempt, fn, *args, **kwargs):
    """A store write at the end of the attempt, retried through a database outage for up to a lease. If the
    database stays away, it gives up (None): the lease expires and the reconciler takes the job over."""
    retrying = Retrying(
        retry=retry_if_exception_type(Exception),
        reraise=True,
        stop=stop_after_delay(a.settings.lease_ttl_s),
        wait=wait_random_exponential(multiplier=0.2, max=5),
    )
    try:
        return retrying(fn, *args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - whatever the driver raises; the reconciler recovers
        log.warning(
            "Job %s: attempt %s could not write its end (%s); the reconciler will take it over",
            a.job_id,
            a.attempt,
            exc,
        )
        return None


def _stderr_tail(work: Path, lines: int = 15) -> list[str]:
    try:
        text = (work / "train.log").read_text(errors="replace").splitlines(keepends=True)
    except OSError:
        return []
    return text[-lines:]
