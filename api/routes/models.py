"""The model registry (`jobs.registry`): promote a succeeded job's model to a version of a named model, list the
tenant's models and versions with their metrics, point aliases at versions. Names are per tenant: another
tenant's name answers 404, as one that does not exist."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.auth import Caller, Principal
from api.deps import ID_PATTERN, Services, services
from api.errors import APIError, not_found, responses
from jobs import modelref
from jobs.models import JobStatus, ModelVersion, RegisteredModel
from jobs.registry import ALIAS, NAME, RegistryError
from queue_config import send_model_mirror

log = logging.getLogger("prefq.api")
router = APIRouter(tags=["models"])
ModelName = Annotated[str, Path(pattern=f"^{NAME.pattern}$", description="A registered model's name")]
AliasName = Annotated[str, Path(pattern=f"^{ALIAS.pattern}$", description="An alias, e.g. `production`")]
VersionNumber = Annotated[int, Path(ge=1, le=999_999_999, description="A version number")]


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(pattern=ID_PATTERN, description="A succeeded job of this tenant's: its final model")
    aliases: list[Annotated[str, Field(pattern=f"^{ALIAS.pattern}$")]] = Field(
        [], max_length=16, description="Aliases to point at the new version, e.g. ['staging']")
    description: str | None = Field(None, max_length=2000)


class AliasRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=999_999_999)


class ModelVersionPublic(BaseModel):
    object: str = "model.version"
    name: str
    version: int
    model: str  # what a job's `model` or a chat request names this version by: models:/NAME/VERSION
    fine_tuned_model: str
    job_id: str
    source_uri: str
    base_model: str
    method: str
    metrics: dict
    description: str | None
    aliases: list[str]
    created_at: float

    @classmethod
    def of(cls, v: ModelVersion, aliases: dict[str, int]) -> ModelVersionPublic:
        return cls(name=v.name, version=v.version, model=modelref.registered_name(v.name, v.version),
                   fine_tuned_model=v.fine_tuned_model, job_id=v.job_id, source_uri=v.source_uri,
                   base_model=v.base_model, method=v.method, metrics=v.metrics or {}, description=v.description,
                   aliases=sorted(a for a, n in aliases.items() if n == v.version), created_at=v.created_at)  # fmt: skip


class RegisteredModelPublic(BaseModel):
    object: str = "registered_model"
    name: str
    tenant: str
    description: str | None
    created_at: float
    updated_at: float
    latest_version: int | None
    aliases: dict[str, int]
    versions: list[ModelVersionPublic] | None = None  # GET /models/{name} only


class RegisteredModelsPublic(BaseModel):
    object: str = "list"
    data: list[RegisteredModelPublic]


def _public(svc: Services, m: RegisteredModel, with_versions: bool) -> RegisteredModelPublic:
    versions = svc.registry.versions(m.tenant, m.name)
    aliases = svc.registry.aliases(m.tenant, m.name)
    return RegisteredModelPublic(name=m.name, tenant=m.tenant, description=m.description, created_at=m.created_at,
                                 updated_at=m.updated_at, latest_version=versions[0].version if versions else None,
                                 aliases=aliases,
                                 versions=[ModelVersionPublic.of(v, aliases) for v in versions] if with_versions
                                 else None)  # fmt: skip


def _model(svc: Services, who: Principal, name: str) -> RegisteredModel:
    found = svc.registry.get(who.tenant, name)
    if found is None:
        raise not_found("model", name)
    return found


@router.get("/models", response_model=RegisteredModelsPublic, responses=responses(401, 422))
def list_models(who: Caller, svc: Services = Depends(services)) -> RegisteredModelsPublic:
    """The tenant's registered models, most recently changed first, with their newest version and aliases."""
    return RegisteredModelsPublic(data=[_public(svc, m, False) for m in svc.registry.models(who.tenant)])


@router.get("/models/{name}", response_model=RegisteredModelPublic, responses=responses(401, 404, 422))
def get_model(name: ModelName, who: Caller, svc: Services = Depends(services)) -> RegisteredModelPublic:
    """A registered model with all its versions (newest first), their metrics and aliases."""
    return _public(svc, _model(svc, who, name), True)


@router.post("/models/{name}/versions", status_code=201, response_model=ModelVersionPublic,
             responses=responses(400, 401, 404, 409, 422))  # fmt: skip
async def promote(name: ModelName, req: PromoteRequest, who: Caller,
                  svc: Services = Depends(services)) -> ModelVersionPublic:  # fmt: skip
    """Register a succeeded job's model as the next version of `name` (created on first use)."""
    version, aliases = await run_in_threadpool(_promote, svc, who, name, req)
    _mirror(svc, version, aliases)
    return ModelVersionPublic.of(version, aliases)


def _mirror(svc: Services, version: ModelVersion, aliases: dict[str, int]) -> None:
    """With MLflow configured, the service worker mirrors the version and its aliases into MLflow's registry (as
    `<tenant>.<name>`, see `worker.tracking.mirror_model_version`); retried there while MLflow is away."""
    if not svc.settings.mlflow_tracking_uri:
        return
    metrics = {k: v for k, v in ((version.metrics or {}).get("eval") or {}).items() if isinstance(v, int | float)}
    try:
        send_model_mirror(svc.celery, version.tenant, version.name, version.version, version.source_uri,
                          sorted(a for a, n in aliases.items() if n == version.version), metrics, version.job_id)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the registry row is what counts; the broker may be away
        log.warning("Model %s version %s: not mirrored to MLflow (%s)", version.name, version.version, exc)


def _promote(svc: Services, who: Principal, name: str, req: PromoteRequest) -> tuple[ModelVersion, dict]:
    job = svc.store.get_job(req.job_id)
    if job is None or job.tenant != who.tenant:
        raise not_found("job", req.job_id, field="job_id")
    if job.status != JobStatus.succeeded or not job.result_uri:
        raise APIError(409, "job_not_succeeded", f"job_id: job {job.id} is {job.status.value}; only a succeeded "
                       "job's model can be promoted", field="job_id")  # fmt: skip
    ft_name = modelref.fine_tuned_name(job.model, job.tenant, job.suffix, job.id)
    try:
        version = svc.registry.promote(job, name, ft_name, req.aliases, req.description)
    except RegistryError as exc:
        raise APIError(422, "invalid_request", str(exc), field=exc.field) from None
    return version, svc.registry.aliases(who.tenant, name)


@router.get("/models/{name}/versions/{version}", response_model=ModelVersionPublic,
            responses=responses(401, 404, 422))  # fmt: skip
def get_version(name: ModelName, version: VersionNumber, who: Caller,
                svc: Services = Depends(services)) -> ModelVersionPublic:  # fmt: skip
    _model(svc, who, name)
    found = svc.registry.resolve(who.tenant, name, version)
    if found is None:
        raise not_found("model version", f"{name}/{version}")
    return ModelVersionPublic.of(found, svc.registry.aliases(who.tenant, name))


@router.put("/models/{name}/aliases/{alias}", response_model=RegisteredModelPublic,
            responses=responses(400, 401, 404, 422))  # fmt: skip
def set_alias(name: ModelName, alias: AliasName, req: AliasRequest, who: Caller,
              svc: Services = Depends(services)) -> RegisteredModelPublic:  # fmt: skip
    """Point `alias` at a version (moving it from the version it named)."""
    model = _model(svc, who, name)
    try:
        svc.registry.set_alias(who.tenant, name, alias, req.version)
    except RegistryError as exc:
        raise APIError(404 if exc.field == "version" else 422, "not_found" if exc.field == "version" else
                       "invalid_request", str(exc), field=exc.field) from None  # fmt: skip
    _mirror(svc, svc.registry.resolve(who.tenant, name, req.version), svc.registry.aliases(who.tenant, name))
    return _public(svc, svc.registry.get(who.tenant, model.name), True)


@router.delete("/models/{name}/aliases/{alias}", status_code=204, responses=responses(401, 404, 422))
def delete_alias(name: ModelName, alias: AliasName, who: Caller, svc: Services = Depends(services)) -> Response:
    _model(svc, who, name)
    if not svc.registry.delete_alias(who.tenant, name, alias):
        raise not_found("alias", alias)
    return Response(status_code=204)
