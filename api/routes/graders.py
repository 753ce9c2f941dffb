"""Graders, natively: `POST /graders/validate` checks one, `POST /graders/run` scores a sample against an item
(`training.graders`, over `api.service.graders`); the same requests as OpenAI's `/v1/fine_tuning/alpha/graders`."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from api.auth import Caller
from api.deps import Services, services
from api.errors import responses
from api.schemas import GraderRun, GraderValidate
from api.service import graders

router = APIRouter(prefix="/graders", tags=["graders"])


@router.post("/run", responses=responses(400, 401, 413, 422))
async def run(req: GraderRun, who: Caller, svc: Services = Depends(services)) -> dict:
    """The grader's score of `model_sample` for `item`: `reward`, each sub-grader's, and what went wrong."""
    graded = await graders.run(svc, who, req.grader, req.model_sample, req.item)
    return {
        "reward": graded.reward,
        "sub_rewards": graded.sub_rewards,
        "errors": {k: v for k, v in graded.errors.items() if v},
        "seconds": round(graded.seconds, 4),
        "name": graded.name,
        "type": graded.type,
    }


@router.post("/validate", responses=responses(400, 401, 413, 422))
async def validate(req: GraderValidate, who: Caller, svc: Services = Depends(services)) -> dict:
    """The grader as it will run (defaults filled in), or a 422 naming the field that is wrong."""
    return {"grader": await graders.validate(svc, who, req.grader)}
