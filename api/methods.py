"""The methods a path takes, for the `Allow` header of a 405 (RFC 9110 15.5.6: every method the target supports).

Starlette's 405 names the methods of the first route whose path matched, so a path served by two routes (`GET`
and `POST /v1/files`) answered `Allow: POST`. This asks every route of the app instead.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.routing import iter_route_contexts
from starlette.routing import Match
from starlette.staticfiles import StaticFiles

STATIC = {"GET", "HEAD"}  # what a mounted StaticFiles serves (a mount itself declares no methods)


def allowed_methods(request: Request) -> str:
    """Every method of every route whose path matches the request's, sorted and comma-separated."""
    scope = request.scope  # inside a mount, root_path is the mount's: the app's own is app_root_path
    probe = {
        "type": "http",
        "path": scope["path"],
        "root_path": scope.get("app_root_path", scope.get("root_path", "")),
        "method": "",
        "headers": [],
    }
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        if route.matches(dict(probe))[0] != Match.NONE:
            methods |= route.methods or (STATIC if isinstance(getattr(route, "app", None), StaticFiles) else set())
    return ", ".join(sorted(methods))
