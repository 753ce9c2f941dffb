"""Graders (`training.graders`): validate one, or run one on a sample and an item, for a tenant.

A model grader's judge (`score_model`, `label_model`) is a model of the caller's tenant served by `prefq serve` (a
fine-tuned model, a checkpoint, a registered model: `api.service.served`), checked before anything runs, so that
another tenant's model is a 400 naming `grader.model`. The python grader runs in its sandboxed child; a grader that
fails at run time scores 0 and says why in the answer's `metadata.errors`.
"""

from __future__ import annotations

import anyio
from starlette.concurrency import run_in_threadpool

from api.auth import Principal
from api.deps import Services
from api.service import playground
from api.service.errors import Invalid, NotFound, ServiceError
from api.service.served import resolve_served_model
from training import graders

JUDGE_MAX_TOKENS = 64


def parse(grader: object) -> graders.Grader:
    try:
        return graders.parse(grader)
    except graders.GraderError as exc:
        raise Invalid("invalid_grader", str(exc), exc.param) from None


def _judges(grader) -> list[tuple[str, str]]:
    """(param, model) of each model grader within `grader`."""
    if isinstance(grader, graders.Multi):
        return [(f"grader.graders.{n}.model", g.model) for n, g in grader.graders.items() if hasattr(g, "model")]
    return [("grader.model", grader.model)] if hasattr(grader, "model") else []


async def _check_judges(svc: Services, who: Principal, grader) -> None:
    for param, model in _judges(grader):
        try:
            await run_in_threadpool(resolve_served_model, svc.store, svc.storage, who.tenant, model)
        except NotFound as exc:
            raise Invalid("invalid_grader", f"no judge model {model!r}: {exc.reason}", param) from None


async def validate(svc: Services, who: Principal, grader: object) -> dict:
    parsed = parse(grader)
    await _check_judges(svc, who, parsed)
    return parsed.model_dump(exclude_none=True)


async def run(svc: Services, who: Principal, grader: object, model_sample: str, item: object) -> graders.Graded:
    parsed = parse(grader)
    await _check_judges(svc, who, parsed)

    def judge(model: str, messages: list[dict], params: dict) -> str:
        """A served model's greedy reply (from the grading thread, through the event loop's HTTP client)."""

        async def ask() -> str:
            gen = await playground.start(
                svc,
                who.tenant,
                model,
                "chat",
                {
                    "messages": messages,
                    "max_tokens": int(params.get("max_completions_tokens") or JUDGE_MAX_TOKENS),
                    "stop": [],
                    "temperature": float(params.get("temperature") or 0.0),
                    "top_p": float(params.get("top_p") or 1.0),
                    "seed": params.get("seed"),
                    "logit_bias": {},
                },
            )
            text, _ = await playground.collect(gen)
            return text

        try:
            return anyio.from_thread.run(ask)
        except ServiceError as exc:
            raise RuntimeError(f"{exc.code}: {exc.reason}") from None

    s = svc.settings
    limits = graders.Limits(seconds=s.grader_timeout_s, memory_bytes=s.grader_memory_mb << 20)
    return await run_in_threadpool(graders.grade, parsed, model_sample, item, judge=judge, limits=limits)
