"""Which models the playground serves to a tenant: its succeeded jobs' models and its registered models, named as
`jobs.modelref` reads them."""

from __future__ import annotations

from api.service.errors import NotFound
from jobs import layout, modelref
from jobs.models import JobStatus
from jobs.registry import Registry
from jobs.store import JobStore
from storage import Storage
from training.spec import MANIFEST_NAME


def _not_found(name: str) -> NotFound:
    return NotFound("model_not_found", f"The model {name!r} does not exist or you do not have access to it: "
                          "name a fine-tuned model, a checkpoint of one, a succeeded job's id, or a registered model",
                          "model")


def resolve_served_model(store: JobStore, storage: Storage, tenant: str, name: str) -> str:
    """The storage URI of the model folder that `name` gives `tenant`: a succeeded job's `fine_tuned_model`
    (`ft:<base>:<tenant>:<suffix>:<job id>`), a complete checkpoint of it (`...:ckpt-step-<N>`), the job's id, or a
registered model's version (`jobs.registry`: `models:/NAME/N`, `models:/NAME@ALIAS`, a bare `NAME`).
    Anything else, or another tenant's, is a 404 `model_not_found` naming it. Blocking (database, storage)."""
    try:
        ref = modelref.parse(name)
    except modelref.BadModelRef:
        raise _not_found(name) from None
    wanted = ref if ref.kind == "registered" else modelref.as_registered(ref)
    if wanted is not None:  # a registered model of the tenant's: models:/NAME[/N|@ALIAS], or a bare NAME[@ALIAS]
        version = Registry(store.engine).resolve(tenant, wanted.value, wanted.step, wanted.revision)
        if version is None:
            raise _not_found(name)
        name = version.fine_tuned_model
        ref = modelref.parse(name)
    job = store.get_job(ref.value) if ref.kind == "job" else None
    if job is None or job.tenant != tenant or job.status != JobStatus.succeeded or not job.result_uri:
        raise _not_found(name)
    if name.startswith("ft:") and name != modelref.fine_tuned_name(job.model, job.tenant, job.suffix, job.id, ref.step):
        raise _not_found(name)
    if ref.step is None:
        return job.result_uri
    keys = storage.list(layout.checkpoint_prefix(tenant, job.id, ref.step))
    if not layout.complete_checkpoints(tenant, job.id, keys, MANIFEST_NAME):
        raise _not_found(name)
    return storage.uri(layout.checkpoint_prefix(tenant, job.id, ref.step))
