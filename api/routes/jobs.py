"""Jobs: create, read, list, events (JSON or Server-Sent Events), checkpoints, cancel, retry."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api import checks
from api.auth import Caller, Principal
from api.deps import Cursor, JobId, Services, dispatch_callback, services
from api.errors import APIError, not_found, responses
from api.schemas import (
    ArtifactsPublic,
    CheckpointPublic,
    CheckpointsPublic,
    EventPublic,
    EventsPublic,
    FilePublic,
    JobCreate,
    JobsPublic,
    ModelFilesPublic,
    SamplesAtStep,
    SamplesPublic,
    Timestamp,
)  # fmt: skip
from api.submit import EnqueueFailed
from jobs import layout
from jobs.models import Job, JobPublic, JobStatus, Worker, new_id
from jobs.perimeter import TENANT_PATTERN
from queue_config import enqueue_job, gpu_queue
from storage import Storage
from training.spec import MANIFEST_NAME

router = APIRouter(tags=["jobs"])
MAX_SEQ = 2**31 - 1  # event sequence numbers are 32-bit integers in the database


@router.post("/jobs", status_code=202, response_model=JobPublic, responses=responses(400, 401, 422, 429, 503))
async def create_job(req: JobCreate, who: Caller,
                     idempotency_key: str | None = Header(None, max_length=200, pattern=r"^[\x21-\x7e]+$"),
                     svc: Services = Depends(services)) -> JobPublic:  # fmt: skip
    """Queue a training job. A repeated `Idempotency-Key` returns the job it created the first time."""
    job, created, warnings = await queue_job(svc, who, req, idempotency_key)
    public = JobPublic.of(job)
    if created:
        public.warnings = warnings
    return public


async def queue_job(svc: Services, who: Principal, req: JobCreate, idempotency_key: str | None,
                    **row) -> tuple[Job, bool, list[str]]:  # fmt: skip
    """Check a job, insert it and send its task (both faces of the API): (job, whether it is new, why it may wait).
    `row`: further columns of the job row (the OpenAI face's `suffix` and `integrations`)."""
    dataset_id = await checks.dataset(svc, who, req.dataset, req.method, "dataset")
    eval_id = await checks.dataset(svc, who, req.eval_dataset, req.method, "eval_dataset") if req.eval_dataset else None
    version = await run_in_threadpool(checks.registered, svc, who, req.model)
    model = await checks.model(svc, who, version.fine_tuned_model if version else req.model)
    checks.spec(svc, req)
    if req.callback_url:
        await checks.callback_url(svc, str(req.callback_url))
    await checks.room_for(svc, who)
    if idempotency_key:  # keys are per tenant: another tenant's key names nothing here
        idempotency_key = f"{who.tenant}:{idempotency_key}"
    job = Job(id=new_id("job"), tenant=who.tenant, method=req.method, trainer=req.trainer, gpus=req.gpus, model=model,
              dataset_id=dataset_id, eval_dataset_id=eval_id, hyperparameters=req.hyperparameters,
              callback_url=str(req.callback_url) if req.callback_url else None, user_metadata=req.metadata,
              idempotency_key=idempotency_key, max_attempts=svc.settings.max_attempts, **row)  # fmt: skip
    warnings = _unschedulable(await svc.live_workers(), job.gpus)
    events = [("queued", {"queue": gpu_queue(job.gpus)})] + [("unschedulable", {"message": w}) for w in warnings]
    if version is not None:  # pinned: moving the alias later does not change what this job trains on
        events.append(("registered_model", {"requested": req.model, "name": version.name, "version": version.version,
                                            "model": version.fine_tuned_model}))
    try:
        job, created = await asyncio.wrap_future(svc.submitter.submit(job, events))
    except EnqueueFailed as exc:
        raise _unqueued(job.id, exc) from exc
    return job, created, warnings


def _unschedulable(live: list[Worker], gpus: int) -> list[str]:
    """A warning when no live worker takes the job's queue: it waits until one joins (or is cancelled)."""
    queue = gpu_queue(gpus)
    if any(queue in w.queues for w in live):
        return []
    largest = max((w.devices for w in live), default=0)
    return [f"no live worker takes {gpus}-device jobs (queue {queue}; the largest live worker has {largest} "
            "devices): the job waits until such a worker joins"]  # fmt: skip


def _enqueue(svc: Services, job_id: str, attempt: int, gpus: int) -> None:
    """Send the task; if the broker refuses, the attempt fails (retryable) instead of waiting forever."""
    try:
        enqueue_job(svc.celery, job_id, attempt, gpus)
    except Exception as exc:  # noqa: BLE001 - kombu raises many kinds of connection errors
        done = svc.store.fail_unsent(job_id, attempt, f"broker unavailable: {exc}")
        if done and done.callback_id:
            dispatch_callback(svc, done.callback_id)
        raise _unqueued(job_id, exc) from exc


def _unqueued(job_id: str, reason: Exception) -> APIError:
    return APIError(503, "broker_unavailable", f"job {job_id} could not be queued ({reason}); retry it later")


@router.get("/jobs", response_model=JobsPublic, responses=responses(401, 422))
def list_jobs(who: Caller, status: JobStatus | None = None, created_after: Timestamp | None = None,
              limit: int = Query(20, ge=1, le=100), after: Cursor | None = None,
              tenant: str | None = Query(None, pattern=TENANT_PATTERN, description="admin keys: one tenant's"),
              svc: Services = Depends(services)) -> JobsPublic:  # fmt: skip
    """The tenant's jobs, newest first (an admin key sees every tenant's, or `tenant`'s). Pass `next_cursor` as
    `after` for the next page."""
    rows, more = svc.store.list_jobs(status, created_after, limit, after, tenant if who.admin else who.tenant)
    return JobsPublic(data=[JobPublic.of(j) for j in rows], has_more=more, next_cursor=rows[-1].id if more else None)


def _job(svc: Services, who: Principal, job_id: str) -> Job:
    """The job, if the key's tenant owns it: another tenant's job answers exactly as one that does not exist."""
    job = svc.store.get_job(job_id)
    if job is None or not who.owns(job.tenant):
        raise not_found("job", job_id)
    return job


@router.get("/jobs/{job_id}", response_model=JobPublic, responses=responses(401, 404, 422))
def get_job(job_id: JobId, who: Caller, svc: Services = Depends(services)) -> JobPublic:
    return JobPublic.of(_job(svc, who, job_id))


def _event(e) -> dict:
    return EventPublic(seq=e.seq, attempt=e.attempt, created_at=e.created_at, type=e.type, data=e.data).model_dump()


async def _stream(svc: Services, job_id: str, after: int, request: Request):
    """Events as they come, until the job has finished and its terminal event (written in the transaction of
    the status change) has been sent."""
    idle, finished = 0.0, False
    while not await request.is_disconnected():
        events = await asyncio.to_thread(svc.store.events_after, job_id, after)
        for e in events:
            after = e.seq
            yield f"id: {e.seq}\nevent: {e.type}\ndata: {json.dumps(_event(e))}\n\n"
        if events:
            continue
        if finished:
            return  # one more read after the job finished: its terminal event is in
        job = await asyncio.to_thread(svc.store.get_job, job_id)
        if job is None or job.status.finished:
            finished = True
            continue
        idle += 0.5
        if idle >= 15:
            idle = 0.0
            yield ": keep-alive\n\n"
        await asyncio.sleep(0.5)


@router.get("/jobs/{job_id}/events", response_model=EventsPublic, responses={
    **responses(401, 404, 422), 200: {"content": {"text/event-stream": {}}, "description": "JSON, or an SSE stream"}})
def job_events(job_id: JobId, who: Caller, request: Request, after: int = Query(0, ge=0, le=MAX_SEQ),
               limit: int = Query(1000, ge=1, le=1000), svc: Services = Depends(services)):  # fmt: skip
    """Events with a sequence number above `after`; a live stream with `Accept: text/event-stream`."""
    _job(svc, who, job_id)
    if "text/event-stream" in request.headers.get("accept", ""):
        last = request.headers.get("last-event-id", "")
        start = int(last) if last.isdigit() and int(last) <= MAX_SEQ else after
        return StreamingResponse(_stream(svc, job_id, start, request), media_type="text/event-stream")
    events = svc.store.events_after(job_id, after, limit)
    return EventsPublic(data=[_event(e) for e in events], last_seq=events[-1].seq if events else after)


def _files(storage: Storage, prefix: str, keys: list[str]) -> list[FilePublic]:
    return [FilePublic(name=k[len(prefix):], url=storage.presigned_url(k)) for k in keys]


@router.get("/jobs/{job_id}/checkpoints", response_model=CheckpointsPublic, responses=responses(401, 404, 422))
def job_checkpoints(job_id: JobId, who: Caller, svc: Services = Depends(services)) -> CheckpointsPublic:
    """Complete checkpoints (manifest uploaded), newest first, with download URLs."""
    job = _job(svc, who, job_id)
    keys = svc.storage.list(layout.checkpoints_prefix(job.tenant, job_id))
    steps = layout.complete_checkpoints(job.tenant, job_id, keys, MANIFEST_NAME)
    data = [
        CheckpointPublic(step=step, uri=svc.storage.uri(prefix),
                         files=_files(svc.storage, prefix, [k for k in keys if k.startswith(prefix)]))
        for step, prefix in sorted(steps.items(), reverse=True)
    ]  # fmt: skip
    return CheckpointsPublic(data=data)


@router.get("/jobs/{job_id}/model", response_model=ModelFilesPublic, responses=responses(401, 404, 409, 422))
def job_model(job_id: JobId, who: Caller, svc: Services = Depends(services)) -> ModelFilesPublic:
    """The trained model's files with download URLs, once the job has succeeded."""
    job = _job(svc, who, job_id)
    if job.status != JobStatus.succeeded:
        raise APIError(409, "model_not_ready", f"job {job_id} is {job.status.value}; the model comes when it succeeds")
    prefix = layout.model_prefix(job.tenant, job_id)
    return ModelFilesPublic(uri=svc.storage.uri(prefix), files=_files(svc.storage, prefix, svc.storage.list(prefix)))


@router.get("/jobs/{job_id}/artifacts", response_model=ArtifactsPublic, responses=responses(401, 404, 422))
def job_artifacts(job_id: JobId, who: Caller, svc: Services = Depends(services)) -> ArtifactsPublic:
    """What the job keeps besides checkpoints and its model (`samples.json`, an offline W&B run), with download
    URLs."""
    job = _job(svc, who, job_id)
    prefix = layout.artifacts_prefix(job.tenant, job_id)
    return ArtifactsPublic(data=_files(svc.storage, prefix, svc.storage.list(prefix)))


MAX_SAMPLE_EVENTS = 1000


@router.get("/jobs/{job_id}/samples", response_model=SamplesPublic, responses=responses(401, 404, 422))
def job_samples(job_id: JobId, who: Caller, svc: Services = Depends(services)) -> SamplesPublic:
    """The sample generations of each evaluation, oldest first: the policy's at every evaluation, the reference's
    once (`sample_prompts` in the spec)."""
    _job(svc, who, job_id)
    return SamplesPublic(data=samples_of(svc, job_id))


def samples_of(svc: Services, job_id: str) -> list[SamplesAtStep]:
    events = svc.store.events_before(job_id, None, MAX_SAMPLE_EVENTS, types={"samples"})
    return [SamplesAtStep(step=e.data.get("step", 0), attempt=e.attempt, model=e.data.get("model", "policy"),
                          seconds=e.data.get("seconds"), samples=e.data.get("samples") or [])
            for e in reversed(events)]  # fmt: skip


@router.post("/jobs/{job_id}/cancel", response_model=JobPublic, responses=responses(401, 404, 409, 422))
def cancel_job(job_id: JobId, who: Caller, svc: Services = Depends(services)) -> JobPublic:
    """A queued job is cancelled at once; a running one becomes `cancelling` until its run has stopped."""
    job = _job(svc, who, job_id)
    if job.status == JobStatus.cancelling:
        return JobPublic.of(job)
    changed = svc.store.request_cancel(job_id)
    if changed is None:
        job = _job(svc, who, job_id)
        raise APIError(409, "job_finished", f"job {job_id} is already {job.status.value}")
    status, done = changed
    if done is None:
        svc.store.add_event(job_id, job.attempt, "cancel_requested", {"status": status.value})
    elif done.callback_id:
        dispatch_callback(svc, done.callback_id)
    return JobPublic.of(_job(svc, who, job_id))


@router.post("/jobs/{job_id}/retry", status_code=202, response_model=JobPublic,
             responses=responses(401, 404, 409, 422, 503))  # fmt: skip
def retry_job(job_id: JobId, who: Caller, svc: Services = Depends(services)) -> JobPublic:
    """A failed or cancelled job runs again as a new attempt, resuming from its newest checkpoint."""
    job = _job(svc, who, job_id)
    attempt = svc.store.retry(job_id, svc.settings.max_attempts)
    if attempt is None:
        raise APIError(409, "not_retryable", f"job {job_id} is {job.status.value}; only failed or cancelled jobs "
                       "can be retried")  # fmt: skip
    svc.store.add_event(job_id, attempt, "retried", {"from_attempt": job.attempt})
    _enqueue(svc, job_id, attempt, job.gpus)
    return JobPublic.of(_job(svc, who, job_id))
