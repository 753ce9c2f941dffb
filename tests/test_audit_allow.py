"""A 405 names every method its path takes (issue 21, item 9): Starlette's names only those of the first route
whose path matched (`allow: POST` on /v1/files, which takes GET too). Every route of the real app is tried."""

import re

from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from starlette.staticfiles import StaticFiles

from api.app import create_app
from tests.services import make_key

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def declared(app) -> dict[str, set[str]]:
    """A request path for each route template (parameters filled in), with the methods its routes declare."""
    routes = []
    for route in iter_route_contexts(app.routes):
        methods = route.methods or ({"GET", "HEAD"} if isinstance(getattr(route, "app", None), StaticFiles) else None)
        if methods and route.path_format is not None:  # a mount's format ends in {path}: a file under it
            routes.append((re.sub(r"{[^}]+}", "x9", route.path_format), route.path_regex, methods))
    paths = {path for path, _, _ in routes}
    return {p: set().union(*(m for _, regex, m in routes if regex.match(p))) for p in paths}


def test_a_405_lists_every_method_that_its_path_takes(settings):
    app = create_app(settings)
    client = TestClient(app, headers={"Authorization": f"Bearer {make_key(settings.database_url, 'ops', admin=True)}"})
    wrong = []
    for path, allowed in sorted(declared(app).items()):
        for method in sorted(set(METHODS) - allowed):
            answer = client.request(method, path)
            got = set(filter(None, re.split(r",\s*", answer.headers.get("allow", ""))))
            if answer.status_code != 405 or got != allowed:
                wrong.append(f"{method} {path}: {answer.status_code}, allow {sorted(got)}, routes {sorted(allowed)}")
    assert not wrong, "\n".join(wrong)
