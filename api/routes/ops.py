"""Health, readiness, this API process's Prometheus metrics, the reconciler's state, and the worker pool.

Database-wide figures (jobs by status, queue depth, run times, live workers) are exported once for the whole
deployment by the service worker (`worker.metrics`), not by every API replica.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from pydantic import BaseModel
from sqlalchemy import text

from api.auth import Admin
from api.deps import Services, services
from api.errors import responses
from api.schemas import WorkerPublic, WorkersPublic
from jobs.service import ServiceLeases

router = APIRouter(tags=["ops"])  # probes and the scrape carry no key; /workers wants an admin key
REQUESTS = Counter("prefq_api_requests", "HTTP requests answered by this API process", ["route", "status"])


class ReadyPublic(BaseModel):
    status: str
    checks: dict[str, str]
    broker: str  # reported, not required: submissions answer 503 while it is down
    reconciler_last_run_s_ago: float | None


class RequestCounter:
    """ASGI middleware: counts answered requests by route template and status."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def _send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(route, str(status[0])).inc()


@router.get("/healthz")
def healthz() -> dict:
    """The process answers."""
    return {"status": "ok"}


def _check(fn) -> str:
    try:
        fn()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - a probe reports any failure
        return f"error: {type(exc).__name__}"


@router.get("/readyz", response_model=ReadyPublic, responses={503: {"model": ReadyPublic, "description": "not ready"}})
def readyz(response: Response, svc: Services = Depends(services)) -> ReadyPublic:
    """Ready when the database and storage answer. The broker is reported but not required, so that a broker
    outage does not take every API replica out of service (submissions answer 503 meanwhile)."""

    def database():
        with svc.store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    checks = {"database": _check(database), "storage": _check(lambda: svc.storage.exists("readyz-probe"))}
    broker = _check(svc.broker.ping)
    last = None
    if checks["database"] == "ok":
        lease = ServiceLeases(svc.store.engine).get("reconciler")
        last = round(time.time() - lease.last_run_at, 1) if lease and lease.last_run_at else None
    ready = all(v == "ok" for v in checks.values())
    response.status_code = 200 if ready else 503
    return ReadyPublic(
        status="ok" if ready else "unavailable", checks=checks, broker=broker, reconciler_last_run_s_ago=last
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"}
    },
)
def metrics() -> Response:
    """This API process's metrics in Prometheus text format (`prefq_api_requests_total{route,status}`). The
    database-wide ones are on the service worker's `PREFQ_METRICS_PORT`."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get("/workers", response_model=WorkersPublic, responses=responses(401, 403))
def workers(who: Admin, svc: Services = Depends(services)) -> WorkersPublic:
    """Every worker that has reported, with its devices, current job and last heartbeat."""
    live_since = time.time() - svc.settings.worker_live_s
    data = [WorkerPublic(**w.model_dump(), live=w.last_heartbeat >= live_since) for w in svc.store.workers()]
    return WorkersPublic(data=data)
