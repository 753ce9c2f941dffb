"""API keys, for admin keys: create (the key is shown once), list, revoke. `prefq keys ...` does the same on the
database directly, for the first key."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, Field

from api.auth import Admin
from api.deps import Services, services
from api.errors import not_found, responses
from jobs.keys import KeyStore
from jobs.models import ApiKey
from jobs.perimeter import TENANT_PATTERN

router = APIRouter(tags=["keys"])
ADMIN_ERRORS = responses(400, 401, 403, 422)


class KeyCreate(BaseModel):
    tenant: str = Field(pattern=TENANT_PATTERN, description="The tenant whose data the key reads and writes.")
    admin: bool = Field(False, description="An admin key sees and manages every tenant.")
    label: str = Field("", max_length=200, pattern=r"^[^\x00]*$")


class KeyPublic(BaseModel):
    id: str
    object: str = "api_key"
    tenant: str
    admin: bool
    label: str
    created_at: float
    last_used_at: float | None
    revoked_at: float | None

    @classmethod
    def of(cls, row: ApiKey) -> KeyPublic:
        return cls(**row.model_dump(exclude={"sha256"}))


class KeyCreated(KeyPublic):
    key: str = Field(description="The key itself: shown this once, stored only as a hash.")


class KeysPublic(BaseModel):
    object: str = "list"
    data: list[KeyPublic]


@router.post("/keys", status_code=201, response_model=KeyCreated, responses=ADMIN_ERRORS)
def create_key(req: KeyCreate, who: Admin, svc: Services = Depends(services)) -> KeyCreated:
    """A new key for a tenant; the answer carries the key, once."""
    row, key = KeyStore(svc.store.engine).create(req.tenant, req.admin, req.label)
    return KeyCreated(**KeyPublic.of(row).model_dump(), key=key)


@router.get("/keys", response_model=KeysPublic, responses=ADMIN_ERRORS)
def list_keys(
    who: Admin, tenant: str | None = Query(None, pattern=TENANT_PATTERN), svc: Services = Depends(services)
) -> KeysPublic:
    return KeysPublic(data=[KeyPublic.of(k) for k in KeyStore(svc.store.engine).list(tenant)])


@router.post("/keys/{key_id}/revoke", response_model=KeyPublic, responses=responses(401, 403, 404, 422))
def revoke_key(
    who: Admin, key_id: str = Path(pattern=r"^[0-9a-f]{12}$"), svc: Services = Depends(services)
) -> KeyPublic:
    """The key stops working at once in this API process, and within a few seconds in the others."""
    row = KeyStore(svc.store.engine).revoke(key_id)
    if row is None:
        raise not_found("key", key_id)
    svc.key_cache.forget()
    return KeyPublic.of(row)
