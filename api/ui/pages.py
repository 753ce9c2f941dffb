"""Dashboard pages: sign-in, jobs, a job (live), compare, datasets, workers. Reads go through the job store with
the viewer's tenant, as the native routes do; another tenant's job answers 404."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import unquote, urlsplit

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from api.deps import ID_PATTERN, JobId, Services, services
from api.errors import status_of
from api.service import artifacts, evals, events
from api.service import jobs as service
from api.service.errors import NotFound, ServiceError
from api.ui import PageError, render
from api.ui.session import Checked, Signed, clear_cookie, forget, same_origin, session_value, set_cookie
from jobs import layout
from jobs.keys import KeyStore
from jobs.models import Job, JobPublic, JobStatus
from storage import StorageError

router = APIRouter(prefix="/ui", include_in_schema=False)
PAGE = 25
MAX_COMPARE = 8
_ID = re.compile(ID_PATTERN)


def _safe_next(target: str | None) -> str:
    """Only a path of the dashboard: a sign-in never sends anyone elsewhere."""
    if target and target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/jobs"


@router.get("/login")
def login_form(request: Request, next: str | None = None):
    return render(request, "login.html", next=_safe_next(next))


@router.post("/login")
def login(
    request: Request,
    key: str = Form("", max_length=200),
    next: str = Form("/ui/jobs", max_length=2000),
    svc: Services = Depends(services),
):
    """Exchange an API key for a session cookie; the key is not kept anywhere else."""
    if svc.settings.auth == "off":
        return RedirectResponse(_safe_next(next), status_code=303)
    if not same_origin(request):
        raise PageError(403, "Refused", "A sign-in must come from this dashboard's own page.")
    row = KeyStore(svc.store.engine).authenticate(key.strip())
    if row is None:
        return render(
            request, "login.html", 401, next=_safe_next(next), error="This API key is not valid (unknown or revoked)."
        )
    forget(row.id)
    response = RedirectResponse(_safe_next(next), status_code=303)
    set_cookie(response, request, session_value(row))
    return response


@router.post("/logout")
def logout(viewer: Checked):
    response = RedirectResponse("/ui/login", status_code=303)
    clear_cookie(response)
    return response


@router.get("")
@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=303)


@dataclass
class JobFilter:
    """The job list's query: a status, a search in ids and metadata, the page after a job id."""

    status: str | None = None
    q: str | None = None
    after: str | None = None

    def page(self, svc: Services, viewer) -> tuple[list[JobPublic], str | None]:
        """The viewer's jobs that match, and the id to ask the next page after."""
        try:
            wanted = JobStatus(self.status) if self.status else None
        except ValueError:
            raise PageError(422, "Bad filter", f"status: no job state {self.status!r}") from None
        if self.after and not _ID.fullmatch(self.after):
            raise PageError(422, "Bad page", "after: not a job id")
        search = (self.q or "").strip()[:200] or None  # a NUL never gets here (`api.text`)
        rows, more = service.list_jobs(svc, viewer.who, wanted, None, PAGE, self.after or None, search=search)
        return [JobPublic.of(j) for j in rows], (rows[-1].id if more else None)


Filter = Annotated[JobFilter, Depends()]


@router.get("/jobs")
def jobs_page(request: Request, viewer: Signed, wanted: Filter, svc: Services = Depends(services)):
    rows, next_after = wanted.page(svc, viewer)
    statuses = [s.value for s in JobStatus]
    return render(
        request,
        "jobs.html",
        viewer=viewer,
        jobs=rows,
        next_after=next_after,
        status=wanted.status or "",
        q=wanted.q or "",
        after=wanted.after or "",
        statuses=statuses,
    )


@router.get("/jobs/rows")
def jobs_rows(request: Request, viewer: Signed, wanted: Filter, svc: Services = Depends(services)):
    """The table's rows alone: the list polls them for live status."""
    rows, _ = wanted.page(svc, viewer)
    return render(request, "_job_rows.html", viewer=viewer, jobs=rows)


def page_error(exc: ServiceError) -> PageError:
    """The service layer's errors as this face shows them (its one table)."""
    if isinstance(exc, NotFound):
        return PageError(404, "Not found", f"No {exc.what} with id {exc.ident!r}.")
    return PageError(status_of(exc), "Not done", exc.message)


def owned_job(svc: Services, viewer, job_id: str) -> Job:
    """The viewer's job; another tenant's is the same 404 page as one that does not exist."""
    try:
        return service.owned(svc, viewer.who, job_id)
    except ServiceError as exc:
        raise page_error(exc) from None


def _checkpoints(svc: Services, job: Job) -> list[dict]:
    base = layout.checkpoints_prefix(job.tenant, job.id)
    return [
        {"step": c.step, "uri": svc.storage.uri(c.prefix), "files": [k[len(base) :] for k in c.keys]}
        for c in artifacts.checkpoints(svc, job)
    ]


def _panel(request: Request, svc: Services, viewer, job: Job, name: str):
    checkpoints, model_files, storage_error = [], [], None
    try:
        checkpoints = _checkpoints(svc, job)
        if job.status == JobStatus.succeeded:
            prefix, keys = artifacts.model_files(svc, job)
            model_files = [k[len(prefix) :] for k in keys]
    except StorageError as exc:  # the page still shows the job; its files when storage answers again
        storage_error = str(exc)
    return render(
        request,
        name,
        viewer=viewer,
        job=JobPublic.of(job),
        checkpoints=checkpoints,
        model_files=model_files,
        storage_error=storage_error,
        eval_runs=evals.runs_of_model(svc, job) if job.status == JobStatus.succeeded else [],
    )


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: JobId, viewer: Signed, svc: Services = Depends(services)):
    return _panel(request, svc, viewer, owned_job(svc, viewer, job_id), "job.html")


@router.get("/jobs/{job_id}/panel")
def job_panel(request: Request, job_id: JobId, viewer: Signed, svc: Services = Depends(services)):
    """Status, progress, buttons, error, eval metrics and checkpoints: re-read when an event changes them."""
    return _panel(request, svc, viewer, owned_job(svc, viewer, job_id), "_job_panel.html")


async def _viewed_job(job_id: JobId, viewer: Signed, svc: Services = Depends(services)) -> Job:
    return await run_in_threadpool(owned_job, svc, viewer, job_id)


@router.get("/jobs/{job_id}/stream", response_class=EventSourceResponse)
async def job_stream(
    request: Request, job: Annotated[Job, Depends(_viewed_job)], svc: Services = Depends(services)
) -> AsyncIterator[ServerSentEvent]:
    """The job's events as Server-Sent Events (plain messages, the event's JSON as data), from the first or after
    `Last-Event-ID`."""
    start = events.start_after(request.headers.get("last-event-id"), 0)
    async for e in events.follow(svc, job.id, start, request.is_disconnected):
        if e is not None:  # FastAPI sends the keep-alive comments of a quiet stream itself
            data = {"seq": e.seq, "attempt": e.attempt, "created_at": e.created_at, "type": e.type, "data": e.data}
            yield ServerSentEvent(raw_data=json.dumps(data), id=str(e.seq))


def _action(svc: Services, viewer, job_id: str, act) -> RedirectResponse:
    try:
        act(svc, viewer.who, job_id)
    except ServiceError as exc:
        raise page_error(exc) from None
    return RedirectResponse(f"/ui/jobs/{job_id}", status_code=303)


@router.post("/jobs/{job_id}/cancel")
def cancel(job_id: JobId, viewer: Checked, svc: Services = Depends(services)):
    return _action(svc, viewer, job_id, service.cancel)


@router.post("/jobs/{job_id}/retry")
def retry(job_id: JobId, viewer: Checked, svc: Services = Depends(services)):
    return _action(svc, viewer, job_id, service.retry)


@router.get("/jobs/{job_id}/files/{path:path}")
def download(job_id: JobId, path: str, viewer: Signed, svc: Services = Depends(services)) -> Response:
    """A checkpoint's or the model's file: a redirect to a presigned URL, or the file from a local folder."""
    job = owned_job(svc, viewer, job_id)
    parts = path.split("/")
    if parts[0] not in ("checkpoints", "model") or any(p in ("", ".", "..") for p in parts) or "\\" in path:
        raise PageError(404, "Not found", f"No file {path!r} in job {job_id}.")
    prefix = {"checkpoints": layout.checkpoints_prefix, "model": layout.model_prefix}[parts[0]](job.tenant, job.id)
    key = prefix + "/".join(parts[1:])
    if not svc.storage.exists(key):
        raise PageError(404, "Not found", f"No file {path!r} in job {job_id}.")
    try:
        url = svc.storage.presigned_url(key)
    except StorageError as exc:
        raise PageError(503, "Storage unavailable", str(exc)) from None
    if url.startswith("file://"):
        return FileResponse(Path(unquote(urlsplit(url).path)), filename=parts[-1])
    return RedirectResponse(url, status_code=302)


@router.get("/compare")
def compare(request: Request, viewer: Signed, ids: list[str] = Query([]), svc: Services = Depends(services)):
    wanted = [i for part in ids for i in part.replace(",", " ").split() if i][:MAX_COMPARE]
    for job_id in wanted:
        if not _ID.fullmatch(job_id):
            raise PageError(422, "Bad job id", f"ids: {job_id[:80]!r} is not a job id")
    jobs = [owned_job(svc, viewer, j) for j in dict.fromkeys(wanted)]
    curves = {j.id: artifacts.curves(svc, j.id) for j in jobs}
    return render(
        request,
        "compare.html",
        viewer=viewer,
        jobs=[JobPublic.of(j) for j in jobs],
        curves=curves,
        ids=" ".join(j.id for j in jobs),
    )


@router.get("/datasets")
def datasets_page(request: Request, viewer: Signed, after: str | None = None, svc: Services = Depends(services)):
    if after and not _ID.fullmatch(after):
        raise PageError(422, "Bad page", "after: not a dataset id")
    rows, more = svc.store.list_datasets(None if viewer.who.admin else viewer.who.tenant, PAGE, after)
    return render(request, "datasets.html", viewer=viewer, datasets=rows, next_after=rows[-1].id if more else None)


@router.get("/workers")
async def workers_page(request: Request, viewer: Signed, svc: Services = Depends(services)):
    if not viewer.who.admin:
        raise PageError(403, "Admins only", "The workers page needs an admin key.")
    workers = await asyncio.to_thread(svc.store.workers)
    live_since = time.time() - svc.settings.worker_live_s
    return render(request, "workers.html", viewer=viewer, workers=workers, live_since=live_since)
