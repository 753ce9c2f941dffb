"""/v1/files: OpenAI's face of the datasets table. An upload is validated as `POST /datasets` validates it; one
that does not validate is kept as a file with `status` "error" and the line-level report in `status_details`
(nothing of it is stored, and no job can use it). A job's metrics CSV (`result_files`) is a file too."""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from api.auth import Caller, Principal
from api.deps import Cursor, DatasetId, Services, services
from api.errors import APIError, not_found, openai_responses
from api.openai import shapes, types
from api.service import datasets
from api.service.errors import Invalid
from jobs.models import Dataset, Job, new_id
from storage import StorageError, open_uri

router = APIRouter(prefix="/v1", tags=["openai"])


def _own_dataset(svc: Services, who: Principal, file_id: str) -> Dataset:
    found = svc.store.get_dataset(file_id)
    if found is None or not who.owns(found.tenant):
        raise not_found("file", file_id)
    return found


def _results_job(svc: Services, who: Principal, file_id: str) -> Job | None:
    """The job whose metrics CSV `file_id` names, if it is one of the tenant's; None for any other id."""
    if not file_id.startswith(shapes.RESULTS_PREFIX):
        return None
    job = svc.store.get_job(file_id[len(shapes.RESULTS_PREFIX) :])
    if job is None or not who.owns(job.tenant) or not job.status.finished:
        raise not_found("file", file_id)
    return job


def _results_csv(svc: Services, job: Job) -> bytes:
    events = svc.store.events_after(job.id, 0, 100_000)
    return shapes.metrics_csv(job.method, events)


@router.post("/files", response_model=types.FileObject, responses=openai_responses(401, 413))
def create_file(
    who: Caller,
    file: UploadFile = File(description="JSONL, one example per line"),
    purpose: str = Form(description='"fine-tune", or "evals" (the rows of an evaluation run)'),
    svc: Services = Depends(services),
) -> dict:
    """Upload a training, validation or evaluation file (`purpose` "fine-tune" or "evals"); it is validated at
    once."""
    if purpose not in ("fine-tune", "evals"):
        raise APIError(
            400,
            "invalid_purpose",
            f"purpose: {purpose!r} is not supported; this server takes 'fine-tune' and 'evals' files",
            field="purpose",
        )
    filename = (file.filename or "data.jsonl")[:255]
    try:
        dataset = datasets.store(svc, who, file.file, filename, None)
    except Invalid as exc:
        file.file.seek(0, 2)
        dataset = Dataset(
            id=new_id("ds"),
            tenant=who.tenant,
            filename=filename,
            uri="",
            bytes=file.file.tell(),
            sha256="",
            rows=0,
            format="unknown",
            method="unknown",
            status="error",
            errors=exc.details or [],
        )
        svc.store.add(dataset)
    return shapes.file_object(dataset)


@router.get("/files", response_model=types.FileList, responses=openai_responses(401))
def list_files(
    who: Caller,
    purpose: str | None = None,
    limit: int = Query(10_000, ge=1, le=10_000),
    order: str = Query("desc", pattern="^desc$", description="newest first (only)"),
    after: Cursor | None = None,
    svc: Services = Depends(services),
) -> dict:
    """The tenant's files, newest first; pass the last id as `after` for the next page."""
    if purpose not in (None, "fine-tune", "evals"):  # any of the tenant's files may be an evaluation's rows
        return {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}
    rows, more = svc.store.list_datasets(who.tenant, min(limit, 100), after)
    data = [shapes.file_object(d) for d in rows]
    return {
        "object": "list",
        "data": data,
        "has_more": more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


@router.get("/files/{file_id}", response_model=types.FileObject, responses=openai_responses(401, 404))
def retrieve_file(file_id: DatasetId, who: Caller, svc: Services = Depends(services)) -> dict:
    job = _results_job(svc, who, file_id)
    if job is not None:
        return shapes.results_file(job, len(_results_csv(svc, job)))
    return shapes.file_object(_own_dataset(svc, who, file_id))


@router.get(
    "/files/{file_id}/content", responses={**openai_responses(401, 404, 503), 200: {"content": {"text/plain": {}}}}
)
async def file_content(file_id: DatasetId, who: Caller, svc: Services = Depends(services)) -> Response:
    """The file as uploaded (JSONL), or a job's metrics CSV."""
    job = await run_in_threadpool(_results_job, svc, who, file_id)
    if job is not None:
        return Response(await run_in_threadpool(_results_csv, svc, job), media_type="text/csv")
    dataset = await run_in_threadpool(_own_dataset, svc, who, file_id)
    if dataset.status != "processed":
        raise APIError(404, "file_not_stored", f"file {file_id} did not validate; its content was not kept")
    try:
        storage, key = open_uri(dataset.uri, **svc.settings.storage_options())
        data = await run_in_threadpool(storage.get_bytes, key)
    except StorageError as exc:
        raise APIError(503, "storage_unavailable", f"file {file_id} could not be read ({exc}); retry later") from None
    return Response(data, media_type="application/jsonl")


@router.delete("/files/{file_id}", response_model=types.FileDeleted, responses=openai_responses(401, 404, 409, 503))
def delete_file(file_id: DatasetId, who: Caller, svc: Services = Depends(services)) -> dict:
    """Delete a file. A file that an unfinished job trains on is kept until the job has finished (409)."""
    dataset = _own_dataset(svc, who, file_id)
    busy = svc.store.unfinished_using(file_id)
    if busy:
        raise APIError(409, "file_in_use", f"file {file_id} is used by the unfinished job {busy}")
    if dataset.uri:
        try:
            storage, key = open_uri(dataset.uri, **svc.settings.storage_options())
            storage.delete(key)
        except StorageError as exc:
            raise APIError(
                503, "storage_unavailable", f"file {file_id} could not be deleted ({exc}); retry later"
            ) from None
    svc.store.delete_dataset(file_id)  # every API process's `Services.dataset` sees it gone at once
    return {"id": file_id, "object": "file", "deleted": True}
