"""Jobs: create, read, list, events (JSON or Server-Sent Events), checkpoints, cancel, retry."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.deps import Services, services
from api.errors import APIError, not_found
from api.schemas import (
    CheckpointPublic,
    CheckpointsPublic,
    EventPublic,
    EventsPublic,
    FilePublic,
    JobCreate,
    JobsPublic,
    ModelFilesPublic,
)  # fmt: skip
from api.submit import EnqueueFailed
from jobs import layout
from jobs.models import Job, JobPublic, JobStatus, Worker, new_id
from queue_config import enqueue_job, gpu_queue
from storage import Storage, StorageError, open_uri
from training.spec import MANIFEST_NAME, TrainingSpec, describe_errors

router = APIRouter(tags=["jobs"])
TOP_LEVEL = {"method", "trainer", "gpus"}  # spec fields set on the job itself
RESERVED = TOP_LEVEL | {"model", "train_file", "eval_file"}


# POST /jobs runs on the event loop (no thread per request): what may block goes to the thread pool.
async def _dataset(svc: Services, ref: str, method: str, field: str) -> str:
    if ref.startswith("ds_"):
        dataset = await svc.dataset(ref)
        if dataset is None:
            raise APIError(422, "dataset_not_found", f"{field}: no dataset with id {ref!r}", field=field)
        if dataset.method != method:
            raise APIError(422, "dataset_method_mismatch",
                           f"{field}: {ref} holds {dataset.method} data ({dataset.format}); the job's method is {method}",
                           field=field)  # fmt: skip
        return ref
    if not await run_in_threadpool(_uri_exists, svc, ref, field):
        raise APIError(422, "dataset_not_found", f"{field}: nothing stored at {ref}", field=field)
    return ref


def _uri_exists(svc: Services, uri: str, field: str, suffix: str = "") -> bool:
    try:
        storage, key = open_uri(uri, **svc.settings.storage_options())
        return storage.exists(key.rstrip("/") + suffix)
    except StorageError as exc:
        raise APIError(422, "invalid_uri", f"{field}: {exc}", field=field) from None


async def _check_model(svc: Services, model: str) -> None:
    if "://" in model:
        found = await run_in_threadpool(_uri_exists, svc, model, "model", "/config.json")
    else:
        found = (Path(model) / "config.json").is_file()  # one local stat: cheaper than a thread hop
    if not found:
        raise APIError(422, "model_not_found",
                       f"model: no model folder (config.json) at {model}; give a folder the workers can read "
                       "or a storage URI", field="model")  # fmt: skip


def _check_spec(req: JobCreate) -> None:
    clash = sorted(RESERVED & req.hyperparameters.keys())
    if clash:
        raise APIError(422, "invalid_hyperparameters", f"hyperparameters.{clash[0]}: set it at the top level of "
                       "the job", field=f"hyperparameters.{clash[0]}")  # fmt: skip
    data = {**req.hyperparameters, "method": req.method, "trainer": req.trainer, "gpus": max(1, req.gpus),
            "model": req.model, "train_file": "-"}  # fmt: skip
    try:
        TrainingSpec.model_validate(data)
    except ValidationError as exc:
        details = [
            {**e, "field": e["field"] if e["field"].split(".")[0] in TOP_LEVEL else f"hyperparameters.{e['field']}"}
            for e in describe_errors(exc)
        ]
        first = details[0]
        raise APIError(422, "invalid_hyperparameters", f"{first['field']}: {first['reason']}", field=first["field"],
                       details=details) from None  # fmt: skip


@router.post("/jobs", status_code=202, response_model=JobPublic)
async def create_job(req: JobCreate, idempotency_key: str | None = Header(None, max_length=200),
                     svc: Services = Depends(services)) -> JobPublic:  # fmt: skip
    """Queue a training job. A repeated `Idempotency-Key` returns the job it created the first time."""
    dataset_id = await _dataset(svc, req.dataset, req.method, "dataset")
    eval_id = await _dataset(svc, req.eval_dataset, req.method, "eval_dataset") if req.eval_dataset else None
    await _check_model(svc, req.model)
    _check_spec(req)
    if req.callback_url and svc.settings.callback_secret is None:
        raise APIError(422, "callbacks_disabled", "callback_url: this server has no PREFQ_CALLBACK_SECRET to sign "
                       "callbacks with", field="callback_url")  # fmt: skip
    job = Job(id=new_id("job"), method=req.method, trainer=req.trainer, gpus=req.gpus, model=req.model,
              dataset_id=dataset_id, eval_dataset_id=eval_id, hyperparameters=req.hyperparameters,
              callback_url=str(req.callback_url) if req.callback_url else None, user_metadata=req.metadata,
              idempotency_key=idempotency_key, max_attempts=svc.settings.max_attempts)  # fmt: skip
    warnings = _unschedulable(await svc.live_workers(), job.gpus)
    events = [("queued", {"queue": gpu_queue(job.gpus)})] + [("unschedulable", {"message": w}) for w in warnings]
    try:
        job, created = await asyncio.wrap_future(svc.submitter.submit(job, events))
    except EnqueueFailed as exc:
        raise _unqueued(job.id, exc) from exc
    public = JobPublic.of(job)
    if created:
        public.warnings = warnings
    return public


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
        svc.store.fail_unsent(job_id, attempt, f"broker unavailable: {exc}")
        raise _unqueued(job_id, exc) from exc


def _unqueued(job_id: str, reason: Exception) -> APIError:
    return APIError(503, "broker_unavailable", f"job {job_id} could not be queued ({reason}); retry it later")


@router.get("/jobs", response_model=JobsPublic)
def list_jobs(status: JobStatus | None = None, created_after: float | None = None,
              limit: int = Query(20, ge=1, le=100), after: str | None = Query(None, description="cursor"),
              svc: Services = Depends(services)) -> JobsPublic:  # fmt: skip
    """Jobs, newest first. Pass `next_cursor` as `after` for the next page."""
    rows, more = svc.store.list_jobs(status, created_after, limit, after)
    return JobsPublic(data=[JobPublic.of(j) for j in rows], has_more=more, next_cursor=rows[-1].id if more else None)


def _job(svc: Services, job_id: str) -> Job:
    job = svc.store.get_job(job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


@router.get("/jobs/{job_id}", response_model=JobPublic)
def get_job(job_id: str, svc: Services = Depends(services)) -> JobPublic:
    return JobPublic.of(_job(svc, job_id))


def _event(e) -> dict:
    return EventPublic(seq=e.seq, attempt=e.attempt, created_at=e.created_at, type=e.type, data=e.data).model_dump()


async def _stream(svc: Services, job_id: str, after: int, request: Request):
    idle = 0.0
    while not await request.is_disconnected():
        events = await asyncio.to_thread(svc.store.events_after, job_id, after)
        for e in events:
            after = e.seq
            yield f"id: {e.seq}\nevent: {e.type}\ndata: {json.dumps(_event(e))}\n\n"
        if not events:
            job = await asyncio.to_thread(svc.store.get_job, job_id)
            if job.status.finished:
                return
            idle += 0.5
            if idle >= 15:
                idle = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(0.5)


@router.get("/jobs/{job_id}/events", response_model=EventsPublic)
def job_events(job_id: str, request: Request, after: int = Query(0, ge=0), limit: int = Query(1000, ge=1, le=1000),
               svc: Services = Depends(services)):  # fmt: skip
    """Events with a sequence number above `after`; a live stream with `Accept: text/event-stream`."""
    _job(svc, job_id)
    if "text/event-stream" in request.headers.get("accept", ""):
        return StreamingResponse(_stream(svc, job_id, after, request), media_type="text/event-stream")
    events = svc.store.events_after(job_id, after, limit)
    return EventsPublic(data=[_event(e) for e in events], last_seq=events[-1].seq if events else after)


def _files(storage: Storage, prefix: str, keys: list[str]) -> list[FilePublic]:
    return [FilePublic(name=k[len(prefix):], url=storage.presigned_url(k)) for k in keys]


@router.get("/jobs/{job_id}/checkpoints", response_model=CheckpointsPublic)
def job_checkpoints(job_id: str, svc: Services = Depends(services)) -> CheckpointsPublic:
    """Complete checkpoints (manifest uploaded), newest first, with download URLs."""
    _job(svc, job_id)
    keys = svc.storage.list(layout.checkpoints_prefix(job_id))
    steps = layout.complete_checkpoints(job_id, keys, MANIFEST_NAME)
    data = [
        CheckpointPublic(step=step, uri=svc.storage.uri(prefix),
                         files=_files(svc.storage, prefix, [k for k in keys if k.startswith(prefix)]))
        for step, prefix in sorted(steps.items(), reverse=True)
    ]  # fmt: skip
    return CheckpointsPublic(data=data)


@router.get("/jobs/{job_id}/model", response_model=ModelFilesPublic)
def job_model(job_id: str, svc: Services = Depends(services)) -> ModelFilesPublic:
    """The trained model's files with download URLs, once the job has succeeded."""
    job = _job(svc, job_id)
    if job.status != JobStatus.succeeded:
        raise APIError(409, "model_not_ready", f"job {job_id} is {job.status.value}; the model comes when it succeeds")
    prefix = layout.model_prefix(job_id)
    return ModelFilesPublic(uri=svc.storage.uri(prefix), files=_files(svc.storage, prefix, svc.storage.list(prefix)))


@router.post("/jobs/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, svc: Services = Depends(services)) -> JobPublic:
    """A queued job is cancelled at once; a running one becomes `cancelling` until its run has stopped."""
    job = _job(svc, job_id)
    if job.status == JobStatus.cancelling:
        return JobPublic.of(job)
    status = svc.store.request_cancel(job_id)
    if status is None:
        job = _job(svc, job_id)
        raise APIError(409, "job_finished", f"job {job_id} is already {job.status.value}")
    svc.store.add_event(job_id, job.attempt, "cancel_requested", {"status": status.value})
    return JobPublic.of(_job(svc, job_id))


@router.post("/jobs/{job_id}/retry", status_code=202, response_model=JobPublic)
def retry_job(job_id: str, svc: Services = Depends(services)) -> JobPublic:
    """A failed or cancelled job runs again as a new attempt, resuming from its newest checkpoint."""
    job = _job(svc, job_id)
    attempt = svc.store.retry(job_id, svc.settings.max_attempts)
    if attempt is None:
        raise APIError(409, "not_retryable", f"job {job_id} is {job.status.value}; only failed or cancelled jobs "
                       "can be retried")  # fmt: skip
    svc.store.add_event(job_id, attempt, "retried", {"from_attempt": job.attempt})
    _enqueue(svc, job_id, attempt, job.gpus)
    return JobPublic.of(_job(svc, job_id))
