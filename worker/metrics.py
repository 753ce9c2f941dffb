"""Database-wide metrics, exported once for the whole deployment: by the service worker that holds the
`exporter` lease (renewed at each scrape), on `PREFQ_METRICS_PORT`. Another service worker answers with
`prefq_exporter_active 0` only, so that no figure is counted once per replica.

`prefq_job_duration_seconds` is read from the histogram rows that every terminal transition increments in
its own transaction: its buckets never decrease.
"""

from __future__ import annotations

import logging
import time

import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

from jobs.models import INF_BUCKET, JobStatus
from jobs.service import ServiceLeases, count_by_status, duration_buckets
from jobs.store import JobStore
from queue_config import CPU_QUEUE, SERVICE_QUEUE, gpu_queue, waiting_counts
from settings import Settings

log = logging.getLogger("prefq.worker")
QUEUES = [CPU_QUEUE, SERVICE_QUEUE] + [gpu_queue(n) for n in range(1, 9)]
LEASE = "exporter"


def queue_depths(broker_url: str) -> dict[str, int]:
    return waiting_counts(redis.Redis.from_url(broker_url, socket_timeout=2), QUEUES)


class DatabaseCollector:
    def __init__(self, settings: Settings, store: JobStore, holder: str):
        self.settings, self.store, self.holder = settings, store, holder
        self.leases = ServiceLeases(store.engine)

    def collect(self):
        active = self.leases.acquire(LEASE, self.holder, ttl_s=max(60.0, 4 * self.settings.heartbeat_s))
        yield GaugeMetricFamily(
            "prefq_exporter_active", "1 in the one process that exports database-wide metrics", value=int(active)
        )
        if not active:
            return
        counts = count_by_status(self.store.engine)
        jobs = GaugeMetricFamily("prefq_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], counts.get(status.value, 0))
        yield jobs
        depth = GaugeMetricFamily("prefq_queue_depth", "Messages waiting per queue", labels=["queue"])
        for queue, n in queue_depths(self.settings.broker_url).items():
            depth.add_metric([queue], n)
        yield depth
        hist = HistogramMetricFamily(
            "prefq_job_duration_seconds", "Run time (first start to end) of finished jobs", labels=["status"]
        )
        rows: dict[str, list] = {}
        for row in duration_buckets(self.store.engine):
            rows.setdefault(row.status, []).append(row)
        for status, buckets in sorted(rows.items()):
            inf = next(b for b in buckets if b.le == INF_BUCKET)
            finite = [(f"{b.le:g}", b.count) for b in buckets if b.le != INF_BUCKET]
            hist.add_metric([status], finite + [("+Inf", inf.count)], sum_value=inf.sum_s)
        yield hist
        live = self.store.workers(time.time() - self.settings.worker_live_s)
        yield GaugeMetricFamily("prefq_workers_live", "Workers with a recent heartbeat", value=len(live))


def start_exporter(settings: Settings, store: JobStore, holder: str) -> None:
    if not settings.metrics_port:
        return
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(settings, store, holder))
    try:
        start_http_server(settings.metrics_port, registry=registry)
    except OSError as exc:
        log.warning(
            "Metrics: cannot listen on port %s (%s); this service worker exports no metrics", settings.metrics_port, exc
        )
        return
    log.info("Metrics: database-wide metrics on :%s/metrics", settings.metrics_port)
