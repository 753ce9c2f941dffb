"""/v1/fine_tuning/jobs: OpenAI's face of the job table (see `api.openai.shapes` for the states and fields).

A create request is translated into the native `JobCreate` and queued as `POST /jobs` queues it; errors name
OpenAI's fields (`training_file`, `method.dpo.hyperparameters.beta`, ...). The rest of prefq's spec is reached
through one extension field, `prefq` (the SDK sends it with `extra_body={"prefq": {...}}`):
`{"trainer": "fsdp", "gpus": 4, "hyperparameters": {<training spec fields>}}`; its hyperparameters win over those
translated from OpenAI's.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request
from starlette.concurrency import run_in_threadpool

from api.auth import Caller
from api.deps import Cursor, JobId, Services, services
from api.errors import APIError, face, openai_responses, status_of
from api.openai import shapes, types
from api.openai.requests import FineTuningJobCreate, PrefqExtension
from api.schemas import JobCreate
from api.service import artifacts, events
from api.service import jobs as service
from api.service.errors import NotFound, ServiceError
from jobs.models import Job
from training.events import metrics_by_step
from training.spec import DEFAULT_LEARNING_RATE, GRPO_FIELDS

router = APIRouter(prefix="/v1/fine_tuning", tags=["openai"])
NATIVE = {
    "n_epochs": "epochs",
    "batch_size": "batch_size",
    "beta": "beta",
    "eval_interval": "eval_steps",
    "eval_samples": "sample_prompts",
    "compute_multiplier": "num_generations",
}
METHODS = {"supervised": "sft", "reinforcement": "grpo"}  # the rest are named alike
GENERATIONS = GRPO_FIELDS["num_generations"]  # answers per prompt at compute_multiplier 1


def _reinforcement(hp: dict, native: dict, where: str) -> None:
    """OpenAI's reinforcement hyperparameters as GRPO's: answers per prompt from `compute_multiplier`, and
    `batch_size` prompts of that many answers each."""
    effort = hp.pop("reasoning_effort", None)
    if effort not in (None, "default"):
        raise APIError(
            400,
            "invalid_hyperparameters",
            f"{where}.reasoning_effort: the models trained here have no reasoning-effort setting; send 'default' "
            "or leave it out",
            field=f"{where}.reasoning_effort",
        )
    multiplier = hp.pop("compute_multiplier", "auto")
    generations = GENERATIONS if multiplier == "auto" else max(2, round(GENERATIONS * multiplier))
    native["num_generations"] = generations
    if hp.get("batch_size", "auto") != "auto":
        native["batch_size"] = hp.pop("batch_size") * generations


def _native(req: FineTuningJobCreate) -> tuple[JobCreate, str]:
    """The native job, and the prefix of OpenAI's hyperparameter fields (for error messages)."""
    kind = req.method.type if req.method else "supervised"
    method = METHODS.get(kind, kind)
    given = getattr(req.method, kind, None) if req.method else None
    hp = given.hyperparameters if given else req.hyperparameters if req.method is None else None
    where = f"method.{kind}.hyperparameters" if req.method else "hyperparameters"
    native: dict[str, Any] = {}
    given_hp = hp.model_dump(exclude_none=True) if hp else {}
    if kind == "reinforcement":
        if given is None:
            raise APIError(
                400,
                "invalid_request",
                "method.reinforcement.grader: the reinforcement method needs a grader that scores the answers",
                field="method.reinforcement.grader",
            )
        native["grader"] = given.grader
        _reinforcement(given_hp, native, where)
    for name, value in given_hp.items():
        if value == "auto":
            continue
        if name == "learning_rate_multiplier":
            native["learning_rate"] = DEFAULT_LEARNING_RATE[method] * value
        else:
            native[NATIVE[name]] = value
    if req.seed is not None:
        native["seed"] = req.seed
    ext = req.prefq or PrefqExtension()
    native.update(ext.hyperparameters)
    job = JobCreate(
        model=req.model,
        dataset=req.training_file,
        eval_dataset=req.validation_file,
        method=method,
        trainer=ext.trainer,
        gpus=ext.gpus,
        hyperparameters=native,
        metadata=req.metadata or {},
    )
    return job, where


def _openai_field(field: str | None, where: str, extension: bool) -> str | None:
    """A native field name as the OpenAI request names it (this face's table)."""
    if field is None:
        return None
    if field in ("dataset", "eval_dataset"):
        return {"dataset": "training_file", "eval_dataset": "validation_file"}[field]
    if field.startswith("hyperparameters.grader"):
        return where.removesuffix(".hyperparameters") + field.removeprefix("hyperparameters")
    if field.startswith("hyperparameters."):
        name = field.split(".", 1)[1]
        back = {v: k for k, v in NATIVE.items()} | {"learning_rate": "learning_rate_multiplier"}
        if name in back and not extension:
            return f"{where}.{back[name]}"
        return "seed" if name == "seed" else f"prefq.{field}"
    if field in ("trainer", "gpus"):
        return f"prefq.{field}"
    return field


def _named(exc: ServiceError) -> tuple[str, str, str | None]:
    """The service layer's errors under `/v1`: a job is a `fine_tuning_job`."""
    if isinstance(exc, NotFound) and exc.what == "job":
        return "fine_tuning_job_not_found", f"no fine_tuning_job with id {exc.ident!r}", exc.field
    return exc.code, exc.message, exc.field


face("/v1/", _named)


@router.post("/jobs", response_model=types.FineTuningJob, responses=openai_responses(401, 429, 503))
async def create_job(
    req: FineTuningJobCreate,
    who: Caller,
    idempotency_key: str | None = Header(None, max_length=200, pattern=r"^[\x21-\x7e]+$"),
    svc: Services = Depends(services),
) -> dict:
    """Create a fine-tuning job. A repeated `Idempotency-Key` (the SDK's `extra_headers`) returns the same job."""
    if req.integrations and svc.settings.wandb_mode == "off":
        raise APIError(
            400,
            "integrations_not_configured",
            "integrations: this server does not report to Weights & Biases; send no integrations",
            field="integrations",
        )
    integrations = [i.model_dump(exclude_none=True) for i in req.integrations or []]
    native, where = _native(req)
    ext_keys = set((req.prefq.hyperparameters if req.prefq else {}).keys())
    try:
        done = await service.submit(
            svc, who, native, idempotency_key, suffix=req.suffix or None, integrations=integrations
        )
    except ServiceError as exc:
        if exc.field is None:
            raise
        name = exc.field.split(".", 1)[1] if exc.field.startswith("hyperparameters.") else None
        field = _openai_field(exc.field, where, extension=name in ext_keys)
        message = exc.message if isinstance(exc, NotFound) else f"{field}: {exc.reason}"
        raise APIError(status_of(exc), exc.code, message, field, exc.details) from None
    return shapes.fine_tuning_job(done.job)


@router.get("/jobs", response_model=types.FineTuningJobList, responses=openai_responses(401))
def list_jobs(
    request: Request,
    who: Caller,
    after: Cursor | None = None,
    limit: int = Query(20, ge=1, le=100),
    svc: Services = Depends(services),
) -> dict:
    """The tenant's jobs, newest first; `metadata[key]=value` keeps the jobs whose metadata holds that pair."""
    metadata = {}
    for key, value in request.query_params.multi_items():
        match = re.fullmatch(r"metadata\[(.{1,64})\]", key)
        if match:
            metadata[match.group(1)] = value
        elif key.startswith("metadata"):
            raise APIError(400, "invalid_request", f"{key}: filter by metadata as metadata[key]=value", field=key)
    rows, more = service.list_jobs(
        svc, who, limit=limit, after=after, tenant=who.tenant, metadata=metadata, training_only=True
    )
    data = [shapes.fine_tuning_job(j) for j in rows]
    return {"object": "list", "data": data, "has_more": more}


@router.get("/jobs/{job_id}", response_model=types.FineTuningJob, responses=openai_responses(401, 404))
def retrieve_job(job_id: JobId, who: Caller, svc: Services = Depends(services)) -> dict:
    return shapes.fine_tuning_job(service.owned(svc, who, job_id))


@router.post("/jobs/{job_id}/cancel", response_model=types.FineTuningJob, responses=openai_responses(401, 404, 409))
def cancel_job(job_id: JobId, who: Caller, svc: Services = Depends(services)) -> dict:
    """Cancel: a queued job at once, a running one once its run has stopped (answered as `cancelled` meanwhile)."""
    return shapes.fine_tuning_job(service.cancel(svc, who, job_id))


@router.post("/jobs/{job_id}/pause", response_model=types.FineTuningJob, responses=openai_responses(401, 404, 409))
def pause_job(job_id: JobId, who: Caller, svc: Services = Depends(services)) -> dict:
    """Pause: the run saves a checkpoint and stops, freeing its devices; `resume` queues it again from there."""
    return shapes.fine_tuning_job(service.pause(svc, who, job_id))


@router.post(
    "/jobs/{job_id}/resume", response_model=types.FineTuningJob, responses=openai_responses(401, 404, 409, 503)
)
def resume_job(job_id: JobId, who: Caller, svc: Services = Depends(services)) -> dict:
    """Resume a paused job: a new attempt, from its newest checkpoint."""
    return shapes.fine_tuning_job(service.resume(svc, who, job_id))


@router.get("/jobs/{job_id}/events", response_model=types.FineTuningJobEventList, responses=openai_responses(401, 404))
def list_events(
    job_id: JobId,
    who: Caller,
    after: str | None = Query(None, max_length=200),
    limit: int = Query(20, ge=1, le=1000),
    svc: Services = Depends(services),
) -> dict:
    """The job's events, newest first; pass the last id as `after` for older ones."""
    service.owned(svc, who, job_id)
    before = None
    if after is not None:
        before = shapes.event_seq(after)
        if before is None:
            raise APIError(400, "invalid_request", f"after: {after!r} is not an event id of this job", field="after")
    events = svc.store.events_before(job_id, before, limit + 1)
    data = [shapes.fine_tuning_event(job_id, e) for e in events[:limit]]
    return {"object": "list", "data": data, "has_more": len(events) > limit}


def _checkpoints(svc: Services, job: Job) -> list[dict]:
    told = events.all_events(svc, job.id, {"checkpoint", "progress", "eval"})  # one read of the job's events
    saved = {e.data.get("step"): e.created_at for e in told if e.type == "checkpoint"}
    metrics = metrics_by_step((e.type, e.data) for e in told)
    out = []
    for c in artifacts.checkpoints(svc, job):
        m = metrics.get(c.step) or metrics.get(max((s for s in metrics if s <= c.step), default=-1), {})
        accuracy = m.get("rewards/accuracies", m.get("mean_token_accuracy"))  # DPO: the reward accuracy
        out.append(
            shapes.checkpoint(
                job,
                c.step,
                saved.get(c.step, job.updated_at),
                {
                    "step": c.step,
                    "train_loss": m.get("loss"),
                    "train_mean_token_accuracy": accuracy,
                    "valid_loss": m.get("eval_loss"),
                    "valid_mean_token_accuracy": m.get("eval_rewards/accuracies", m.get("eval_mean_token_accuracy")),
                },
            )
        )
    return out


@router.get(
    "/jobs/{job_id}/checkpoints", response_model=types.FineTuningJobCheckpointList, responses=openai_responses(401, 404)
)
async def list_checkpoints(
    job_id: JobId,
    who: Caller,
    after: str | None = Query(None, max_length=200),
    limit: int = Query(10, ge=1, le=100),
    svc: Services = Depends(services),
) -> dict:
    """The job's complete checkpoints, newest first; each names a model that a new job can start from."""
    job = await run_in_threadpool(service.owned, svc, who, job_id)
    data = await run_in_threadpool(_checkpoints, svc, job)
    if after is not None:
        ids = [c["id"] for c in data]
        if after not in ids:
            raise APIError(400, "invalid_request", f"after: {after!r} is not a checkpoint of this job", field="after")
        data = data[ids.index(after) + 1 :]
    page = data[:limit]
    return {
        "object": "list",
        "data": page,
        "has_more": len(data) > limit,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
    }
