"""The text rule: every string a request brings in is text that PostgreSQL and a UTF-8 answer can hold, with no NUL
character and nothing that UTF-8 cannot encode (a lone surrogate, `\\ud800`-`\\udfff`, which is what a JSON `\\udc00`
escape decodes to). PostgreSQL refuses a NUL; a lone surrogate is stored (JSON columns keep it as an escape) and then
breaks every answer that holds it.

`require_text` applies the rule, app-wide and before any route runs (so before anything is written), to the path
and query parameters (names too), the headers, a JSON body (its keys too) and a form (its fields and file names). A
request that breaks it is a 422 (400 under /v1) naming the field: a JSON body's field as a dotted path
(`metadata.team`, `messages.0.content`), a bad key by the object that holds it. `Text` in `api.schemas` is the same
rule for a model built in code (the dashboard's forms build the API's)."""

from __future__ import annotations

import re

from fastapi import Request
from starlette.datastructures import UploadFile

from api.errors import APIError

NUL = "holds a NUL character"
SURROGATE = "holds a lone surrogate (\\ud800-\\udfff), which is not encodable text"
# Bytes of a JSON body that may decode to a NUL or a lone surrogate: their escapes, a raw surrogate (json.loads
# decodes bytes with "surrogatepass"), and any 0 byte (a UTF-16 or UTF-32 body). A body without them is not walked.
_SUSPECT = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])|\x00|\xed[\xa0-\xbf]")
_FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")


def problem(text: str) -> str | None:
    """Why `text` breaks the rule, or None."""
    if "\x00" in text:
        return NUL
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return SURROGATE
    return None


def checked(text: str) -> str:
    """`text`, or ValueError saying why it breaks the rule (a pydantic validator)."""
    reason = problem(text)
    if reason:
        raise ValueError(reason)
    return text


def first_bad(value: object, where: str = "") -> tuple[str, str] | None:
    """(field, reason) of the first string in a JSON value, object keys included, that breaks the rule; the field
    is dotted from `where` (a bad key is named by the object that holds it), or "body"."""
    stack = [(value, where)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, str):
            if reason := problem(node):
                return at or "body", reason
        elif isinstance(node, dict):
            for key, item in node.items():
                if reason := problem(key):
                    return at or "body", f"a key {reason}"
                stack.append((item, f"{at}.{key}" if at else key))
        elif isinstance(node, list):
            stack += [(item, f"{at}.{i}" if at else str(i)) for i, item in enumerate(node)]
    return None


def _refuse(field: str, reason: str) -> APIError:
    return APIError(422, "invalid_text", f"{field}: {reason}", field=field)


def _pairs(request: Request) -> list[tuple[str, str, str]]:
    """(kind, name, value) of the path and query parameters and the headers."""
    return (
        [("path parameter", k, v) for k, v in request.path_params.items() if isinstance(v, str)]
        + [("query parameter", k, v) for k, v in request.query_params.multi_items()]
        + [("header", k, v) for k, v in request.headers.items()]
    )


async def require_text(request: Request) -> None:
    """The rule over everything the request brings (an app-wide dependency: it runs before the route's own)."""
    for kind, name, value in _pairs(request):
        if reason := problem(name):
            raise _refuse(kind, f"a {kind}'s name {reason}")
        if reason := problem(value):
            raise _refuse(name, reason)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(_FORMS):
        form = await request.form()  # parsed once: the route and its dependencies read the same
        for name, value in form.multi_items():
            if reason := problem(name):
                raise _refuse("form", f"a form field's name {reason}")
            text = (value.filename or "") if isinstance(value, UploadFile) else value
            if reason := problem(text):
                raise _refuse(name, f"its file name {reason}" if isinstance(value, UploadFile) else reason)
        return
    body = await request.body()  # what the route reads too (cached), at most the JSON limit (`api.limits`)
    if not _SUSPECT.search(body):
        return
    try:
        value = await request.json()
    except ValueError:
        return  # not JSON: the route refuses it (or does not read it)
    if bad := first_bad(value):
        raise _refuse(*bad)
