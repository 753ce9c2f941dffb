"""The worker's place in the pool: its inventory and a heartbeat row that `GET /workers` reads.

The Celery main process keeps the row fresh from a thread; the pool child that runs a job sets
`current_job_id`.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
from pathlib import Path

from celery import signals

from jobs.db import make_engine
from jobs.models import Worker, now
from jobs.store import JobStore
from queue_config import SERVICE_QUEUE, Settings
from worker.supervisor import stop_run

log = logging.getLogger("prefq.worker")
_stop = threading.Event()


def gpu_inventory(gpu_ids: list[str]) -> list[dict]:
    """Name and memory of this worker's GPUs from nvidia-smi; empty where there is none."""
    query = ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return [{"index": i, "name": "unknown", "memory_mib": None} for i in gpu_ids]
    rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]
    return [{"index": r[0], "name": r[1], "memory_mib": int(r[2])} for r in rows if r[0] in gpu_ids]


def inventory(settings: Settings) -> dict:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "gpus": gpu_inventory(settings.gpu_ids) if settings.gpu_ids else [],
        "cpu_devices": 0 if settings.gpu_ids else settings.cpu_devices,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1),
    }


def _store() -> JobStore:
    from worker.app import store

    return store()


def pid_file(name: str) -> Path:
    from worker.app import settings

    return settings.work_dir / "runs" / f"{name}.pid"


def set_current_job(name: str, job_id: str | None) -> None:
    _store().update_worker(name, current_job_id=job_id, last_heartbeat=now())


def _beat(store: JobStore, row: Worker, interval_s: float) -> None:
    while not _stop.wait(interval_s):
        try:
            if not store.update_worker(row.name, last_heartbeat=now()):
                store.add(row.model_copy(update={"last_heartbeat": now()}))  # the row went away: register again
        except Exception as exc:  # noqa: BLE001 - a database hiccup must not kill the worker
            log.warning("Worker %s: heartbeat failed: %s", row.name, exc)


@signals.worker_ready.connect
def _register(sender=None, **_):
    from worker.app import settings

    store = JobStore(make_engine(settings.database_url))  # the main process's own engine
    name = sender.hostname
    queues = sorted(q.name for q in sender.app.amqp.queues.consume_from.values())
    devices = settings.devices if set(queues) - {SERVICE_QUEUE} else 0  # the service worker trains nothing
    row = Worker(name=name, hostname=socket.gethostname(), pid=os.getpid(), queues=queues, devices=devices,
                 inventory=inventory(settings))  # fmt: skip
    store.add(row)
    threading.Thread(target=_beat, args=(store, row, settings.heartbeat_s), daemon=True).start()
    log.info("Worker %s: serving %s with %s device(s)", name, ",".join(queues), devices)


@signals.worker_shutting_down.connect
def _checkpoint_running_job(sender=None, **_):
    """Warm or cold shutdown (kubectl scale down, Ctrl-C): the run saves a checkpoint and stops, and its job is
    queued again for another worker, which resumes it."""
    stop_run(pid_file(sender))


@signals.worker_shutdown.connect
def _unregister(sender=None, **_):
    from worker.app import settings

    _stop.set()
    JobStore(make_engine(settings.database_url)).remove_worker(sender.hostname)
