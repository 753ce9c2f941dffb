"""The new-job form: upload a dataset and see its report, then pick model, method, trainer, devices and the
spec's hyperparameters (from `training.spec.TrainingSpec`, defaults shown) and submit through `POST /jobs`'s code."""

from __future__ import annotations

import math
import types
import typing
from typing import Literal, get_args, get_origin

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import RedirectResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.deps import Services, services
from api.schemas import JobCreate
from api.service import datasets
from api.service import jobs as service
from api.service.errors import ServiceError
from api.ui import render
from api.ui.session import Checked, Signed
from training.spec import DATA_KINDS, TrainingSpec

router = APIRouter(prefix="/ui", include_in_schema=False)
# Set by the form's own fields, nested, or refused by the API: not offered as plain hyperparameters.
NOT_OFFERED = {
    "method",
    "model",
    "train_file",
    "eval_file",
    "trainer",
    "gpus",
    "ref_cache_dir",
    "grading",
    "grader",
    "sample_grader",
    "risk",
    "batch_beta",
    "lora",
}


def _kind(annotation) -> tuple[str, list[str]]:
    """The input kind of a spec field (int, float, bool, choice, text) and its choices."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if get_origin(annotation) is Literal:
        return "choice", [str(a) for a in get_args(annotation)]
    for kind in (bool, int, float):
        if annotation is kind:
            return kind.__name__, []
    return "text", []


def hyperparameter_fields() -> list[dict]:
    fields = []
    for name, info in TrainingSpec.model_fields.items():
        if name in NOT_OFFERED:
            continue
        kind, choices = _kind(info.annotation)
        default = info.get_default(call_default_factory=True)
        fields.append(
            {
                "name": name,
                "kind": kind,
                "choices": choices,
                "help": info.description or "",
                "default": "per method"
                if default is None and name == "learning_rate"
                else ("unset" if default is None else str(default).lower() if kind == "bool" else str(default)),
            }
        )
    return fields


FIELDS = hyperparameter_fields()
KINDS = {f["name"]: f["kind"] for f in FIELDS}


class FormError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _value(name: str, raw: str):
    kind = KINDS[name]
    try:
        if kind == "int":
            return int(raw)
        if kind == "float" and math.isfinite(float(raw)):
            return float(raw)
        if kind == "float":
            raise ValueError(raw)
    except ValueError:
        raise FormError(
            f"hyperparameters.{name}",
            f"hyperparameters.{name}: {raw!r} is not a{'n integer' if kind == 'int' else ' number'}",
        ) from None
    if kind == "bool":
        return raw == "true"
    if name == "loss_type" and "," in raw:
        return [p.strip() for p in raw.split(",") if p.strip()]
    if name == "loss_weights":
        try:
            return [float(p) for p in raw.split(",")]
        except ValueError:
            raise FormError(
                "hyperparameters.loss_weights", "hyperparameters.loss_weights: numbers separated by commas"
            ) from None
    return raw


def _metadata(text: str) -> dict:
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if "=" not in line:
            raise FormError("metadata", f"metadata: line {n} is not key=value")
        key, value = line.split("=", 1)
        out[key.strip()] = value.strip()
    return out


async def _datasets(svc: Services, viewer) -> list:
    rows, _ = await run_in_threadpool(svc.store.list_datasets, viewer.who.tenant, 100)
    return rows


async def _models(svc: Services, viewer) -> list[str]:
    """The models of the tenant's recent jobs: suggestions for the model field."""
    rows, _ = await run_in_threadpool(service.list_jobs, svc, viewer.who, None, None, 100, None, viewer.who.tenant)
    return list(dict.fromkeys(j.model for j in rows))


@router.get("/new")
async def new_job(request: Request, viewer: Signed, svc: Services = Depends(services)):
    return render(
        request,
        "new.html",
        viewer=viewer,
        fields=FIELDS,
        methods=tuple(DATA_KINDS),
        datasets=await _datasets(svc, viewer),
        form={},
        models=await _models(svc, viewer),
    )


@router.post("/datasets")
def upload(
    request: Request,
    viewer: Checked,
    file: UploadFile = File(...),
    method: str = Form("", pattern="^(|dpo|sft|kto)$"),
    svc: Services = Depends(services),
):
    """Validate and store an upload; the fragment shows its report (a bad file: every line's error, nothing kept)."""
    filename = (file.filename or "")[:255] or "data.jsonl"  # a NUL never gets here (`api.text`)
    try:
        dataset = datasets.store(svc, viewer.who, file.file, filename, method or None)
    except ServiceError as exc:
        return render(
            request,
            "_upload_report.html",
            viewer=viewer,
            filename=filename,
            error=exc.message,
            problems=exc.details or [],
        )
    rows, _ = svc.store.list_datasets(viewer.who.tenant, 100)
    return render(request, "_upload_report.html", viewer=viewer, filename=filename, dataset=dataset, datasets=rows)


@router.post("/jobs")
async def submit(request: Request, viewer: Checked, svc: Services = Depends(services)):
    """Queue the job as `POST /jobs` would; a refusal comes back as the form with the field named."""
    form = await request.form()
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    try:
        hyper = {n: _value(n, values[f"hp.{n}"].strip()) for n in KINDS if values.get(f"hp.{n}", "").strip()}
        body = {
            "model": values.get("model", "").strip(),
            "dataset": values.get("dataset", ""),
            "method": values.get("method", ""),
            "trainer": values.get("trainer", "basic"),
            "hyperparameters": hyper,
            "metadata": _metadata(values.get("metadata", "")),
        }
        if values.get("eval_dataset"):
            body["eval_dataset"] = values["eval_dataset"]
        gpus = values.get("gpus", "1").strip() or "1"
        if not gpus.isdigit():
            raise FormError("gpus", f"gpus: {gpus!r} is not a whole number")
        body["gpus"] = int(gpus)
        req = JobCreate(**body)
        job = (await service.submit(svc, viewer.who, req)).job
    except FormError as exc:
        return await _refused(request, svc, viewer, values, exc.field, str(exc))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        return await _refused(request, svc, viewer, values, field, f"{field}: {first['msg']}")
    except ServiceError as exc:
        return await _refused(request, svc, viewer, values, exc.field or "", exc.message)
    return RedirectResponse(f"/ui/jobs/{job.id}", status_code=303)


async def _refused(request: Request, svc: Services, viewer, values: dict, field: str, message: str):
    return render(
        request,
        "new.html",
        422,
        viewer=viewer,
        fields=FIELDS,
        methods=tuple(DATA_KINDS),
        datasets=await _datasets(svc, viewer),
        form=values,
        error=message,
        error_field=field,
        models=await _models(svc, viewer),
    )
