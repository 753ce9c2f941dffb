"""ASGI middleware in front of every route (`Gate`): who may send a body, and how much of one.

- Key first. A request to a route that needs an API key (every one but the probes, the API's documents and the
  dashboard, see `needs_key`) without a valid `Authorization: Bearer <key>` is answered 401 before a byte of its
  body is read: an anonymous 200 MB request costs the server its headers, not its body. The key is looked up as the
  routes look it up (`api.auth.authenticate`, with its per-process cache), and the routes reuse what was found. The
  dashboard's routes check their session cookie themselves. With `PREFQ_AUTH=off` there is nothing to check.
- Then the body's size. An upload (`POST /datasets`, `POST /v1/files`, the dashboard's `POST /ui/datasets`) may be
  up to `PREFQ_MAX_UPLOAD_BYTES`; any other request's body up to `PREFQ_MAX_JSON_BYTES`. A larger one is a 413
  naming the setting: before it is read when it declares its length, as soon as it passes the limit when it does
  not (chunked).
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException

from api.auth import PRINCIPAL, authenticate
from api.errors import OPENAI_PREFIX, APIError, body, openai_body

PUBLIC = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
UPLOADS = frozenset({"/datasets", "/v1/files", "/ui/datasets"})  # POSTed files: the upload limit


def needs_key(path: str) -> bool:
    """Whether a request to `path` must bring an API key (a path no route has is answered 401 too, not 404)."""
    return path not in PUBLIC and path != "/ui" and not path.startswith("/ui/")


def limit(method: str, path: str, settings) -> tuple[int, str]:
    """The most bytes a request's body may hold, and the setting that says so."""
    if method == "POST" and path in UPLOADS:
        return settings.max_upload_bytes, "PREFQ_MAX_UPLOAD_BYTES"
    return settings.max_json_bytes, "PREFQ_MAX_JSON_BYTES"


class TooLarge(APIError, HTTPException):
    """413 naming the limit's setting. An HTTPException too: FastAPI lets only those out of its reading of a body
    unchanged (any other error there becomes a 400); the APIError handler answers it."""

    def __init__(self, max_bytes: int, setting: str):
        code = "upload_too_large" if setting == "PREFQ_MAX_UPLOAD_BYTES" else "body_too_large"
        message = f"the request body is larger than this route's limit of {max_bytes} bytes ({setting})"
        APIError.__init__(self, 413, code, message)
        HTTPException.__init__(self, 413, message)


async def _answer(scope, send, error: APIError) -> None:
    """`error` in the shape of the path's face; the connection is closed, since the body was not read."""
    if scope["path"].startswith(OPENAI_PREFIX):
        status, content = openai_body(error.status, error.code, error.message, error.field)
    else:
        status, content = error.status, body(error.code, error.message, error.field)
    payload = json.dumps(content).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"connection", b"close"),
        *((k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class Gate:
    def __init__(self, app, services):
        self.app, self.services = app, services

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if needs_key(scope["path"]):
            try:
                found = await authenticate(self.services, headers.get(b"authorization", b"").decode("latin-1"))
            except APIError as exc:
                return await _answer(scope, send, exc)
            scope.setdefault("state", {})[PRINCIPAL] = found  # `api.auth.principal` takes it from there
        max_bytes, setting = limit(scope["method"], scope["path"], self.services.settings)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            return await _answer(scope, send, TooLarge(max_bytes, setting))
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    raise TooLarge(max_bytes, setting)
            return message

        await self.app(scope, counted, send)
