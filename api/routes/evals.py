"""Evaluations: `/evals` natively and `/v1/evals` in OpenAI's Evals API shape, one set of routes over
`api.service.evals` (errors answer in the shape of the path's face, `api.errors`). A run is a job of method 'eval':
`/jobs/{id}` follows it, its events, cancel and retry are a job's."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request

from api.auth import Caller
from api.deps import ID_PATTERN, Cursor, Services, services
from api.errors import openai_responses, responses
from api.schemas import EvalCreate, EvalRunCreate
from api.service import evals
from api.service import jobs as job_service

EvalId = Annotated[str, Path(pattern=ID_PATTERN, description="An evaluation id, `eval_...`")]
RunId = Annotated[str, Path(pattern=ID_PATTERN, description="A run's id: its job's, `job_...`")]


def _page(data: list[dict], more: bool) -> dict:
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": more}


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def router_at(prefix: str, openai: bool) -> APIRouter:
    router = APIRouter(prefix=prefix, tags=["openai" if openai else "evals"])

    def answers(*codes: int) -> dict:
        """OpenAI's face answers an invalid request 400 (never 422), the native one 422."""
        return openai_responses(*(c for c in codes if c not in (400, 422))) if openai else responses(*codes)

    @router.post("", status_code=200 if openai else 201, responses=answers(400, 401, 422))
    async def create_eval(req: EvalCreate, who: Caller, svc: Services = Depends(services)) -> dict:
        """An evaluation: its testing criteria are checked (graders, the judges the tenant may use)."""
        return evals.eval_public(await evals.create(svc, who, req))

    @router.get("", responses=answers(401, 422))
    def list_evals(
        who: Caller,
        limit: int = Query(20, ge=1, le=100),
        after: Cursor | None = None,
        svc: Services = Depends(services),
    ) -> dict:
        rows, more = evals.list_evals(svc, who, limit, after)
        return _page([evals.eval_public(r) for r in rows], more)

    @router.get("/{eval_id}", responses=answers(401, 404, 422))
    def get_eval(eval_id: EvalId, who: Caller, svc: Services = Depends(services)) -> dict:
        return evals.eval_public(evals.owned(svc, who, eval_id))

    @router.delete("/{eval_id}", responses=answers(401, 404, 422))
    def delete_eval(eval_id: EvalId, who: Caller, svc: Services = Depends(services)) -> dict:
        """The evaluation goes; its runs stay, as jobs."""
        evals.delete(svc, who, eval_id)
        return {"object": "eval.deleted", "deleted": True, "eval_id": eval_id}

    @router.post("/{eval_id}/runs", status_code=200 if openai else 202, responses=answers(400, 401, 404, 422, 429, 503))
    async def create_run(
        eval_id: EvalId, req: EvalRunCreate, request: Request, who: Caller, svc: Services = Depends(services)
    ) -> dict:
        """A run of the evaluation on the data source's model (and baseline), queued as a job of method 'eval'."""
        done = await evals.create_run(svc, who, eval_id, req)
        return evals.run_public(svc, done.job, _base(request))

    @router.get("/{eval_id}/runs", responses=answers(401, 404, 422))
    def list_runs(
        eval_id: EvalId,
        request: Request,
        who: Caller,
        limit: int = Query(20, ge=1, le=100),
        after: Cursor | None = None,
        svc: Services = Depends(services),
    ) -> dict:
        rows, more = evals.runs(svc, who, eval_id, limit, after)
        return _page([evals.run_public(svc, j, _base(request)) for j in rows], more)

    @router.get("/{eval_id}/runs/{run_id}", responses=answers(401, 404, 422))
    def get_run(eval_id: EvalId, run_id: RunId, request: Request, who: Caller, svc: Services = Depends(services)):
        return evals.run_public(svc, evals.owned_run(svc, who, eval_id, run_id), _base(request))

    @router.post("/{eval_id}/runs/{run_id}" + ("" if openai else "/cancel"), responses=answers(401, 404, 409, 422))
    def cancel_run(eval_id: EvalId, run_id: RunId, request: Request, who: Caller, svc: Services = Depends(services)):
        """Cancel the run (its job)."""
        evals.owned_run(svc, who, eval_id, run_id)
        return evals.run_public(svc, job_service.cancel(svc, who, run_id), _base(request))

    @router.get("/{eval_id}/runs/{run_id}/output_items", responses=answers(401, 404, 422))
    def output_items(
        eval_id: EvalId,
        run_id: RunId,
        who: Caller,
        limit: int = Query(20, ge=1, le=1000),
        after: str | None = Query(None, pattern=ID_PATTERN),
        svc: Services = Depends(services),
    ) -> dict:
        """The run's rows: each answer, its grades, the baseline's answer and the judge's verdicts."""
        job = evals.owned_run(svc, who, eval_id, run_id)
        rows, more = evals.items(svc, job, limit, evals.item_index(job, after))
        return _page([evals.output_item(job, r) for r in rows], more)

    return router


router = router_at("/evals", openai=False)
openai_router = router_at("/v1/evals", openai=True)
