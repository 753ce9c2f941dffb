"""The model registry (`jobs.registry`): promote a succeeded job's model to a version of a named model, list the
tenant's models and versions with their metrics, point aliases at versions. Each route is a face of
`api.service.registry`; names are per tenant: another tenant's name answers 404, as one that does not exist."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response
from starlette.concurrency import run_in_threadpool

from api.auth import Caller
from api.deps import Services, services
from api.errors import responses
from api.schemas import (
    AliasRequest,
    ModelVersionPublic,
    PromoteRequest,
    RegisteredModelPublic,
    RegisteredModelsPublic,
)
from api.service import registry
from jobs.registry import ALIAS, NAME

router = APIRouter(tags=["models"])
ModelName = Annotated[str, Path(pattern=f"^{NAME.pattern}$", description="A registered model's name")]
AliasName = Annotated[str, Path(pattern=f"^{ALIAS.pattern}$", description="An alias, e.g. `production`")]
VersionNumber = Annotated[int, Path(ge=1, le=999_999_999, description="A version number")]


@router.get("/models", response_model=RegisteredModelsPublic, responses=responses(401, 422))
def list_models(who: Caller, svc: Services = Depends(services)) -> RegisteredModelsPublic:
    """The tenant's registered models, most recently changed first, with their newest version and aliases."""
    return RegisteredModelsPublic(data=registry.listed(svc, who))


@router.get("/models/{name}", response_model=RegisteredModelPublic, responses=responses(401, 404, 422))
def get_model(name: ModelName, who: Caller, svc: Services = Depends(services)) -> RegisteredModelPublic:
    """A registered model with all its versions (newest first), their metrics and aliases."""
    return registry.public(svc, registry.owned(svc, who, name), True)


@router.post(
    "/models/{name}/versions",
    status_code=201,
    response_model=ModelVersionPublic,
    responses=responses(400, 401, 404, 409, 422),
)
async def promote(
    name: ModelName, req: PromoteRequest, who: Caller, svc: Services = Depends(services)
) -> ModelVersionPublic:
    """Register a succeeded job's model (its final model, a checkpoint, or its best evaluation's) as the next version
    of `name` (created on first use)."""
    return await run_in_threadpool(
        registry.promote,
        svc,
        who,
        name,
        req.job_id,
        req.aliases,
        req.description,
        req.checkpoint,
        req.best,
        req.require,
    )


@router.get("/models/{name}/versions/{version}", response_model=ModelVersionPublic, responses=responses(401, 404, 422))
def get_version(
    name: ModelName, version: VersionNumber, who: Caller, svc: Services = Depends(services)
) -> ModelVersionPublic:
    return registry.version(svc, who, name, version)


@router.put(
    "/models/{name}/aliases/{alias}", response_model=RegisteredModelPublic, responses=responses(400, 401, 404, 422)
)
def set_alias(
    name: ModelName, alias: AliasName, req: AliasRequest, who: Caller, svc: Services = Depends(services)
) -> RegisteredModelPublic:
    """Point `alias` at a version (moving it from the version it named)."""
    return registry.set_alias(svc, who, name, alias, req.version)


@router.delete("/models/{name}/aliases/{alias}", status_code=204, responses=responses(401, 404, 422))
def delete_alias(name: ModelName, alias: AliasName, who: Caller, svc: Services = Depends(services)) -> Response:
    registry.delete_alias(svc, who, name, alias)
    return Response(status_code=204)
