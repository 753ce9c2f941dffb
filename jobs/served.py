"""Which models `prefq serve` answers for a tenant: its succeeded jobs' models and checkpoints and its registered
models, named as `jobs.modelref` reads them. The playground and the OpenAI chat face (`api.service.served`) and the
judges of model graders (`jobs.judges`, in the API and in the worker) resolve them here.

A run's folders are named by `training.spec`, which this package may not import: the callers pass them (`Folders`)."""

from __future__ import annotations

from dataclasses import dataclass

from jobs import layout, modelref
from jobs.modelref import CheckpointStore as Storage
from jobs.perimeter import tenant_prefix
from jobs.registry import Registry
from jobs.store import JobStore


@dataclass(frozen=True)
class Folders:
    """The names of a run's folders: a checkpoint's manifest, a LoRA adapter, a sharded checkpoint gathered."""

    manifest: str
    adapter: str
    consolidated: str


class NotServed(LookupError):
    """No model of the tenant's by that name (another tenant's answers the same)."""


def _not_found(name: str) -> NotServed:
    return NotServed(
        f"The model {name!r} does not exist or you do not have access to it: name a "
        "fine-tuned model, a checkpoint of one, a succeeded job's id, or a registered model"
    )


def resolve_served_model(store: JobStore, storage: Storage, tenant: str, name: str, folders: Folders) -> dict[str, str]:
    """What the serve loads for the model that `name` gives `tenant` (`jobs.modelref.resolve`): a succeeded job's
    `fine_tuned_model` (`ft:<base>:<tenant>:<suffix>:<job id>`, exactly), a complete checkpoint of it
    (`...:ckpt-step-<N>`), the job's id, or a registered model's version (`models:/NAME/N`, `models:/NAME@ALIAS`, a
    bare `NAME`). Anything else (a hub id, a path), or another tenant's, is `NotServed`.

    The answer is the serve request's model fields: `model_uri`, the folder's storage URI; for a LoRA job's model or
    checkpoint, the adapter's folder with its base (`base_uri`, or `base_hub` and `base_revision`), so that the
    adapters of one base share it in the serve; for a sharded checkpoint (`fsdp`, `deepspeed-tp`), its consolidated
    folder. Blocking (database, storage)."""
    registry = Registry(store.engine)
    try:
        found = modelref.resolve(name, tenant, store, registry, storage, folders.manifest)
    except modelref.ModelNotFound:
        raise _not_found(name) from None
    if found.job is None or (found.name.startswith("ft:") and found.name != found.fine_tuned_model):
        raise _not_found(found.name)
    job, uri = found.job, found.uri.rstrip("/") + "/"
    if found.ref.step is None:
        prefix = layout.model_prefix(tenant, job.id)
        keys = storage.list(prefix + folders.adapter + "/") if storage.uri(prefix) == uri else []
        adapter = prefix + f"{folders.adapter}/adapter_config.json" in keys
        folder = uri + folders.adapter + "/" if adapter else uri
    else:
        keys = layout.list_checkpoints(storage, tenant, job.id, folders.manifest, step=found.ref.step)[
            found.ref.step
        ].keys
        prefix = layout.checkpoint_prefix(tenant, job.id, found.ref.step)
        adapter = prefix + "adapter_config.json" in keys
        folder = uri + folders.consolidated + "/" if prefix + f"{folders.consolidated}/config.json" in keys else uri
    if not adapter:
        return {"model_uri": folder}
    base = base_of(job.model, tenant, store, storage, folders.manifest)
    if base is None and found.ref.step is None:
        return {"model_uri": uri}  # the merged model beside the adapter
    if base is None:
        raise NotServed(
            f"{name!r} is a LoRA adapter whose base model ({job.model}) this service cannot load; "
            "serve the job's final model, which has the adapter merged in"
        )
    return {"model_uri": folder, **base}


def base_of(model: str, tenant: str, store: JobStore, storage: Storage, manifest: str) -> dict[str, str] | None:
    """The serve request's base fields for a job's `model` (as the job pinned it): a hub id, or a folder of the
    tenant's in storage; None for what the serve does not load (a local folder, a base that is gone)."""
    try:
        base = modelref.resolve(model, tenant, store, Registry(store.engine), storage, manifest, bare_names=False)
    except modelref.ModelNotFound:
        return None
    if base.ref.kind == "hub":
        return {"base_hub": base.ref.value} | ({"base_revision": base.ref.revision} if base.ref.revision else {})
    if base.uri and base.uri.startswith(storage.uri(tenant_prefix(tenant))):
        return {"base_uri": base.uri}
    return None
