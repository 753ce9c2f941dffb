"""The dashboard at `/ui`: server-rendered pages (Jinja2) over the job store, vendored htmx and uPlot, live updates
from the job's event stream. `install(app)` adds it to the API; it stays out of the OpenAPI document."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from api.ui.session import BadCsrf, SignInNeeded

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
# Scripts only from /ui/static (no inline script runs); uPlot and htmx set inline styles.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": CSP,
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


class PageError(Exception):
    """An error shown as a page (or, to htmx, as a fragment): 404 for another tenant's object, 403, 409."""

    def __init__(self, status: int, title: str, message: str):
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


def _ago(ts: float | None) -> str:
    if not ts:
        return "—"
    s = max(0, int(time.time() - ts))
    return (
        f"{s}s ago"
        if s < 90
        else f"{s // 60}m ago"
        if s < 5400
        else f"{s // 3600}h ago"
        if s < 172800
        else f"{s // 86400}d ago"
    )


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + " UTC" if ts else "—"


templates.env.filters.update(ago=_ago, when=_when)


def render(request: Request, name: str, code: int = 200, **context) -> HTMLResponse:
    """A page (or fragment) with the viewer, its CSRF token and the security headers."""
    viewer = context.get("viewer")
    return templates.TemplateResponse(
        request, name, {"csrf": viewer.csrf if viewer else "", **context}, status_code=code, headers=HEADERS
    )


def install(app: FastAPI) -> None:
    from api.ui import forms, pages, registry

    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    app.include_router(pages.router)
    app.include_router(forms.router)
    app.include_router(registry.router)

    @app.exception_handler(SignInNeeded)
    async def _sign_in(request: Request, exc: SignInNeeded) -> Response:
        if request.headers.get("hx-request"):
            return Response(status_code=204, headers={"HX-Redirect": "/ui/login"})
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/ui/login?next={quote(target, safe='')}", status_code=303)

    @app.exception_handler(BadCsrf)
    async def _bad_csrf(request: Request, exc: BadCsrf) -> Response:
        return render(
            request,
            "error.html",
            403,
            title="Refused",
            message="This form has expired or did not come "
            "from this dashboard (CSRF token missing or wrong). Reload the page and try again.",
        )

    @app.exception_handler(PageError)
    async def _page_error(request: Request, exc: PageError) -> Response:
        return render(request, "error.html", exc.status, title=exc.title, message=exc.message)
