"""The model registry (`jobs.registry`) for one caller: promote a succeeded job's model to the next version of a
name, read a registered model with its versions and aliases, move aliases. Names are per tenant: another tenant's
name is a `NotFound`, as one that does not exist. With MLflow configured, every change is mirrored into MLflow's
registry by the service worker (`worker.tracking.mirror_model_version`)."""

from __future__ import annotations

import logging

from api.auth import Principal
from api.deps import Services
from api.schemas import ModelVersionPublic, RegisteredModelPublic
from api.service.errors import Conflict, Invalid, no_such
from api.service.events import all_events
from jobs import layout, modelref
from jobs.models import JobStatus, ModelVersion, RegisteredModel
from jobs.registry import RegistryError
from queue_config import send_model_mirror
from training.spec import MANIFEST_NAME

log = logging.getLogger("prefq.api")


def owned(svc: Services, who: Principal, name: str) -> RegisteredModel:
    found = svc.registry.get(who.tenant, name)
    if found is None:
        raise no_such("model", name)
    return found


def public(svc: Services, m: RegisteredModel, with_versions: bool) -> RegisteredModelPublic:
    """A registered model with its newest version and aliases (and every version, newest first)."""
    versions = svc.registry.versions(m.tenant, m.name)
    aliases = svc.registry.aliases(m.tenant, m.name)
    return RegisteredModelPublic(
        name=m.name,
        tenant=m.tenant,
        description=m.description,
        created_at=m.created_at,
        updated_at=m.updated_at,
        latest_version=versions[0].version if versions else None,
        aliases=aliases,
        versions=[ModelVersionPublic.of(v, aliases) for v in versions] if with_versions else None,
    )


def listed(svc: Services, who: Principal) -> list[RegisteredModelPublic]:
    """The tenant's registered models, most recently changed first."""
    return [public(svc, m, False) for m in svc.registry.models(who.tenant)]


def promote(
    svc: Services,
    who: Principal,
    name: str,
    job_id: str,
    aliases: list[str],
    description: str | None = None,
    checkpoint: int | None = None,
    best: bool = False,
    require: dict[str, float] | None = None,
) -> ModelVersionPublic:
    """Register a succeeded job's model (its final model, a complete checkpoint, or the model of its best evaluation)
    as the next version of `name` (created on first use). Blocking."""
    job = svc.store.get_job(job_id)
    if job is None or job.tenant != who.tenant:
        raise no_such("job", job_id, field="job_id")
    if job.method == "eval":
        raise Conflict("job_has_no_model", f"job {job.id} is an evaluation run: it made no model", "job_id")
    if job.status != JobStatus.succeeded or not job.result_uri:
        raise Conflict(
            "job_not_succeeded",
            f"job {job.id} is {job.status.value}; only a succeeded job's model can be promoted",
            "job_id",
        )
    metrics = None
    if best:
        checkpoint, metrics = _best(svc, job)
    ft_name = modelref.fine_tuned_name(job.model, job.tenant, job.suffix, job.id)
    source = job.result_uri
    if checkpoint is not None:
        found = layout.list_checkpoints(svc.storage, job.tenant, job.id, MANIFEST_NAME, step=checkpoint)
        if checkpoint not in found:
            raise no_such("checkpoint", f"{job.id} step {checkpoint}", field="checkpoint")
        ft_name, source = f"{ft_name}:ckpt-step-{checkpoint}", svc.storage.uri(found[checkpoint].prefix)
    found = svc.store.eval_runs(job.tenant, [ft_name, job.id] if checkpoint is None else [ft_name], 1, True)
    run = found[0] if found else None
    _meets(job, ft_name, run, require or {})
    if run is not None:  # the version carries its model's newest evaluation
        metrics = metrics or {"train": job.metrics or {}, "eval": job.eval_metrics or {}}
        metrics["evaluation"] = {"run_id": run.id, "eval_id": run.eval_id, **run.eval_metrics}
    try:
        version = svc.registry.promote(job, name, ft_name, aliases, description, source, metrics)
    except RegistryError as exc:
        raise Invalid("invalid_request", str(exc), exc.field) from None
    now_aliases = svc.registry.aliases(who.tenant, name)
    _mirror(svc, version, now_aliases)
    return ModelVersionPublic.of(version, now_aliases)


def _meets(job, ft_name: str, run, require: dict[str, float]) -> None:
    """Each metric of `require` is at least its minimum in the newest evaluation run of the model (`/evals`)."""
    if not require:
        return
    if run is None:
        raise Conflict(
            "no_evaluation",
            f"no succeeded evaluation run of {ft_name} (or {job.id}); run one (`/evals`) before promoting with require",
            "require",
        )
    for metric, minimum in require.items():
        value = run.eval_metrics.get(metric)
        if not isinstance(value, int | float):
            reported = ", ".join(sorted(run.eval_metrics)) or "nothing"
            raise Conflict(
                "evaluation_below_minimum",
                f"evaluation run {run.id} reports no {metric}; it reports {reported}",
                f"require.{metric}",
            )
        if value < minimum:
            raise Conflict(
                "evaluation_below_minimum",
                f"evaluation run {run.id}: {metric} is {value:.4g}, below the minimum {minimum:g}",
                f"require.{metric}",
            )


def _best(svc: Services, job) -> tuple[int | None, dict]:
    """The step of the checkpoint with the job's best evaluation (None: its final model) and that evaluation."""
    done = all_events(svc, job.id, {"done"})
    found = (done[-1].data.get("metrics") or {}).get("best") if done else None
    if found is None:
        raise Conflict("no_best_model", f"job {job.id} chose no best model; train with best_metric", "best")
    if not found.get("path"):
        raise Conflict(
            "no_best_model",
            f"job {job.id}: no evaluation improved {found['metric']} on the model it started from",
            "best",
        )
    metrics = {"eval": {found["metric"]: found["value"]}, "step": found["step"]}
    return (None if found["path"] == done[-1].data.get("final_path") else found["step"]), metrics


def version(svc: Services, who: Principal, name: str, number: int) -> ModelVersionPublic:
    owned(svc, who, name)
    found = svc.registry.resolve(who.tenant, name, number)
    if found is None:
        raise no_such("model version", f"{name}/{number}")
    return ModelVersionPublic.of(found, svc.registry.aliases(who.tenant, name))


def set_alias(svc: Services, who: Principal, name: str, alias: str, number: int) -> RegisteredModelPublic:
    """Point `alias` at a version (moving it from the version it named)."""
    model = owned(svc, who, name)
    try:
        svc.registry.set_alias(who.tenant, name, alias, number)
    except RegistryError as exc:
        if exc.field == "version":
            raise no_such("model version", f"{name}/{number}", field="version") from None
        raise Invalid("invalid_request", str(exc), exc.field) from None
    _mirror(svc, svc.registry.resolve(who.tenant, name, number), svc.registry.aliases(who.tenant, name))
    return public(svc, svc.registry.get(who.tenant, model.name), True)


def delete_alias(svc: Services, who: Principal, name: str, alias: str) -> None:
    owned(svc, who, name)
    if not svc.registry.delete_alias(who.tenant, name, alias):
        raise no_such("alias", alias)


def _mirror(svc: Services, version: ModelVersion, aliases: dict[str, int]) -> None:
    """With MLflow configured, ask the service worker to mirror the version and its aliases (retried there while
    MLflow is away)."""
    if not svc.settings.mlflow_tracking_uri:
        return
    metrics = {k: v for k, v in ((version.metrics or {}).get("eval") or {}).items() if isinstance(v, int | float)}
    try:
        send_model_mirror(
            svc.celery,
            version.tenant,
            version.name,
            version.version,
            version.source_uri,
            sorted(a for a, n in aliases.items() if n == version.version),
            metrics,
            version.job_id,
        )
    except Exception as exc:  # noqa: BLE001 - the registry row is what counts; the broker may be away
        log.warning("Model %s version %s: not mirrored to MLflow (%s)", version.name, version.version, exc)
