"""/v1/models: the base models that the operator lists (`PREFQ_BASE_MODELS`) and the tenant's fine-tuned models."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from api.auth import Caller, Principal
from api.deps import Services, services
from api.errors import not_found, openai_responses
from api.openai import shapes
from jobs.models import JobStatus

router = APIRouter(prefix="/v1", tags=["openai"])
MAX_LISTED = 1000  # fine-tuned models listed, newest first


def _models(svc: Services, who: Principal) -> list[dict]:
    base = [{"id": m, "object": "model", "created": 0, "owned_by": "system"} for m in svc.settings.base_models]
    jobs, _ = svc.store.list_jobs(JobStatus.succeeded, limit=MAX_LISTED, tenant=who.tenant)
    tuned = [{"id": shapes.fine_tuned_model(j), "object": "model", "created": int(j.finished_at or j.created_at),
              "owned_by": j.tenant} for j in jobs]  # fmt: skip
    return base + tuned


@router.get("/models", responses=openai_responses(401))
def list_models(who: Caller, svc: Services = Depends(services)) -> dict:
    return {"object": "list", "data": _models(svc, who)}


@router.get("/models/{model:path}", responses=openai_responses(401, 404))
def retrieve_model(model: str, who: Caller, svc: Services = Depends(services)) -> dict:
    for m in _models(svc, who):
        if m["id"] == model:
            return m
    raise not_found("model", model)
