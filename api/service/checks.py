"""What a submission is checked for before a job is queued: its references (datasets, model) and its spec.

POST /jobs runs on the event loop (no thread per request): what may block goes to the thread pool.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import httpx
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.auth import Principal
from api.deps import Services
from api.schemas import JobCreate
from api.service.errors import Invalid, TooMany
from jobs import modelref
from jobs.models import Worker
from jobs.perimeter import Refused, check_callback_url, confine
from queue_config import gpu_queue
from storage import StorageError, open_uri
from training import memory
from training.memory import GIB
from training.spec import DATA_KINDS, MANIFEST_NAME, TrainingSpec, describe_errors

TOP_LEVEL = {"method", "trainer", "gpus", "nodes"}  # spec fields set on the job itself
RESERVED = TOP_LEVEL | {"model", "train_file", "eval_file"}


def _confine(svc: Services, who: Principal, ref: str, field: str, models: bool) -> str:
    s = svc.settings
    try:
        return confine(
            ref, field, who.tenant, s.storage_url, s.shared_models, s.model_roots, models, s.allowed_hub_models
        )
    except Refused as exc:
        message = exc.message
        if who.admin and models and ref.startswith("/"):  # an operator may be told the server's own folders
            message += f"; the model roots in force: {', '.join(s.model_roots) or 'none'}"
        raise Invalid("reference_not_allowed", message, field) from None


async def dataset(svc: Services, who: Principal, ref: str, method: str, field: str) -> str:
    """A dataset id of the tenant's, or a storage URI under its prefix; nothing is looked up elsewhere."""
    ref = _confine(svc, who, ref, field, models=False)
    if ref.startswith("ds_"):
        found = await svc.dataset(ref)
        if found is None or found.tenant != who.tenant:
            raise Invalid("dataset_not_found", f"no dataset with id {ref!r}", field)
        if found.status != "processed":
            first = found.errors[0] if found.errors else {"line": "-", "field": "-", "reason": "invalid"}
            raise Invalid(
                "invalid_dataset",
                f"{ref} did not validate (line {first['line']}, {first['field']}: "
                f"{first['reason']}); upload a corrected file",
                field,
            )
        if found.method not in DATA_KINDS[method]:
            raise Invalid(
                "dataset_method_mismatch",
                f"{ref} holds {found.method} data ({found.format}); the job's method {method} trains on "
                f"{' or '.join(DATA_KINDS[method])} data",
                field,
            )
        return ref
    if ref.startswith("job_"):
        raise Invalid("dataset_not_found", f"{ref} is a job, not a dataset", field)
    if not await run_in_threadpool(_uri_exists, svc, ref, field):
        raise Invalid("dataset_not_found", f"nothing stored at {ref}", field)
    return ref


def _uri_exists(svc: Services, uri: str, field: str, suffix: str = "") -> bool:
    try:
        storage, key = open_uri(uri, **svc.settings.storage_options())
        return storage.exists(key.rstrip("/") + suffix)
    except StorageError as exc:
        raise Invalid("invalid_uri", str(exc), field) from None


async def model(svc: Services, who: Principal, ref: str) -> modelref.Resolved:
    """What `model` gives the tenant (`jobs.modelref.resolve`): a registered version becomes its fine-tuned model,
    and a succeeded job of the tenant's, named by its id or its fine-tuned model name, becomes that name; then the
    name must be one the tenant may read (under its storage prefix, a shared prefix, a model root, or an allowed hub
    id) and exist (a folder with config.json, or a hub id the hub has, where it can be asked)."""
    try:
        modelref.parse(ref)
    except modelref.BadModelRef as exc:
        _confine(svc, who, ref, "model", models=True)  # says why, as for any reference it refuses
        raise Invalid("reference_not_allowed", str(exc), "model") from None
    try:
        resolved = await run_in_threadpool(
            modelref.resolve, ref, who.tenant, svc.store, svc.registry, svc.storage, MANIFEST_NAME
        )
    except modelref.ModelNotFound as exc:
        raise Invalid("model_not_found", exc.message, exc.field) from None
    name = _confine(svc, who, resolved.name, "model", models=True)
    if resolved.job is not None:
        return replace(resolved, name=resolved.fine_tuned_model)
    if resolved.ref.kind == "hub":
        await _on_the_hub(svc, resolved.ref, name)
        return replace(resolved, name=name)
    if "://" in name:
        found = await run_in_threadpool(_uri_exists, svc, name, "model", "/config.json")
    else:
        found = (Path(name) / "config.json").is_file()  # one local stat: cheaper than a thread hop
    if not found:
        raise Invalid("model_not_found", f"no model folder (config.json) at {name}", "model")
    return replace(resolved, name=name)  # a local folder by its real path


HUB_TIMEOUT_S = 3.0
HUB_RETRY_S = 60.0  # after the hub could not be reached, ids are checked for syntax only for this long


async def _on_the_hub(svc: Services, ref: modelref.ModelRef, name: str) -> None:
    """Refuse a hub id the hub says does not exist; where the hub is offline (HF_HUB_OFFLINE) or not reachable,
    only the syntax is checked and the worker finds out."""
    s = svc.settings
    if s.hf_hub_offline or time.monotonic() < svc.hub_down_until:
        return
    url = f"{s.hf_endpoint.rstrip('/')}/api/models/{ref.value}"
    if ref.revision:
        url += f"/revision/{quote(ref.revision, safe='')}"
    headers = {"Authorization": f"Bearer {s.hf_token.get_secret_value()}"} if s.hf_token else {}
    try:
        answer = await svc.http.get(url, headers=headers, timeout=HUB_TIMEOUT_S)
    except httpx.HTTPError:
        svc.hub_down_until = time.monotonic() + HUB_RETRY_S
        return
    if answer.status_code == 404 or answer.headers.get("x-error-code") in ("RepositoryNotFound", "RevisionNotFound"):
        raise Invalid(
            "model_not_found",
            f"{name} is not on the hub ({s.hf_endpoint}), or not readable with this server's token",
            "model",
        )


def _model_config(svc: Services, model: modelref.Resolved) -> dict | None:
    """The model's config.json where the API can read it (a local folder or storage); None for a hub id, an adapter
    folder or a file that is no JSON object: the run checks again before it loads the model."""
    where = model.uri if model.job is not None else model.name
    if where is None or model.ref.kind == "hub":
        return None
    try:
        if "://" in where:
            storage, key = open_uri(where, **svc.settings.storage_options())
            raw = storage.get_bytes(key.rstrip("/") + "/config.json")
        else:
            raw = (Path(where) / "config.json").read_bytes()
        config = json.loads(raw)
    except (OSError, StorageError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _device_memory(worker: Worker) -> tuple[int, bool] | None:
    """(bytes per device, whether its devices are CPU processes) of a worker's inventory; None where unknown."""
    inv = worker.inventory or {}
    gpus = [g.get("memory_mib") for g in inv.get("gpus") or []]
    if gpus:
        return (min(gpus) << 20, False) if all(isinstance(m, int) for m in gpus) else None
    if isinstance(inv.get("memory_gib"), int | float):
        return int(inv["memory_gib"] * GIB) // max(1, inv.get("cpu_devices") or 1), True
    return None


async def fits(svc: Services, spec: TrainingSpec, model: modelref.Resolved) -> None:
    """The job's estimated peak memory per device (`training.memory`) fits the largest live worker that takes its
    queue; a 422 naming what it needs, what there is and the changes that would fit otherwise. Unknown model shapes
    and pools with no such worker pass: the run checks again before it loads the model."""
    queue, live = gpu_queue(spec.gpus), await svc.live_workers()
    sizes = [m for w in live if queue in w.queues and (m := _device_memory(w))]
    if not sizes:
        return
    config = await run_in_threadpool(_model_config, svc, model)
    if config is None:
        return
    try:
        budget, cpu = max(sizes)
        need = memory.estimate(config, spec, cpu)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return  # a config.json of a shape the estimate does not know
    if need.total > budget:
        devices = max((w.devices for w in live), default=1)
        raise Invalid(
            "job_too_big",
            f"the largest worker for this job cannot hold it: {memory.advice(config, spec, budget, cpu, devices)}",
            "model",
        )


async def callback_url(svc: Services, url: str) -> None:
    if svc.settings.callback_secret is None:
        raise Invalid(
            "callbacks_disabled", "this server has no PREFQ_CALLBACK_SECRET to sign callbacks with", "callback_url"
        )
    try:
        await run_in_threadpool(check_callback_url, url, svc.settings.callback_allow_private)
    except Refused as exc:
        raise Invalid("callback_url_not_allowed", exc.message, "callback_url") from None


async def room_for(svc: Services, who: Principal) -> None:
    """A tenant with `PREFQ_TENANT_MAX_ACTIVE_JOBS` unfinished jobs gets 429 until some finish."""
    limit = svc.settings.tenant_max_active_jobs
    if await run_in_threadpool(svc.store.count_unfinished, who.tenant) >= limit:
        raise TooMany(
            "too_many_active_jobs",
            f"tenant {who.tenant} has {limit} unfinished jobs, the limit "
            "(PREFQ_TENANT_MAX_ACTIVE_JOBS); retry when some have finished",
            retry_after_s=60,
        )


def _bounds(svc: Services) -> dict[str, tuple[float, str]]:
    s = svc.settings
    return {
        "max_steps": (s.max_job_steps, "PREFQ_MAX_JOB_STEPS"),
        "max_length": (s.max_job_length, "PREFQ_MAX_JOB_LENGTH"),
        "epochs": (s.max_job_epochs, "PREFQ_MAX_JOB_EPOCHS"),
        "batch_size": (s.max_job_batch_size, "PREFQ_MAX_JOB_BATCH_SIZE"),
    }


def spec(svc: Services, req: JobCreate) -> TrainingSpec:
    """The hyperparameters validate as a training spec, within the server's limits; the spec."""
    for name, (limit, setting) in _bounds(svc).items():
        value = req.hyperparameters.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > limit:
            raise Invalid(
                "over_limit",
                f"{value} is above this server's limit of {limit:g} ({setting})",
                f"hyperparameters.{name}",
            )
    set_by_worker = {
        "ref_cache_dir": "the worker sets it (reference log-probs are cached for the tenant's jobs)",
        "grading": "the worker sets it (the grader's limits are the server's; PREFQ_GRADER_*)",
        "cluster": "the worker sets it (the Ray cluster is the server's; PREFQ_RAY_ADDRESS)",
    }
    for name, why in set_by_worker.items():
        if name in req.hyperparameters:
            raise Invalid("invalid_hyperparameters", why, f"hyperparameters.{name}")
    clash = sorted(RESERVED & req.hyperparameters.keys())
    if clash:
        raise Invalid("invalid_hyperparameters", "set it at the top level of the job", f"hyperparameters.{clash[0]}")
    data = {
        **req.hyperparameters,
        "method": req.method,
        "trainer": req.trainer,
        "gpus": max(1, req.gpus) * req.nodes,
        "nodes": req.nodes,
        "model": req.model,
        "train_file": "-",
    }
    try:
        return TrainingSpec.model_validate(data)
    except ValidationError as exc:
        details = [
            {**e, "field": e["field"] if e["field"].split(".")[0] in TOP_LEVEL else f"hyperparameters.{e['field']}"}
            for e in describe_errors(exc)
        ]
        first = details[0]
        raise Invalid("invalid_hyperparameters", first["reason"], first["field"], details) from None
