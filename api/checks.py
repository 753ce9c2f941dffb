"""What `POST /jobs` checks before a job is queued: its references (datasets, model) and its spec.

POST /jobs runs on the event loop (no thread per request): what may block goes to the thread pool.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.deps import Services
from api.errors import APIError
from api.schemas import JobCreate
from storage import StorageError, open_uri
from training.spec import TrainingSpec, describe_errors

TOP_LEVEL = {"method", "trainer", "gpus"}  # spec fields set on the job itself
RESERVED = TOP_LEVEL | {"model", "train_file", "eval_file"}


async def dataset(svc: Services, ref: str, method: str, field: str) -> str:
    if ref.startswith("ds_"):
        found = await svc.dataset(ref)
        if found is None:
            raise APIError(422, "dataset_not_found", f"{field}: no dataset with id {ref!r}", field=field)
        if found.method != method:
            raise APIError(422, "dataset_method_mismatch",
                           f"{field}: {ref} holds {found.method} data ({found.format}); the job's method is {method}",
                           field=field)  # fmt: skip
        return ref
    if not await run_in_threadpool(_uri_exists, svc, ref, field):
        raise APIError(422, "dataset_not_found", f"{field}: nothing stored at {ref}", field=field)
    return ref


def _uri_exists(svc: Services, uri: str, field: str, suffix: str = "") -> bool:
    try:
        storage, key = open_uri(uri, **svc.settings.storage_options())
        return storage.exists(key.rstrip("/") + suffix)
    except StorageError as exc:
        raise APIError(422, "invalid_uri", f"{field}: {exc}", field=field) from None


async def model(svc: Services, ref: str) -> None:
    if "://" in ref:
        found = await run_in_threadpool(_uri_exists, svc, ref, "model", "/config.json")
    else:
        found = (Path(ref) / "config.json").is_file()  # one local stat: cheaper than a thread hop
    if not found:
        raise APIError(422, "model_not_found",
                       f"model: no model folder (config.json) at {ref}; give a folder the workers can read "
                       "or a storage URI", field="model")  # fmt: skip


def spec(req: JobCreate) -> None:
    clash = sorted(RESERVED & req.hyperparameters.keys())
    if clash:
        raise APIError(422, "invalid_hyperparameters", f"hyperparameters.{clash[0]}: set it at the top level of "
                       "the job", field=f"hyperparameters.{clash[0]}")  # fmt: skip
    data = {**req.hyperparameters, "method": req.method, "trainer": req.trainer, "gpus": max(1, req.gpus),
            "model": req.model, "train_file": "-"}  # fmt: skip
    try:
        TrainingSpec.model_validate(data)
    except ValidationError as exc:
        details = [
            {**e, "field": e["field"] if e["field"].split(".")[0] in TOP_LEVEL else f"hyperparameters.{e['field']}"}
            for e in describe_errors(exc)
        ]
        first = details[0]
        raise APIError(422, "invalid_hyperparameters", f"{first['field']}: {first['reason']}", field=first["field"],
                       details=details) from None  # fmt: skip
