"""/v1/models: the base models that the operator lists (`PREFQ_BASE_MODELS`), the tenant's fine-tuned models, and
its registered models (`models:/NAME/VERSION` for each version, `models:/NAME@ALIAS` for each alias)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from api.auth import Caller, Principal
from api.deps import Services, services
from api.errors import not_found, openai_responses
from api.openai import shapes, types
from jobs import modelref
from jobs.models import JobStatus

router = APIRouter(prefix="/v1", tags=["openai"])
MAX_LISTED = 1000  # fine-tuned models listed, newest first


def _models(svc: Services, who: Principal) -> list[dict]:
    base = [{"id": m, "object": "model", "created": 0, "owned_by": "system"} for m in svc.settings.base_models]
    jobs, _ = svc.store.list_jobs(JobStatus.succeeded, limit=MAX_LISTED, tenant=who.tenant)
    tuned = [
        {
            "id": shapes.fine_tuned_model(j),
            "object": "model",
            "created": int(j.finished_at or j.created_at),
            "owned_by": j.tenant,
        }
        for j in jobs
    ]
    registered = []
    for m in svc.registry.models(who.tenant)[:MAX_LISTED]:
        versions = svc.registry.versions(m.tenant, m.name)
        created = {v.version: int(v.created_at) for v in versions}
        registered += [
            {
                "id": modelref.registered_name(m.name, v.version),
                "object": "model",
                "created": int(v.created_at),
                "owned_by": m.tenant,
            }
            for v in versions
        ]
        registered += [
            {"id": f"models:/{m.name}@{alias}", "object": "model", "created": created.get(n, 0), "owned_by": m.tenant}
            for alias, n in sorted(svc.registry.aliases(m.tenant, m.name).items())
        ]
    return base + tuned + registered


@router.get("/models", response_model=types.ModelList, responses=openai_responses(401))
def list_models(who: Caller, svc: Services = Depends(services)) -> dict:
    return {"object": "list", "data": _models(svc, who)}


@router.get("/models/{model:path}", response_model=types.Model, responses=openai_responses(401, 404))
def retrieve_model(model: str, who: Caller, svc: Services = Depends(services)) -> dict:
    for m in _models(svc, who):
        if m["id"] == model:
            return m
    raise not_found("model", model)
