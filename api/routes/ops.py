"""Health, readiness, Prometheus metrics and the worker pool."""

from __future__ import annotations

import time

import redis
from fastapi import APIRouter, Depends, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import text

from api.deps import Services, services
from api.schemas import WorkerPublic, WorkersPublic
from jobs.models import JobStatus
from queue_config import CPU_QUEUE, SERVICE_QUEUE, gpu_queue

router = APIRouter(tags=["ops"])  # open: probes and scrapes carry no key
protected = APIRouter(tags=["ops"])
QUEUES = [CPU_QUEUE, SERVICE_QUEUE] + [gpu_queue(n) for n in (1, 2, 3, 4, 5, 6, 7, 8)]
PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")  # kombu's Redis keys per priority step
DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600, 72 * 3600)


@router.get("/healthz")
def healthz() -> dict:
    """The process answers."""
    return {"status": "ok"}


def _check(fn) -> str:
    try:
        fn()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - a probe reports any failure
        return f"error: {type(exc).__name__}: {exc}"


@router.get("/readyz")
def readyz(response: Response, svc: Services = Depends(services)) -> dict:
    """Database, broker and storage answer."""

    def database():
        with svc.store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    checks = {
        "database": _check(database),
        "broker": _check(lambda: redis.Redis.from_url(svc.settings.broker_url, socket_timeout=2).ping()),
        "storage": _check(lambda: svc.storage.exists("readyz-probe")),
    }
    ready = all(v == "ok" for v in checks.values())
    response.status_code = 200 if ready else 503
    return {"status": "ok" if ready else "unavailable", "checks": checks}


def queue_depths(broker_url: str) -> dict[str, int]:
    client = redis.Redis.from_url(broker_url, socket_timeout=2)
    with client.pipeline() as pipe:
        for queue in QUEUES:
            for suffix in PRIORITY_SUFFIXES:
                pipe.llen(queue + suffix)
        lengths = pipe.execute()
    n = len(PRIORITY_SUFFIXES)
    return {q: sum(lengths[i * n:(i + 1) * n]) for i, q in enumerate(QUEUES)}


class _JobCollector:
    def __init__(self, svc: Services):
        self.svc = svc

    def collect(self):
        counts = self.svc.store.count_by_status()
        jobs = GaugeMetricFamily("prefq_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], counts.get(status.value, 0))
        yield jobs
        depth = GaugeMetricFamily("prefq_queue_depth", "Messages waiting per queue", labels=["queue"])
        for queue, n in queue_depths(self.svc.settings.broker_url).items():
            depth.add_metric([queue], n)
        yield depth
        durations = sorted(self.svc.store.durations(time.time() - 24 * 3600))
        buckets = [(str(b), sum(d <= b for d in durations)) for b in DURATION_BUCKETS]
        hist = HistogramMetricFamily("prefq_job_duration_seconds", "Run time of jobs finished in the last 24 h")
        hist.add_metric([], buckets + [("+Inf", len(durations))], sum_value=sum(durations))
        yield hist
        workers = self.svc.store.workers(time.time() - self.svc.settings.worker_live_s)
        yield GaugeMetricFamily("prefq_workers_live", "Workers with a recent heartbeat", value=len(workers))


@router.get("/metrics")
def metrics(svc: Services = Depends(services)) -> Response:
    """Prometheus text format: jobs by status, queue depth, job durations, live workers."""
    registry = CollectorRegistry()
    registry.register(_JobCollector(svc))
    return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")


@protected.get("/workers", response_model=WorkersPublic)
def workers(svc: Services = Depends(services)) -> WorkersPublic:
    """Every worker that has reported, with its devices, current job and last heartbeat."""
    live_since = time.time() - svc.settings.worker_live_s
    data = [WorkerPublic(**w.model_dump(), live=w.last_heartbeat >= live_since) for w in svc.store.workers()]
    return WorkersPublic(data=data)
