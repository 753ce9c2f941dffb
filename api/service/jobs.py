"""Jobs: submit, read, list, cancel, retry, pause and resume, for one caller (`api.auth.Principal`).

Every function takes the shared services (`svc`) and the caller; another tenant's job is a `NotFound`, exactly as one
that does not exist. State changes are the job store's compare-and-set transitions; a job whose task cannot be sent
is failed (retryable) and answers `Unavailable`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from api.auth import Principal
from api.deps import Services, dispatch_callback
from api.schemas import JobCreate
from api.service import checks, graders
from api.service.errors import Conflict, Invalid, Unavailable, no_such
from api.submit import EnqueueFailed
from jobs.models import Job, JobStatus, Worker, new_id, now
from queue_config import enqueue_job, gpu_queue


@dataclass
class Submitted:
    job: Job
    created: bool  # False: an earlier request with the same idempotency key made it
    warnings: list[str] = field(default_factory=list)  # why the new job may wait


def owned(svc: Services, who: Principal, job_id: str) -> Job:
    """The job, if the caller's tenant owns it (an admin owns every job)."""
    job = svc.store.get_job(job_id)
    if job is None or not who.owns(job.tenant):
        raise no_such("job", job_id)
    return job


def list_jobs(
    svc: Services,
    who: Principal,
    status: JobStatus | None = None,
    created_after: float | None = None,
    limit: int = 20,
    after: str | None = None,
    tenant: str | None = None,
    search: str | None = None,
    metadata: dict | None = None,
    training_only: bool = False,
) -> tuple[list[Job], bool]:
    """A page of jobs, newest first, and whether more follow: the caller's tenant's, or for an admin every tenant's
    (or `tenant`'s); `training_only`: not evaluation runs."""
    scope = tenant if who.admin else who.tenant
    return svc.store.list_jobs(
        status, created_after, limit, after, scope, search=search, metadata=metadata, training_only=training_only
    )


async def submit(svc: Services, who: Principal, req: JobCreate, idempotency_key: str | None = None, **row) -> Submitted:
    """Check a job, insert its row and send its task. `row`: further columns of the job row (the OpenAI face's
    `suffix` and `integrations`)."""
    dataset_id = await checks.dataset(svc, who, req.dataset, req.method, "dataset")
    eval_id = await checks.dataset(svc, who, req.eval_dataset, req.method, "eval_dataset") if req.eval_dataset else None
    model = await checks.model(svc, who, req.model)
    spec = checks.spec(svc, req)
    if req.nodes > 1 and not svc.settings.ray_address:
        raise Invalid("no_cluster", "this server runs jobs on one node (no Ray cluster: PREFQ_RAY_ADDRESS)", "nodes")
    if spec.evaluation is not None and spec.evaluation.baseline is not None:  # named and pinned as `model` is
        try:
            baseline = await checks.model(svc, who, spec.evaluation.baseline)
        except Invalid as exc:
            exc.field = "hyperparameters.evaluation.baseline"
            raise
        evaluation = {**req.hyperparameters["evaluation"], "baseline": baseline.name}
        req = req.model_copy(update={"hyperparameters": {**req.hyperparameters, "evaluation": evaluation}})
    for root, grader in spec.graders.items():  # their judges are the tenant's (or the operator's)
        await graders.check_judges(svc, who.tenant, grader, "hyperparameters.", root)
    if req.method != "eval":  # the estimate is of training's memory
        await checks.fits(svc, spec, model)
    if req.callback_url:
        await checks.callback_url(svc, str(req.callback_url))
    await checks.room_for(svc, who)
    if idempotency_key:  # keys are per tenant: another tenant's key names nothing here
        idempotency_key = f"{who.tenant}:{idempotency_key}"
    job = Job(
        id=new_id("job"),
        tenant=who.tenant,
        method=req.method,
        trainer=req.trainer,
        gpus=req.gpus,
        nodes=req.nodes,
        model=model.name,
        dataset_id=dataset_id,
        eval_dataset_id=eval_id,
        hyperparameters=req.hyperparameters,
        callback_url=str(req.callback_url) if req.callback_url else None,
        user_metadata=req.metadata,
        idempotency_key=idempotency_key,
        max_attempts=svc.settings.max_attempts,
        **row,
    )
    warnings = unschedulable(await svc.live_workers(), job.gpus)
    events = [("queued", {"queue": gpu_queue(job.gpus)})] + [("unschedulable", {"message": w}) for w in warnings]
    if (version := model.version) is not None:  # pinned: moving the alias later changes nothing for this job
        events.append(
            (
                "registered_model",
                {
                    "requested": req.model,
                    "name": version.name,
                    "version": version.version,
                    "model": version.fine_tuned_model,
                },
            )
        )
    try:
        job, created = await asyncio.wrap_future(svc.submitter.submit(job, events))
    except EnqueueFailed as exc:
        raise _unqueued(job.id, exc) from exc
    return Submitted(job, created, warnings if created else [])


def unschedulable(live: list[Worker], gpus: int) -> list[str]:
    """A warning when no live worker takes the job's queue: it waits until one joins (or is cancelled)."""
    queue = gpu_queue(gpus)
    if any(queue in w.queues for w in live):
        return []
    largest = max((w.devices for w in live), default=0)
    return [
        f"no live worker takes {gpus}-device jobs (queue {queue}; the largest live worker has {largest} "
        "devices): the job waits until such a worker joins"
    ]


def cancel(svc: Services, who: Principal, job_id: str) -> Job:
    """A queued job is cancelled at once; a running one becomes `cancelling` until its run has stopped."""
    job = owned(svc, who, job_id)
    if job.status == JobStatus.cancelling:
        return job
    changed = svc.store.request_cancel(job_id)
    if changed is None:
        job = owned(svc, who, job_id)
        raise Conflict("job_finished", f"job {job_id} is already {job.status.value}")
    status, done = changed
    if done is None:
        svc.store.add_event(job_id, job.attempt, "cancel_requested", {"status": status.value})
    elif done.callback_id:
        dispatch_callback(svc, done.callback_id)
    return owned(svc, who, job_id)


def retry(svc: Services, who: Principal, job_id: str) -> Job:
    """A failed or cancelled job runs again as a new attempt, resuming from its newest checkpoint."""
    job = owned(svc, who, job_id)
    attempt = svc.store.retry(job_id, svc.settings.max_attempts)
    if attempt is None:
        raise Conflict(
            "not_retryable", f"job {job_id} is {job.status.value}; only failed or cancelled jobs can be retried"
        )
    svc.store.add_event(job_id, attempt, "retried", {"from_attempt": job.attempt})
    _enqueue(svc, job_id, attempt, job.gpus)
    return owned(svc, who, job_id)


def paused(job: Job) -> bool:
    """Whether the job was paused (its run stopping or stopped after a pause, until it is resumed)."""
    return job.paused_at is not None and job.status in (JobStatus.cancelling, JobStatus.cancelled)


def pause(svc: Services, who: Principal, job_id: str) -> Job:
    """The run saves a checkpoint and stops, freeing its devices; `resume` queues it again from there."""
    job = owned(svc, who, job_id)
    if job.status not in (JobStatus.queued, JobStatus.running):
        raise Conflict(
            "not_pausable",
            f"job {job_id} is {'paused' if paused(job) else job.status.value}; only "
            "queued or running jobs can be paused",
        )
    svc.store.set_paused(job_id, now())
    svc.store.add_event(job_id, job.attempt, "pause_requested", {})
    return cancel(svc, who, job_id)


def resume(svc: Services, who: Principal, job_id: str) -> Job:
    """A paused job whose run has stopped runs again as a new attempt, from its newest checkpoint."""
    job = owned(svc, who, job_id)
    if job.paused_at is None or job.status != JobStatus.cancelled:
        state = "paused" if paused(job) else job.status.value
        raise Conflict("not_paused", f"job {job_id} is {state}; only a paused job whose run has stopped can be resumed")
    attempt = svc.store.retry(job_id, svc.settings.max_attempts)
    if attempt is None:
        raise Conflict("not_paused", f"job {job_id} changed meanwhile; retrieve it and try again")
    svc.store.add_event(job_id, attempt, "resumed", {"from_attempt": job.attempt})
    _enqueue(svc, job_id, attempt, job.gpus)
    return owned(svc, who, job_id)


def _enqueue(svc: Services, job_id: str, attempt: int, gpus: int) -> None:
    """Send the task; if the broker refuses, the attempt fails (retryable) instead of waiting forever."""
    try:
        enqueue_job(svc.celery, job_id, attempt, gpus)
    except Exception as exc:  # noqa: BLE001 - kombu raises many kinds of connection errors
        done = svc.store.fail_unsent(job_id, attempt, f"broker unavailable: {exc}")
        if done and done.callback_id:
            dispatch_callback(svc, done.callback_id)
        raise _unqueued(job_id, exc) from exc


def _unqueued(job_id: str, reason: Exception) -> Unavailable:
    return Unavailable("broker_unavailable", f"job {job_id} could not be queued ({reason}); retry it later")
