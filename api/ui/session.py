"""Sign-in for the dashboard: an API key is exchanged for a session cookie that holds no secret.

The cookie is `<key id>.<expiry>.<mac>`, the MAC an HMAC keyed with the stored SHA-256 of the key (which only the
server has): any replica can check it, it ends when the key is revoked, and the key itself never travels again.
It is httponly, SameSite=Lax, `Secure` over HTTPS and scoped to `/ui`. Every form and htmx request that changes
something carries a CSRF token derived from the same secret and the session; a sign-in from another origin is
refused (login CSRF), and so is any POST whose `Origin` is another site. With `PREFQ_AUTH=off` everyone is the
admin of tenant `default`, as on the API.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from api.auth import DEFAULT_TENANT, Principal
from jobs.keys import KeyStore
from jobs.models import ApiKey

COOKIE = "prefq_session"
SESSION_S = 12 * 3600
CACHE_S = 5.0  # key rows are re-read at most this often per process: a revocation ends sessions within it
_rows: dict[str, tuple[float, ApiKey | None]] = {}


class SignInNeeded(Exception):
    """No valid session: pages redirect to the sign-in form, fragments answer 401."""


class BadCsrf(Exception):
    """A state-changing request without this session's CSRF token."""


@dataclass(frozen=True)
class Viewer:
    who: Principal
    csrf: str
    auth_off: bool = False


def _mac(secret: str, *parts: object) -> str:
    return hmac.new(secret.encode(), ":".join(map(str, parts)).encode(), hashlib.sha256).hexdigest()


def session_value(row: ApiKey, now: float | None = None) -> str:
    expires = int((now or time.time()) + SESSION_S)
    return f"{row.id}.{expires}.{_mac(row.sha256, 'session', row.id, expires)}"


def _row(keys: KeyStore, key_id: str) -> ApiKey | None:
    hit = _rows.get(key_id)
    if hit and time.monotonic() - hit[0] < CACHE_S:
        return hit[1]
    row = keys.get(key_id)
    if len(_rows) > 10_000:
        _rows.clear()
    _rows[key_id] = (time.monotonic(), row)
    return row


def forget(key_id: str) -> None:
    _rows.pop(key_id, None)


def check_session(keys: KeyStore, value: str) -> Viewer | None:
    """The viewer a cookie value stands for, or None if it is malformed, expired, forged or its key revoked."""
    parts = value.split(".")
    if len(parts) != 3 or not parts[1].isdigit() or len(parts[0]) != 12:
        return None
    key_id, expires, mac = parts
    if int(expires) < time.time():
        return None
    row = _row(keys, key_id)
    if row is None or row.revoked_at is not None:
        return None
    if not hmac.compare_digest(mac, _mac(row.sha256, "session", key_id, expires)):
        return None
    return Viewer(Principal(row.tenant, row.admin, row.id), _mac(row.sha256, "csrf", key_id, expires))


async def viewer(request: Request) -> Viewer:
    svc = request.app.state.services
    if svc.settings.auth == "off":
        return Viewer(Principal(DEFAULT_TENANT, True, None), "", auth_off=True)
    value = request.cookies.get(COOKIE, "")
    found = await run_in_threadpool(check_session, KeyStore(svc.store.engine), value) if value else None
    if found is None:
        raise SignInNeeded()
    return found


async def csrf_checked(request: Request, who: Annotated[Viewer, Depends(viewer)]) -> Viewer:
    """The viewer, if the request comes from this server's pages and carries its CSRF token (form field `csrf` or
    header `X-CSRF-Token`). With `PREFQ_AUTH=off` (no key, so no shared secret across API processes) the origin
    alone is checked."""
    if not same_origin(request):
        raise BadCsrf()
    if who.auth_off:
        return who
    sent = request.headers.get("x-csrf-token")
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        sent = (await request.form()).get("csrf")
    if not isinstance(sent, str) or not hmac.compare_digest(sent, who.csrf):
        raise BadCsrf()
    return who


def same_origin(request: Request) -> bool:
    """Whether a POST comes from a page of this server (browsers send `Origin` with every POST)."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin:
        return True  # not a browser's cross-site form: those always name their origin
    parts = urlsplit(origin)
    return parts.netloc == request.headers.get("host", "")


def set_cookie(response, request: Request, value: str) -> None:
    response.set_cookie(
        COOKIE,
        value,
        max_age=SESSION_S,
        path="/ui",
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )


def clear_cookie(response) -> None:
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="lax")


Signed = Annotated[Viewer, Depends(viewer)]
Checked = Annotated[Viewer, Depends(csrf_checked)]
