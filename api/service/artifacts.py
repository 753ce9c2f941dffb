"""What a job produced: its complete checkpoints, its model's files, its artifacts, its samples, and its curves by
step, for the faces to shape. Storage keys come from `jobs.layout`; a checkpoint counts once its manifest (uploaded
last) is there."""

from __future__ import annotations

from api.deps import Services
from api.schemas import SamplesAtStep
from api.service.errors import Conflict
from api.service.events import all_events
from jobs import layout
from jobs.layout import StoredCheckpoint
from jobs.models import Job, JobStatus
from training.events import metrics_of
from training.spec import MANIFEST_NAME

MAX_SAMPLE_EVENTS = 1000


def checkpoints(svc: Services, job: Job) -> list[StoredCheckpoint]:
    """The job's complete checkpoints, newest first (`jobs.layout.list_checkpoints`)."""
    found = layout.list_checkpoints(svc.storage, job.tenant, job.id, MANIFEST_NAME)
    return [found[step] for step in sorted(found, reverse=True)]


def model_files(svc: Services, job: Job) -> tuple[str, list[str]]:
    """(prefix, keys) of the trained model's files; a `Conflict` until the job has succeeded."""
    if job.status != JobStatus.succeeded:
        raise Conflict("model_not_ready", f"job {job.id} is {job.status.value}; the model comes when it succeeds")
    prefix = layout.model_prefix(job.tenant, job.id)
    return prefix, svc.storage.list(prefix)


def artifact_files(svc: Services, job: Job) -> tuple[str, list[str]]:
    """(prefix, keys) of what the job keeps besides checkpoints and its model (`samples.json`, a W&B run)."""
    prefix = layout.artifacts_prefix(job.tenant, job.id)
    return prefix, svc.storage.list(prefix)


def samples(svc: Services, job_id: str) -> list[SamplesAtStep]:
    """The sample generations of each evaluation, oldest first."""
    events = svc.store.events_before(job_id, None, MAX_SAMPLE_EVENTS, types={"samples"})
    return [
        SamplesAtStep(
            step=e.data.get("step", 0),
            attempt=e.attempt,
            model=e.data.get("model", "policy"),
            seconds=e.data.get("seconds"),
            samples=e.data.get("samples") or [],
        )
        for e in reversed(events)
    ]


def curves(svc: Services, job_id: str) -> dict:
    """Train and eval points per metric: {"train": {name: [[step, value]]}, "eval": {name: [[step, value]]}}, the
    eval names without their `eval_` prefix."""
    out: dict[str, dict[str, list]] = {"train": {}, "eval": {}}
    for e in all_events(svc, job_id, {"progress", "eval"}):
        found = metrics_of(e.type, e.data)
        if found is None:
            continue
        step, values = found
        for name, v in values.items():
            if e.type == "progress":
                out["train"].setdefault(name, []).append([step, v])
            else:
                out["eval"].setdefault(name.removeprefix("eval_"), []).append([step, v])
    return out
