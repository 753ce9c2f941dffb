"""Jobs: create, read, list, events (JSON or Server-Sent Events), checkpoints, model, export, artifacts, samples, cancel,
retry. Each route is a face of `api.service`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.sse import KEEPALIVE_COMMENT, EventSourceResponse, format_sse_event

from api.auth import Caller
from api.deps import Cursor, JobId, Services, services
from api.errors import responses
from api.schemas import (
    ArtifactsPublic,
    CheckpointPublic,
    CheckpointsPublic,
    EventPublic,
    EventsPublic,
    ExportPublic,
    FilePublic,
    JobCreate,
    JobsPublic,
    MergePublic,
    ModelFilesPublic,
    SamplesPublic,
    Timestamp,
)
from api.service import artifacts, events, export
from api.service import jobs as service
from jobs.models import JobEvent, JobPublic, JobStatus
from jobs.perimeter import TENANT_PATTERN
from storage import Storage

router = APIRouter(tags=["jobs"])
IdempotencyKey = Header(None, max_length=200, pattern=r"^[\x21-\x7e]+$")


@router.post("/jobs", status_code=202, response_model=JobPublic, responses=responses(400, 401, 422, 429, 503))
async def create_job(
    req: JobCreate, who: Caller, idempotency_key: str | None = IdempotencyKey, svc: Services = Depends(services)
) -> JobPublic:
    """Queue a training job. A repeated `Idempotency-Key` returns the job it created the first time."""
    done = await service.submit(svc, who, req, idempotency_key)
    public = JobPublic.of(done.job)
    if done.created:
        public.warnings = done.warnings
    return public


@router.get("/jobs", response_model=JobsPublic, responses=responses(401, 422))
def list_jobs(
    who: Caller,
    status: JobStatus | None = None,
    created_after: Timestamp | None = None,
    limit: int = Query(20, ge=1, le=100),
    after: Cursor | None = None,
    tenant: str | None = Query(None, pattern=TENANT_PATTERN, description="admin keys: one tenant's"),
    svc: Services = Depends(services),
) -> JobsPublic:
    """The tenant's jobs, newest first (an admin key sees every tenant's, or `tenant`'s). Pass `next_cursor` as
    `after` for the next page."""
    rows, more = service.list_jobs(svc, who, status, created_after, limit, after, tenant)
    return JobsPublic(data=[JobPublic.of(j) for j in rows], has_more=more, next_cursor=rows[-1].id if more else None)


@router.get("/jobs/{job_id}", response_model=JobPublic, responses=responses(401, 404, 422))
def get_job(job_id: JobId, who: Caller, svc: Services = Depends(services)) -> JobPublic:
    return JobPublic.of(service.owned(svc, who, job_id))


def _event(e: JobEvent) -> EventPublic:
    return EventPublic(seq=e.seq, attempt=e.attempt, created_at=e.created_at, type=e.type, data=e.data)


async def _sse(stream: AsyncIterator[JobEvent | None]) -> AsyncIterator[bytes]:
    """Each event as an SSE message (`id`: its sequence number, `event`: its type); a comment while it is quiet."""
    async for e in stream:
        if e is None:
            yield KEEPALIVE_COMMENT
        else:
            yield format_sse_event(data_str=json.dumps(_event(e).model_dump()), event=e.type, id=str(e.seq))


@router.get(
    "/jobs/{job_id}/events",
    response_model=EventsPublic,
    responses={
        **responses(401, 404, 422),
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or an SSE stream"},
    },
)
def job_events(
    job_id: JobId,
    who: Caller,
    request: Request,
    after: int = Query(0, ge=0, le=events.MAX_SEQ),
    limit: int = Query(1000, ge=1, le=1000),
    svc: Services = Depends(services),
):
    """Events with a sequence number above `after`; a live stream with `Accept: text/event-stream` (resumed after
    `Last-Event-ID`), which ends with the job."""
    service.owned(svc, who, job_id)
    if "text/event-stream" in request.headers.get("accept", ""):
        start = events.start_after(request.headers.get("last-event-id"), after)
        return EventSourceResponse(_sse(events.follow(svc, job_id, start, request.is_disconnected)))
    rows = svc.store.events_after(job_id, after, limit)
    return EventsPublic(data=[_event(e).model_dump() for e in rows], last_seq=rows[-1].seq if rows else after)


def _files(storage: Storage, prefix: str, keys: list[str]) -> list[FilePublic]:
    return [FilePublic(name=k[len(prefix) :], url=storage.presigned_url(k)) for k in keys]


@router.get("/jobs/{job_id}/checkpoints", response_model=CheckpointsPublic, responses=responses(401, 404, 422))
def job_checkpoints(job_id: JobId, who: Caller, svc: Services = Depends(services)) -> CheckpointsPublic:
    """Complete checkpoints (manifest uploaded), newest first, with download URLs."""
    found = artifacts.checkpoints(svc, service.owned(svc, who, job_id))
    return CheckpointsPublic(
        data=[
            CheckpointPublic(step=c.step, uri=svc.storage.uri(c.prefix), files=_files(svc.storage, c.prefix, c.keys))
            for c in found
        ]
    )


@router.get("/jobs/{job_id}/model", response_model=ModelFilesPublic, responses=responses(401, 404, 409, 422))
def job_model(job_id: JobId, who: Caller, svc: Services = Depends(services)) -> ModelFilesPublic:
    """The trained model's files with download URLs, once the job has succeeded."""
    prefix, keys = artifacts.model_files(svc, service.owned(svc, who, job_id))
    return ModelFilesPublic(uri=svc.storage.uri(prefix), files=_files(svc.storage, prefix, keys))


@router.get("/jobs/{job_id}/export", response_model=ExportPublic, responses=responses(401, 404, 409, 422))
def job_export(
    job_id: JobId,
    who: Caller,
    format: Literal["merged", "adapter", "hf"] = Query("merged", description="merged, adapter (LoRA) or hf"),
    checkpoint: int | None = Query(None, ge=0, le=10**9, description="A checkpoint's step; none: the final model"),
    svc: Services = Depends(services),
) -> ExportPublic:
    """The model (or a checkpoint) as a folder to deploy: merged weights, the LoRA adapter alone, or the full weights
    as stored (a sharded checkpoint consolidated), with download URLs and a model card. A LoRA checkpoint exported
    as merged gives the adapter's files and the base (`merge`) to merge it into (`prefq export` does)."""
    found = export.export(svc, service.owned(svc, who, job_id), format, checkpoint)

    def files(pairs: list[tuple[str, str]]) -> list[FilePublic]:
        return [FilePublic(name=name, url=svc.storage.presigned_url(key)) for name, key in pairs]

    merge = None
    if found.merge is not None:
        merge = MergePublic(
            hub=found.merge.get("hub"),
            revision=found.merge.get("revision"),
            files=files(found.merge["files"]) if "files" in found.merge else None,
        )
    return ExportPublic(
        job_id=job_id,
        format=found.format,
        checkpoint=found.checkpoint,
        fine_tuned_model=found.fine_tuned_model,
        base_model=found.base_model,
        lora=found.lora,
        files=files(found.files),
        merge=merge,
        model_card=found.model_card,
    )


@router.get("/jobs/{job_id}/artifacts", response_model=ArtifactsPublic, responses=responses(401, 404, 422))
def job_artifacts(job_id: JobId, who: Caller, svc: Services = Depends(services)) -> ArtifactsPublic:
    """What the job keeps besides checkpoints and its model (`samples.json`, an offline W&B run), with download
    URLs."""
    prefix, keys = artifacts.artifact_files(svc, service.owned(svc, who, job_id))
    return ArtifactsPublic(data=_files(svc.storage, prefix, keys))


@router.get("/jobs/{job_id}/samples", response_model=SamplesPublic, responses=responses(401, 404, 422))
def job_samples(job_id: JobId, who: Caller, svc: Services = Depends(services)) -> SamplesPublic:
    """The sample generations of each evaluation, oldest first: the policy's at every evaluation, the reference's
    once (`sample_prompts` in the spec)."""
    service.owned(svc, who, job_id)
    return SamplesPublic(data=artifacts.samples(svc, job_id))


@router.post("/jobs/{job_id}/cancel", response_model=JobPublic, responses=responses(401, 404, 409, 422))
def cancel_job(job_id: JobId, who: Caller, svc: Services = Depends(services)) -> JobPublic:
    """A queued job is cancelled at once; a running one becomes `cancelling` until its run has stopped."""
    return JobPublic.of(service.cancel(svc, who, job_id))


@router.post(
    "/jobs/{job_id}/retry", status_code=202, response_model=JobPublic, responses=responses(401, 404, 409, 422, 503)
)
def retry_job(job_id: JobId, who: Caller, svc: Services = Depends(services)) -> JobPublic:
    """A failed or cancelled job runs again as a new attempt, resuming from its newest checkpoint."""
    return JobPublic.of(service.retry(svc, who, job_id))
