"""OpenAI's graders under `/v1/fine_tuning/alpha/graders`: `run` scores a sample against an item, `validate` checks a
grader, in OpenAI's shapes (`client.fine_tuning.alpha.graders.run(...)`, `.validate(...)`), over `api.service.graders`."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from api.auth import Caller
from api.deps import Services, services
from api.errors import openai_responses
from api.schemas import GraderRun, GraderValidate
from api.service import graders

router = APIRouter(prefix="/v1/fine_tuning/alpha/graders", tags=["openai"])


@router.post("/run", responses=openai_responses(401, 413))
async def run(req: GraderRun, who: Caller, svc: Services = Depends(services)) -> dict:
    graded = await graders.run(svc, who, req.grader, req.model_sample, req.item)
    return graded.response()


@router.post("/validate", responses=openai_responses(401, 413))
async def validate(req: GraderValidate, who: Caller, svc: Services = Depends(services)) -> dict:
    return {"grader": await graders.validate(svc, who, req.grader)}
