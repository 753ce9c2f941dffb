"""ASGI middleware: a request body larger than the upload limit is refused with 413, before it is read when it
declares its length, and as soon as it passes the limit when it does not (chunked)."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException

from api.errors import body


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _message(self) -> str:
        return f"the request body is larger than this server's limit of {self.max_bytes} bytes (PREFQ_MAX_UPLOAD_BYTES)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            payload = json.dumps(body("upload_too_large", self._message(), "file")).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": payload})
            return
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)
