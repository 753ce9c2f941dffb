"""Graders (`training.graders`): validate one, or run one on a sample and an item, for a tenant.

A model grader's judge (`score_model`, `label_model`) is one of the operator's judge models or a model of the
caller's tenant served by `prefq serve` (`jobs.judges`), checked before anything runs, so that another tenant's model
is a 400 naming `grader.model`. The python grader runs in its sandboxed child; a grader that fails at run time scores
0 and says why in the answer's `metadata.errors`.
"""

from __future__ import annotations

import httpx
from starlette.concurrency import run_in_threadpool

from api.auth import Principal
from api.deps import Services
from api.service.errors import Invalid
from api.service.served import FOLDERS
from jobs import judges
from training import graders


def parse(grader: object) -> graders.Grader:
    try:
        return graders.parse(grader)
    except graders.GraderError as exc:
        raise Invalid("invalid_grader", str(exc), exc.param) from None


def _endpoints(
    svc: Services, tenant: str, grader: dict, prefix: str = "", root: str = "grader"
) -> dict[str, judges.Endpoint]:
    """The judge of each model grader in `grader` (JSON), by model; a 400 naming the first that names none (at
    `prefix` + `root`). Blocking."""
    config = judges.Config.of(svc.settings)
    try:
        return judges.resolve_all(config, svc.store, svc.storage, tenant, {root: grader}, FOLDERS)
    except judges.NoJudge as exc:
        raise Invalid("invalid_grader", str(exc), prefix + exc.param) from None


async def check_judges(svc: Services, tenant: str, grader: dict, prefix: str = "", root: str = "grader") -> None:
    """Every judge that `grader` names is one `tenant` may use (a job's grader is checked at `prefix` + `root`)."""
    await run_in_threadpool(_endpoints, svc, tenant, grader, prefix, root)


async def validate(svc: Services, who: Principal, grader: object) -> dict:
    parsed = parse(grader)
    await check_judges(svc, who.tenant, parsed.model_dump(exclude_none=True))
    return parsed.model_dump(exclude_none=True)


async def run(svc: Services, who: Principal, grader: object, model_sample: str, item: object) -> graders.Graded:
    parsed = parse(grader)
    s = svc.settings
    limits = graders.Limits(seconds=s.grader_timeout_s, memory_bytes=s.grader_memory_mb << 20)

    def grade() -> graders.Graded:
        endpoints = _endpoints(svc, who.tenant, parsed.model_dump(exclude_none=True))
        with httpx.Client() as http:

            def judge(model: str, messages: list[dict], params: dict) -> str:
                return judges.ask(http, endpoints[model], messages, params, s.judge_timeout_s)

            return graders.grade(parsed, model_sample, item, judge=judge, limits=limits)

    return await run_in_threadpool(grade)
