"""Which models the playground serves to a tenant: its succeeded jobs' models and its registered models, named as
`jobs.modelref` reads them."""

from __future__ import annotations

from api.service.errors import NotFound
from jobs import modelref
from jobs.registry import Registry
from jobs.store import JobStore
from storage import Storage
from training.spec import MANIFEST_NAME


def _not_found(name: str) -> NotFound:
    return NotFound(
        "model_not_found",
        f"The model {name!r} does not exist or you do not have access to it: name a "
        "fine-tuned model, a checkpoint of one, a succeeded job's id, or a registered model",
        "model",
    )


def resolve_served_model(store: JobStore, storage: Storage, tenant: str, name: str) -> str:
    """The storage URI of the model folder that `name` gives `tenant` (`jobs.modelref.resolve`): a succeeded job's
    `fine_tuned_model` (`ft:<base>:<tenant>:<suffix>:<job id>`, exactly), a complete checkpoint of it
    (`...:ckpt-step-<N>`), the job's id, or a registered model's version (`models:/NAME/N`, `models:/NAME@ALIAS`, a
    bare `NAME`). Anything else (a hub id, a path), or another tenant's, is a 404 `model_not_found` naming it.
    Blocking (database, storage)."""
    try:
        found = modelref.resolve(name, tenant, store, Registry(store.engine), storage, MANIFEST_NAME)
    except modelref.ModelNotFound:
        raise _not_found(name) from None
    if found.job is None or (found.name.startswith("ft:") and found.name != found.fine_tuned_model):
        raise _not_found(found.name)
    return found.uri
