"""Dashboard pages: sign-in, jobs, a job (live), compare, datasets, workers. Reads go through the job store with
the viewer's tenant, as the native routes do; another tenant's job answers 404."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import ID_PATTERN, JobId, Services, services
from api.errors import APIError
from api.routes import jobs as job_routes
from api.ui import PageError, render
from api.ui.session import Checked, Signed, clear_cookie, forget, same_origin, session_value, set_cookie
from jobs import layout
from jobs.keys import KeyStore
from jobs.models import Job, JobPublic, JobStatus
from storage import StorageError
from training.spec import MANIFEST_NAME

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
def login(request: Request, key: str = Form("", max_length=200), next: str = Form("/ui/jobs", max_length=2000),
          svc: Services = Depends(services)):  # fmt: skip
    """Exchange an API key for a session cookie; the key is not kept anywhere else."""
    if svc.settings.auth == "off":
        return RedirectResponse(_safe_next(next), status_code=303)
    if not same_origin(request):
        raise PageError(403, "Refused", "A sign-in must come from this dashboard's own page.")
    row = KeyStore(svc.store.engine).authenticate(key.strip())
    if row is None:
        return render(request, "login.html", 401, next=_safe_next(next),
                      error="This API key is not valid (unknown or revoked).")  # fmt: skip
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


def _job_list(svc: Services, viewer, status: str | None, q: str | None, after: str | None):
    try:
        wanted = JobStatus(status) if status else None
    except ValueError:
        raise PageError(422, "Bad filter", f"status: no job state {status!r}") from None
    if after and not _ID.fullmatch(after):
        raise PageError(422, "Bad page", "after: not a job id")
    q = (q or "").replace("\x00", "").strip()[:200] or None  # PostgreSQL text holds no NUL
    tenant = None if viewer.who.admin else viewer.who.tenant
    rows, more = svc.store.list_jobs(wanted, None, PAGE, after or None, tenant, search=q)
    return [JobPublic.of(j) for j in rows], (rows[-1].id if more else None)


@router.get("/jobs")
def jobs_page(request: Request, viewer: Signed, status: str | None = None, q: str | None = None,
              after: str | None = None, svc: Services = Depends(services)):  # fmt: skip
    rows, next_after = _job_list(svc, viewer, status, q, after)
    return render(request, "jobs.html", viewer=viewer, jobs=rows, next_after=next_after, status=status or "",
                  q=q or "", after=after or "", statuses=[s.value for s in JobStatus])  # fmt: skip


@router.get("/jobs/rows")
def jobs_rows(request: Request, viewer: Signed, status: str | None = None, q: str | None = None,
              after: str | None = None, svc: Services = Depends(services)):  # fmt: skip
    """The table's rows alone: the list polls them for live status."""
    rows, _ = _job_list(svc, viewer, status, q, after)
    return render(request, "_job_rows.html", viewer=viewer, jobs=rows)


def _job(svc: Services, viewer, job_id: str) -> Job:
    job = svc.store.get_job(job_id)
    if job is None or not viewer.who.owns(job.tenant):
        raise PageError(404, "Not found", f"No job with id {job_id!r}.")
    return job


def _checkpoints(svc: Services, job: Job) -> list[dict]:
    keys = svc.storage.list(layout.checkpoints_prefix(job.tenant, job.id))
    steps = layout.complete_checkpoints(job.tenant, job.id, keys, MANIFEST_NAME)
    base = layout.checkpoints_prefix(job.tenant, job.id)
    out = []
    for step, prefix in sorted(steps.items(), reverse=True):
        files = [k[len(base):] for k in keys if k.startswith(prefix)]
        out.append({"step": step, "uri": svc.storage.uri(prefix), "files": files})
    return out


def _panel(request: Request, svc: Services, viewer, job: Job, name: str):
    checkpoints, model_files, storage_error = [], [], None
    try:
        checkpoints = _checkpoints(svc, job)
        if job.status == JobStatus.succeeded:
            prefix = layout.model_prefix(job.tenant, job.id)
            model_files = [k[len(prefix):] for k in svc.storage.list(prefix)]
    except StorageError as exc:  # the page still shows the job; its files when storage answers again
        storage_error = str(exc)
    return render(request, name, viewer=viewer, job=JobPublic.of(job), checkpoints=checkpoints,
                  model_files=model_files, storage_error=storage_error)  # fmt: skip


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: JobId, viewer: Signed, svc: Services = Depends(services)):
    return _panel(request, svc, viewer, _job(svc, viewer, job_id), "job.html")


@router.get("/jobs/{job_id}/panel")
def job_panel(request: Request, job_id: JobId, viewer: Signed, svc: Services = Depends(services)):
    """Status, progress, buttons, error, eval metrics and checkpoints: re-read when an event changes them."""
    return _panel(request, svc, viewer, _job(svc, viewer, job_id), "_job_panel.html")


_EVENT_LINE = re.compile(r"^event: .*\n", re.M)


@router.get("/jobs/{job_id}/stream")
async def job_stream(request: Request, job_id: JobId, viewer: Signed, svc: Services = Depends(services)):
    """The job's events as Server-Sent Events (the API's stream, as plain messages), from the first or after
    `Last-Event-ID`."""
    await run_in_threadpool(_job, svc, viewer, job_id)
    last = request.headers.get("last-event-id", "")
    start = int(last) if last.isdigit() and int(last) <= job_routes.MAX_SEQ else 0

    async def plain():
        async for chunk in job_routes._stream(svc, job_id, start, request):
            yield _EVENT_LINE.sub("", chunk)

    return StreamingResponse(plain(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


def _action(svc: Services, viewer, job_id: str, act) -> RedirectResponse:
    try:
        act(job_id, viewer.who, svc)
    except APIError as exc:
        if exc.status == 404:
            raise PageError(404, "Not found", f"No job with id {job_id!r}.") from None
        raise PageError(exc.status, "Not done", exc.message) from None
    return RedirectResponse(f"/ui/jobs/{job_id}", status_code=303)


@router.post("/jobs/{job_id}/cancel")
def cancel(job_id: JobId, viewer: Checked, svc: Services = Depends(services)):
    return _action(svc, viewer, job_id, job_routes.cancel_job)


@router.post("/jobs/{job_id}/retry")
def retry(job_id: JobId, viewer: Checked, svc: Services = Depends(services)):
    return _action(svc, viewer, job_id, job_routes.retry_job)


@router.get("/jobs/{job_id}/files/{path:path}")
def download(job_id: JobId, path: str, viewer: Signed, svc: Services = Depends(services)) -> Response:
    """A checkpoint's or the model's file: a redirect to a presigned URL, or the file from a local folder."""
    job = _job(svc, viewer, job_id)
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


def _curves(svc: Services, job_id: str) -> dict:
    """Train and eval points of a job, per metric: {"train": {name: [[step, value]]}, "eval": {...}}."""
    train: dict[str, list] = {}
    evals: dict[str, list] = {}
    after = 0
    while True:
        events = svc.store.events_after(job_id, after, 1000)
        for e in events:
            if e.type == "progress":
                values = {"loss": e.data.get("loss"), "learning_rate": e.data.get("learning_rate"),
                          **(e.data.get("metrics") or {})}  # fmt: skip
                for name, v in values.items():
                    if isinstance(v, int | float):
                        train.setdefault(name, []).append([e.data.get("step"), v])
            elif e.type == "eval":
                for name, v in (e.data.get("metrics") or {}).items():
                    if isinstance(v, int | float):
                        evals.setdefault(name.removeprefix("eval_"), []).append([e.data.get("step"), v])
        if len(events) < 1000:
            return {"train": train, "eval": evals}
        after = events[-1].seq


@router.get("/compare")
def compare(request: Request, viewer: Signed, ids: list[str] = Query([]), svc: Services = Depends(services)):
    wanted = [i for part in ids for i in part.replace(",", " ").split() if i][:MAX_COMPARE]
    for job_id in wanted:
        if not _ID.fullmatch(job_id):
            raise PageError(422, "Bad job id", f"ids: {job_id[:80]!r} is not a job id")
    jobs = [_job(svc, viewer, j) for j in dict.fromkeys(wanted)]
    curves = {j.id: _curves(svc, j.id) for j in jobs}
    return render(request, "compare.html", viewer=viewer, jobs=[JobPublic.of(j) for j in jobs], curves=curves,
                  ids=" ".join(j.id for j in jobs))  # fmt: skip


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
