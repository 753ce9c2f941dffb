"""The worker's place in the pool: inventory, a heartbeat row that `GET /workers` reads, a health file that
`prefq check` reads, clean shutdown on SIGTERM whichever process gets it, and the service worker's watch
over its embedded beat (the reconciler's clock).

The Celery main process keeps the row and the health file fresh from a thread; the pool child that runs a
job sets `current_job_id`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

from celery import signals
from celery.worker import state as worker_state

from jobs.db import make_engine
from jobs.models import Worker, now
from jobs.service import ServiceLeases
from jobs.store import JobStore
from queue_config import SERVICE_QUEUE
from settings import Settings
from worker import health
from worker.process import stop_run
from worker.reconciler import LEASE as RECONCILER_LEASE
from worker.workdir import sweep

log = logging.getLogger("prefq.worker")
_stop = threading.Event()
stopping = threading.Event()  # in a pool child: this process was told to shut down; its attempt hands back


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


def _settings() -> Settings:
    from worker.app import settings

    return settings


def _store() -> JobStore:
    from worker.app import store

    return store()


def pid_file(name: str) -> Path:
    return _settings().work_dir / "runs" / f"{name}.pid"


def child_file(main_pid: int) -> Path:
    """Where a pool child leaves its pid for its main process (which signals it on shutdown)."""
    return _settings().work_dir / "runs" / f"{main_pid}.child"


def set_current_job(name: str, job_id: str | None) -> None:
    try:
        _store().update_worker(name, current_job_id=job_id, last_heartbeat=now())
    except Exception as exc:  # noqa: BLE001 - the pool row is informational; the attempt goes on
        log.warning("Worker %s: could not record its current job: %s", name, exc)


@contextmanager
def handing_back_on_sigterm(name: str):
    """While an attempt runs in this pool child, SIGTERM (to the worker's process group, or to the child alone)
    makes the attempt checkpoint its run and hand the job back, instead of killing the child at once. Installed
    per attempt: billiard replaces a child's SIGTERM handler after the process initializer."""

    def handler(signum, frame):
        stopping.set()
        stop_run(pid_file(name))

    stopping.clear()  # a SIGTERM to this child alone hands back the attempt it hit, not the ones after it
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@signals.worker_process_init.connect
def _child_starts(**_):
    """A pool child leaves its pid where its main process finds it to signal it on shutdown."""
    path = child_file(os.getppid())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(os.getpid()))


def _heartbeat(store: JobStore, row: Worker, settings: Settings, controller, service: bool) -> None:
    leases = ServiceLeases(store.engine)
    started = now()
    while not _stop.wait(settings.heartbeat_s):
        problems = []
        try:
            if not store.update_worker(row.name, last_heartbeat=now()):
                store.add(row.model_copy(update={"last_heartbeat": now()}))  # the row went away: register again
        except Exception as exc:  # noqa: BLE001 - a database hiccup must not kill the worker
            log.warning("Worker %s: heartbeat failed: %s", row.name, exc)
            problems.append(f"database: {type(exc).__name__}")
        if service:
            problems += _service_problems(controller, leases, settings, started)
        health.write(settings, row.name, "service" if service else "worker", problems)


def _service_problems(controller, leases: ServiceLeases, settings: Settings, started: float) -> list[str]:
    """The service worker's own checks: its beat lives, and the reconciler has run recently."""
    beat = getattr(controller, "beat", None)
    if beat is None or not beat.is_alive():
        code = getattr(beat, "exitcode", None)
        log.critical(
            "Reconciler: the embedded beat has exited (exit code %s); stopping this service worker so "
            "that it is restarted",
            code,
        )
        worker_state.should_stop = 1
        return [f"beat exited (exit code {code})"]
    try:
        lease = leases.get(RECONCILER_LEASE)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return [f"database: {type(exc).__name__}"]
    limit = max(60.0, 3 * settings.reconcile_interval_s)
    last = lease.last_run_at if lease else None
    if now() - started > limit and (last is None or now() - last > limit):
        return [f"the reconciler has not run for {limit:.0f}s"]
    return []


@signals.worker_ready.connect
def _register(sender=None, **_):
    settings = _settings()
    store = JobStore(make_engine(settings.database_url))  # the main process's own engine
    name = sender.hostname
    queues = sorted(q.name for q in sender.app.amqp.queues.consume_from.values())
    service = not (set(queues) - {SERVICE_QUEUE})
    devices = 0 if service else settings.devices  # the service worker trains nothing
    row = Worker(
        name=name,
        hostname=socket.gethostname(),
        pid=os.getpid(),
        queues=queues,
        devices=devices,
        inventory=inventory(settings),
    )
    store.add(row)
    if not service:
        sweep(settings.work_dir)
    else:
        from worker.metrics import start_exporter

        start_exporter(settings, store, name)
    health.write(settings, name, "service" if service else "worker", [])
    threading.Thread(
        target=_heartbeat, args=(store, row, settings, sender.controller, service), daemon=True, name="prefq-heartbeat"
    ).start()
    log.info("Worker %s: serving %s with %s device(s)", name, ",".join(queues), devices)


@signals.worker_shutting_down.connect
def _checkpoint_running_job(sender=None, **_):
    """Warm or cold shutdown (kubectl scale down, Ctrl-C, SIGTERM): the pool child's attempt checkpoints its run
    and hands the job back to the queue, where another worker resumes it."""
    stop_run(pid_file(sender))
    try:
        os.kill(int(child_file(os.getpid()).read_text()), signal.SIGTERM)
    except (OSError, ValueError):
        pass


@signals.worker_shutdown.connect
def _unregister(sender=None, **_):
    _stop.set()
    settings = _settings()
    health.remove(settings, sender.hostname)
    child_file(os.getpid()).unlink(missing_ok=True)
    try:
        JobStore(make_engine(settings.database_url)).remove_worker(sender.hostname)
    except Exception as exc:  # noqa: BLE001 - the row goes stale and is shown as not live
        log.warning("Worker %s: could not unregister: %s", sender.hostname, exc)
