"""One error shape for every HTTP error: {"error": {"code", "message", "field", "details"}}; under `/v1` (OpenAI's
face, `api.openai`) OpenAI's: {"error": {"message", "type", "param", "code"}}, with 400 for an invalid request.

Every route lists the errors it can answer in its `responses=` (see `responses`), so that the OpenAPI
document shows them. A crash answers 500 with a request id, never the exception's text or SQL: the log has
the rest.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.methods import allowed_methods
from api.service.errors import Conflict, Invalid, NotFound, ServiceError, TooMany, Unavailable, Upstream

log = logging.getLogger("prefq.api")


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None
    details: list[dict] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


_WHAT = {
    400: "The request cannot be read (malformed JSON or form, a bad header)",
    401: "No API key, or not a valid one: send `Authorization: Bearer <key>`",
    403: "The key may not do this (an admin key is needed)",
    404: "No such object (or not this key's tenant's)",
    409: "The object is not in a state that allows this",
    413: "The upload is larger than the server's limit",
    422: "The request is invalid: `field` names what is wrong",
    429: "Too many unfinished jobs for this tenant: retry after `Retry-After` seconds",
    502: "The generation service (prefq serve) answered something unexpected",
    503: "A service the request needs (the broker, the generation service) is unavailable: retry later",
    504: "The generation ran past its time limit",
}


def responses(*codes: int) -> dict:
    """`responses=` of a route: each status it can answer, with the one error shape."""
    return {code: {"model": ErrorBody, "description": _WHAT[code]} for code in codes}


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


def openai_responses(*codes: int) -> dict:
    """`responses=` of a `/v1` route: 400 for any invalid request (OpenAI's, where the native API answers 422),
    and each other status it can answer, all in OpenAI's error shape."""
    what = {**_WHAT, 400: "The request is invalid: `param` names what is wrong", "4XX": "Any client error (never 422)"}
    return {code: {"model": OpenAIErrorBody, "description": what[code]} for code in (400, *codes, "4XX")}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        details: list | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.details = status, code, message, field, details
        self.headers = headers


def not_found(what: str, ident: str, field: str | None = None) -> APIError:
    return APIError(404, f"{what}_not_found", f"no {what} with id {ident!r}", field=field)


def body(code: str, message: str, field: str | None = None, details: list | None = None) -> dict:
    error = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    if details is not None:
        error["details"] = details
    return {"error": error}


OPENAI_PREFIX = "/v1/"  # OpenAI's face answers errors in its own shape (`openai_body`)


def openai_body(status: int, code: str, message: str, field: str | None) -> tuple[int, dict]:
    """OpenAI's error shape, {"error": {"message", "type", "param", "code"}}; an invalid request is a 400 there."""
    kind = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    return (400 if status == 422 else status), {
        "error": {"message": message, "type": kind, "param": field, "code": code}
    }


def _answer(request: Request, error: APIError) -> JSONResponse:
    """The error in the shape of the face the request went to: OpenAI's under `/v1`, the native one elsewhere."""
    status = error.status
    if request.url.path.startswith(OPENAI_PREFIX):
        status, content = openai_body(status, error.code, error.message, error.field)
    else:
        content = body(error.code, error.message, error.field, error.details)
    return JSONResponse(content, status_code=status, headers=error.headers)


STATUS = {Invalid: 422, NotFound: 404, Conflict: 409, TooMany: 429, Unavailable: 503}  # the service layer's kinds
Translate = Callable[[ServiceError], tuple[str, str, str | None]]  # a face's table: (code, message, field)
_faces: dict[str, Translate] = {}


def face(prefix: str, translate: Translate) -> None:
    """A face under `prefix` names the service layer's codes and fields its own way (`api.openai` does)."""
    _faces[prefix] = translate


def status_of(exc: ServiceError) -> int:
    if isinstance(exc, Upstream):
        return exc.status
    return next(code for kind, code in STATUS.items() if isinstance(exc, kind))


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _answer(request, exc)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, TooMany) else None
        code, message, field = exc.code, exc.message, exc.field
        for prefix, translate in _faces.items():
            if request.url.path.startswith(prefix):
                code, message, field = translate(exc)
        return _answer(request, APIError(status_of(exc), code, message, field, exc.details, headers))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        details = [{"field": _field(e["loc"]), "reason": e["msg"]} for e in exc.errors()]
        first = details[0] if details else {"field": "body", "reason": "invalid request"}
        message = f"{first['field']}: {first['reason']}"
        return _answer(request, APIError(422, "invalid_request", message, first["field"], details))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {
            400: "bad_request",
            401: "unauthorized",
            403: "forbidden",
            404: "not_found",
            405: "method_not_allowed",
            413: "upload_too_large",
        }.get(exc.status_code, "http_error")
        headers = exc.headers if exc.status_code != 405 else {**(exc.headers or {}), "Allow": allowed_methods(request)}
        return _answer(request, APIError(exc.status_code, code, str(exc.detail), headers=headers))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        request_id = secrets.token_hex(6)
        log.exception("%s %s failed (request %s)", request.method, request.url.path, request_id)
        message = f"internal error (request {request_id}); the server log has the details"
        return _answer(request, APIError(500, "internal_error", message))
