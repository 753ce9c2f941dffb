"""Who is asking: the API key in `Authorization: Bearer <key>` (FastAPI's `HTTPBearer`, so that OpenAPI declares
the scheme), its tenant, and whether it is an admin key. With `PREFQ_AUTH=off` (a private laptop) every request
is the admin of tenant `default`. Keys are looked up by their public id and cached for a few seconds per process;
a revocation takes effect at once in the process that made it and within `CACHE_S` in the others. `api.limits.Gate`
checks the key before a request's body is read; the routes take the caller it found."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from api.errors import APIError
from jobs.keys import KeyStore

if TYPE_CHECKING:  # api.deps imports this module
    from api.deps import Services

CACHE_S = 5.0
TOUCH_S = 60.0  # last use is written at most this often per key
DEFAULT_TENANT = "default"
PRINCIPAL = "prefq.principal"  # the request scope's state key under which `api.limits.Gate` leaves the caller
bearer = HTTPBearer(auto_error=False, description="An API key: `prefq keys create --tenant NAME`")


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool
    key_id: str | None

    def owns(self, tenant: str) -> bool:
        return self.admin or tenant == self.tenant


class KeyCache:
    def __init__(self, keys: KeyStore):
        self.keys = keys
        self._seen: dict[str, tuple[float, Principal | None]] = {}
        self._touched: dict[str, float] = {}

    def forget(self) -> None:
        self._seen.clear()

    def lookup(self, key: str) -> Principal | None:
        hit = self._seen.get(key)
        if hit and time.monotonic() - hit[0] < CACHE_S:
            return hit[1]
        row = self.keys.authenticate(key)
        principal = Principal(row.tenant, row.admin, row.id) if row else None
        if len(self._seen) > 10_000:
            self._seen.clear()
        self._seen[key] = (time.monotonic(), principal)
        if principal and time.monotonic() - self._touched.get(row.id, -TOUCH_S) >= TOUCH_S:
            self._touched[row.id] = time.monotonic()
            self.keys.touch(row.id)
        return principal


async def authenticate(svc: Services, authorization: str) -> Principal:
    """Who an `Authorization` header's value (`Bearer <key>`) is, or a 401 APIError."""
    if svc.settings.auth == "off":
        return Principal(DEFAULT_TENANT, True, None)
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(
            401,
            "unauthorized",
            "send an API key as `Authorization: Bearer <key>`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    found = await run_in_threadpool(svc.key_cache.lookup, key.strip())
    if found is None:
        raise APIError(
            401,
            "unauthorized",
            "this API key is not valid (unknown or revoked)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return found


async def principal(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
    """The caller: as `api.limits.Gate` found it before the body was read, or (a route it lets through) looked up."""
    found = request.scope.get("state", {}).get(PRINCIPAL)
    return found or await authenticate(request.app.state.services, request.headers.get("authorization", ""))


async def admin(who: Annotated[Principal, Depends(principal)]) -> Principal:
    if not who.admin:
        raise APIError(403, "forbidden", "this needs an admin key")
    return who


Caller = Annotated[Principal, Depends(principal)]
Admin = Annotated[Principal, Depends(admin)]
