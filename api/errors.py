"""One error shape for every HTTP error: {"error": {"code", "message", "field", "details"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("prefq.api")


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 details: list | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.details = status, code, message, field, details


def not_found(what: str, ident: str, field: str | None = None) -> APIError:
    return APIError(404, f"{what}_not_found", f"no {what} with id {ident!r}", field=field)


def body(code: str, message: str, field: str | None = None, details: list | None = None) -> dict:
    error = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    if details is not None:
        error["details"] = details
    return {"error": error}


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(body(exc.code, exc.message, exc.field, exc.details), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        details = [{"field": _field(e["loc"]), "reason": e["msg"]} for e in exc.errors()]
        first = details[0] if details else {"field": "body", "reason": "invalid request"}
        return JSONResponse(body("invalid_request", f"{first['field']}: {first['reason']}", first["field"], details),
                            status_code=422)  # fmt: skip

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(exc.status_code, "http_error")
        return JSONResponse(body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(body("internal_error", f"{type(exc).__name__}: {exc}"), status_code=500)
