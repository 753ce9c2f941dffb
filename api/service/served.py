"""Which models the playground, the chat face and the graders' judges serve to a tenant (`jobs.served`), with a
name that resolves to none a 404 `model_not_found` naming it."""

from __future__ import annotations

from api.service.errors import NotFound
from jobs import served
from jobs.store import JobStore
from storage import Storage
from training.spec import ADAPTER, CONSOLIDATED, MANIFEST_NAME

FOLDERS = served.Folders(MANIFEST_NAME, ADAPTER, CONSOLIDATED)


def resolve_served_model(store: JobStore, storage: Storage, tenant: str, name: str) -> dict[str, str]:
    """The serve request's model fields for `name` (`jobs.served.resolve_served_model`)."""
    try:
        return served.resolve_served_model(store, storage, tenant, name, FOLDERS)
    except served.NotServed as exc:
        raise NotFound("model_not_found", str(exc), "model") from None


def base_of(model: str, tenant: str, store: JobStore, storage: Storage) -> dict[str, str] | None:
    return served.base_of(model, tenant, store, storage, MANIFEST_NAME)
