"""An attempt's first phase: its inputs in its folder. The dataset (and eval dataset), the base model (a hub snapshot,
a local folder, or a storage URI or fine-tuned model fetched into the host's model cache), the reference log-probs
cached by earlier runs on the same model and data, and for a resumed attempt the newest complete checkpoint; then
the spec the run reads. Every reference is confined again (`jobs.perimeter`) before anything is read."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from jobs import layout, modelref
from jobs.models import Job
from jobs.perimeter import Refused, confine
from jobs.registry import Registry
from storage import StorageError, get_dir, open_uri
from storage.cache import ModelCache
from training.spec import MANIFEST_NAME, SpecError, parse_spec
from worker import grading
from worker.attempt import Attempt, JobFailed

log = logging.getLogger("prefq.worker")
# weights of other frameworks: a hub model is fetched for transformers only
HUB_SKIPPED = "*.onnx onnx/* *.gguf *.msgpack *.h5 tf_model* flax_model* rust_model* original/* *.ot".split()


@dataclass(frozen=True)
class Inputs:
    spec_path: Path
    resume: bool  # `out/` holds the newest complete checkpoint of an earlier attempt
    refcache_prefix: str | None  # where the run's new reference log-probs are kept (DPO), for later runs
    samples: list[dict]  # the job's `samples` events of earlier attempts (its samples artifact)
    judges: dict = field(default_factory=dict)  # GRPO: the model graders' judges, by model (`worker.grading`)
    grading_socket: Path | None = None  # where the run asks for its python graders and judges


def fetch_inputs(a: Attempt) -> Inputs:
    """Fetch data, model and checkpoint into the attempt's folder and write the spec."""
    job, out = a.job, a.work / "out"
    out.mkdir(parents=True)
    data = {
        **job.hyperparameters,
        "method": job.method,
        "trainer": job.trainer,
        "gpus": max(1, job.gpus) * job.nodes,
        "nodes": job.nodes,
        "model": _model(a, job.model),
        "train_file": str(_dataset(a, job.dataset_id, a.work / "train.jsonl", "dataset")),
    }
    if job.nodes > 1:  # placed on the Ray cluster by the run (`training.cluster`)
        if not a.settings.ray_address:
            raise JobFailed(
                "no_cluster", "nodes: this worker knows no Ray cluster (PREFQ_RAY_ADDRESS)", user_error=True
            )
        data["cluster"] = {
            "address": a.settings.ray_address,
            "name": f"prefq-{job.id}-{a.attempt}",
            "placement_timeout_s": a.settings.ray_placement_timeout_s,
        }
    if job.method == "eval" and isinstance(ev := data.get("evaluation"), dict) and ev.get("baseline"):
        data["evaluation"] = {**ev, "baseline": _model(a, ev["baseline"], "evaluation.baseline")}
    if job.eval_dataset_id:
        data["eval_file"] = str(_dataset(a, job.eval_dataset_id, a.work / "eval.jsonl", "eval_dataset"))
    try:
        spec = parse_spec(data)
    except SpecError as exc:
        raise JobFailed("invalid_spec", str(exc), user_error=True) from None
    endpoints, socket_path = {}, None
    if found := spec.graders:  # the server's grader limits, and the worker's grading service for the run
        endpoints = grading.resolve(a, found)
        socket_path = grading.socket_path(a) if grading.needs_service(found) else None
        s = a.settings
        data["grading"] = {
            "timeout_s": s.grader_timeout_s,
            "memory_mb": s.grader_memory_mb,
            "socket": str(socket_path) if socket_path else None,
        }
        spec = parse_spec(data)
    refcache_prefix = None
    if job.method == "dpo":  # cached reference log-probs (ignored by the run without a reference)
        refcache_prefix = layout.refcache_prefix(job.tenant, _refcache_group(job))
        data["ref_cache_dir"] = str(_reference_cache(a, refcache_prefix))
        spec = parse_spec(data)
    spec_path = a.work / "spec.json"
    spec_path.write_text(spec.model_dump_json(indent=1))
    a.tracker.start(spec.model_dump(mode="json"))
    step = _resume_checkpoint(a, out)
    samples = _earlier_samples(a)
    if step is not None:
        a.lease.post(("resuming", {"step": step}))
    return Inputs(spec_path, step is not None, refcache_prefix, samples, endpoints, socket_path)


def _fetch(a: Attempt, uri: str, local: Path, what: str, prefix: bool = False) -> None:
    try:
        storage, key = open_uri(uri, **a.settings.storage_options())
        if prefix:
            get_dir(storage, key, local)
        else:
            storage.get_file(key, local)
    except StorageError as exc:
        raise JobFailed(f"{what}_unavailable", f"{what}: {exc}", user_error=False) from None


def _confine(a: Attempt, ref: str, field: str, models: bool) -> str:
    """The API checked the reference; the worker checks again before it reads anything (`jobs.perimeter`)."""
    s = a.settings
    try:
        return confine(
            ref, field, a.job.tenant, s.storage_url, s.shared_models, s.model_roots, models, s.allowed_hub_models
        )
    except Refused as exc:
        raise JobFailed("reference_not_allowed", str(exc), user_error=True) from None


def _dataset(a: Attempt, ref: str, local: Path, field: str) -> Path:
    uri = _confine(a, ref, field, models=False)
    if ref.startswith("ds_"):
        dataset = a.store.get_dataset(ref)
        if dataset is None or dataset.tenant != a.job.tenant:
            raise JobFailed("dataset_unavailable", f"{field}: no dataset {ref}", user_error=True)
        uri = dataset.uri
    _fetch(a, uri, local, "dataset")
    return local


def _model(a: Attempt, name: str, field: str = "model") -> str:
    """The local folder of the model the job's row names (`jobs.modelref.resolve`; the API pinned a registered name
    when it queued the job), or an evaluation's baseline. A folder fetched into the model cache stays locked while
    the run reads it."""
    name = _confine(a, name, field, models=True)
    try:
        found = modelref.resolve(
            name, a.job.tenant, a.store, Registry(a.store.engine), a.storage, MANIFEST_NAME, bare_names=False
        )
    except modelref.ModelNotFound as exc:
        raise JobFailed("model_not_found", str(exc), user_error=True) from None
    if found.uri is None:
        return hub_snapshot(found.ref, found.name)
    uri = found.uri
    if "://" not in uri:
        if not (Path(uri) / "config.json").is_file():
            raise JobFailed("invalid_model", f"model: no model folder at {uri} on this worker", user_error=True)
        return uri
    models = ModelCache(a.settings.work_dir / "models", int(a.settings.model_cache_gb * 1e9))
    folder, fd = models.open(uri, lambda local: _fetch(a, uri, local, "model", prefix=True))
    a.held_fds.append(fd)
    return str(folder)


def hub_snapshot(ref: modelref.ModelRef, name: str) -> str:
    """A hub model's folder in the hub cache shared by this host's jobs (`HF_HOME`/`HF_HUB_CACHE`), downloaded on a
    miss with `HF_TOKEN` unless `HF_HUB_OFFLINE` is set. A model that cannot be found is the user's error."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_OFFLINE
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return snapshot_download(ref.value, revision=ref.revision, ignore_patterns=HUB_SKIPPED)
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
        raise JobFailed(
            "model_not_found",
            f"model: {name} is not on the hub, or not readable with this server's token ({type(exc).__name__})",
            user_error=True,
        ) from None
    except LocalEntryNotFoundError:
        if HF_HUB_OFFLINE:
            raise JobFailed(
                "model_not_found",
                f"model: {name} is not in this worker's hub cache, and the worker is offline (HF_HUB_OFFLINE)",
                user_error=True,
            ) from None
        raise JobFailed(
            "hub_unavailable", f"model: {name} could not be downloaded: the hub is not reachable", user_error=False
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise JobFailed("hub_unavailable", f"model: {name} could not be downloaded: {exc}", user_error=False) from None


def _refcache_group(job: Job) -> str:
    return hashlib.sha256(json.dumps([job.model, job.dataset_id, job.eval_dataset_id]).encode()).hexdigest()[:24]


def _reference_cache(a: Attempt, prefix: str) -> Path:
    """The reference log-probs earlier attempts and jobs of the tenant computed on this model and data, fetched into
    a local folder that the run reads and writes (`training.refcache` names each file by its full key; the group
    here only narrows what to fetch). What the run adds is uploaded back (`worker.follow`)."""
    folder = a.work / "refcache"
    folder.mkdir()
    try:
        get_dir(a.storage, prefix, folder)
    except StorageError:
        pass  # nothing cached yet
    return folder


def _resume_checkpoint(a: Attempt, out: Path) -> int | None:
    """Download the newest complete checkpoint of the job, if it has one; returns its step."""
    found = layout.list_checkpoints(a.storage, a.job.tenant, a.job_id, MANIFEST_NAME)
    if not found:
        return None
    step = max(found)
    get_dir(a.storage, found[step].prefix, out / f"checkpoint-{step}")
    return step


def _earlier_samples(a: Attempt) -> list[dict]:
    key = layout.artifacts_prefix(a.job.tenant, a.job_id) + layout.SAMPLES_ARTIFACT
    local = a.work / "artifacts" / layout.SAMPLES_ARTIFACT
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        if not a.storage.exists(key):
            return []
        a.storage.get_file(key, local)
        earlier = json.loads(local.read_text())
    except (StorageError, OSError, ValueError) as exc:
        log.warning("Job %s: earlier samples unreadable (%s); this attempt's samples start afresh", a.job_id, exc)
        return []
    return earlier if isinstance(earlier, list) else []
