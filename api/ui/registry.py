"""Dashboard pages of what a job produced beyond curves: its samples (step by step), the model registry, and
promoting a job's model from its page."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from api.deps import JobId, Services, services
from api.schemas import PromoteRequest
from api.service import artifacts, evals, playground
from api.service import registry as models
from api.service.errors import ServiceError
from api.ui import PageError, render
from api.ui.pages import owned_job, page_error
from api.ui.session import Checked, Signed
from jobs.registry import NAME

router = APIRouter(prefix="/ui", include_in_schema=False)


def by_prompt(steps: list) -> list[dict]:
    """Samples regrouped per held-out prompt: [{index, prompt, rows: [{step, model, completion, tokens, reward}]}]."""
    prompts: dict[int, dict] = {}
    for at in steps:
        for s in at.samples:
            entry = prompts.setdefault(s.index, {"index": s.index, "prompt": s.prompt, "rows": []})
            entry["rows"].append(
                {"step": at.step, "model": at.model, "completion": s.completion, "tokens": s.tokens, "reward": s.reward}
            )
    return [prompts[i] for i in sorted(prompts)]


@router.get("/jobs/{job_id}/samples")
def job_samples(request: Request, job_id: JobId, viewer: Signed, svc: Services = Depends(services)):
    """The samples section of a job's page: re-read when a `samples` event arrives."""
    owned_job(svc, viewer, job_id)
    return render(request, "_samples.html", prompts=by_prompt(artifacts.samples(svc, job_id)))


@router.get("/jobs/{job_id}/evaluation")
def job_evaluation(request: Request, job_id: JobId, viewer: Signed, svc: Services = Depends(services)):
    """An evaluation run's section of its job page: each model's metrics, the win rate, and the judged pairs."""
    job = owned_job(svc, viewer, job_id)
    summary = evals.results(svc, job)
    rows = evals.items(svc, job, 500, None)[0] if summary else []
    metrics = sorted({*(summary or {}).get("model", {}), *(summary or {}).get("baseline", {})})
    return render(request, "_evaluation.html", job=job, summary=summary, metrics=metrics, rows=rows)


@router.post("/jobs/{job_id}/promote")
def promote(
    job_id: JobId,
    viewer: Checked,
    name: str = Form("", max_length=64),
    alias: str = Form("", max_length=32),
    svc: Services = Depends(services),
):
    owned_job(svc, viewer, job_id)
    try:
        req = PromoteRequest(job_id=job_id, aliases=[alias.strip()] if alias.strip() else [])
    except ValidationError:
        raise PageError(
            422,
            "Not promoted",
            f"alias: {alias!r} is not an alias (lowercase letters, digits, '_', '-', starting with a letter)",
        ) from None
    if not NAME.fullmatch(name.strip()):
        raise PageError(422, "Not promoted", f"name: {name!r} is not a model name (letters, digits, '.', '_', '-')")
    try:
        version = models.promote(svc, viewer.who, name.strip(), req.job_id, req.aliases)
    except ServiceError as exc:
        error = page_error(exc)
        raise PageError(error.status, "Not promoted", error.message) from None
    return RedirectResponse(f"/ui/models/{version.name}", status_code=303)


CHAT_TOKENS = 64  # new tokens of a reply in the dashboard's chat box


@router.post("/models/{name}/chat")
async def chat(
    request: Request,
    name: str,
    viewer: Checked,
    message: str = Form("", max_length=4000),
    version: str = Form("", max_length=40),
    svc: Services = Depends(services),
):
    """One reply of a version of the model (the newest by default) to the message, through the playground."""
    if not NAME.fullmatch(name) or svc.registry.get(viewer.who.tenant, name) is None:
        raise PageError(404, "Not found", f"No registered model {name[:80]!r}.")
    ref = (
        f"models:/{name}/{version}"
        if version.isdigit()
        else f"models:/{name}@{version}"
        if version
        else f"models:/{name}"
    )
    text = message.strip()
    if not text:
        return render(request, "_chat_reply.html", message="", error="Write a message first.")
    try:
        reply, done = await playground.reply(
            svc, viewer.who.tenant, ref, text, min(CHAT_TOKENS, svc.settings.serve_max_tokens)
        )
    except ServiceError as exc:
        return render(request, "_chat_reply.html", message=text, error=f"{exc.code}: {exc.message}")
    usage = {
        "prompt_tokens": done["prompt_tokens"],
        "completion_tokens": done["completion_tokens"],
        "total_tokens": done["prompt_tokens"] + done["completion_tokens"],
    }
    return render(
        request, "_chat_reply.html", message=text, reply=reply, model=ref, finish=done["finish_reason"], usage=usage
    )


@router.get("/models")
def models_page(request: Request, viewer: Signed, svc: Services = Depends(services)):
    return render(request, "models.html", viewer=viewer, models=models.listed(svc, viewer.who))


@router.get("/models/{name}")
def model_page(request: Request, name: str, viewer: Signed, svc: Services = Depends(services)):
    found = svc.registry.get(viewer.who.tenant, name) if NAME.fullmatch(name) else None
    if found is None:
        raise PageError(404, "Not found", f"No registered model {name[:80]!r}.")
    return render(request, "model.html", viewer=viewer, model=models.public(svc, found, True))
