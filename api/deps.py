"""What the routes share: settings, the job store, storage, the Celery client, the key cache, and typed ids."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Annotated

import httpx
import redis
from celery import Celery
from fastapi import Path, Query, Request
from starlette.concurrency import run_in_threadpool

from api.auth import KeyCache
from api.submit import Submitter
from jobs.keys import KeyStore
from jobs.models import Dataset, Worker
from jobs.registry import Registry
from jobs.store import JobStore
from queue_config import send_callback
from settings import Settings
from storage import Storage

log = logging.getLogger("prefq.api")
ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"  # every id prefq makes; anything else (NUL, slashes, ...) is refused
JobId = Annotated[str, Path(pattern=ID_PATTERN, description="A job id, `job_...`")]
DatasetId = Annotated[str, Path(pattern=ID_PATTERN, description="A dataset id, `ds_...`")]
Cursor = Annotated[str, Query(pattern=ID_PATTERN, description="`next_cursor` of the previous page")]


@dataclass
class Services:
    settings: Settings
    store: JobStore
    storage: Storage
    celery: Celery
    _live: tuple[float, list[Worker]] = (0.0, [])  # (when read, workers): POST /jobs reads it per request
    hub_down_until: float = 0.0  # monotonic time until which hub ids are checked for syntax only (`checks.model`)
    submitter: Submitter = field(init=False)  # POST /jobs writes and sends through it
    key_cache: KeyCache = field(init=False)
    registry: Registry = field(init=False)
    http: httpx.AsyncClient = field(init=False)  # the process's one HTTP client (the hub, prefq serve)
    broker: redis.Redis = field(init=False)  # the process's one Redis client for probes (Celery has its own pool)

    def __post_init__(self) -> None:
        self.registry = Registry(self.store.engine)
        self.submitter = Submitter(self.store, self.celery)
        self.key_cache = KeyCache(KeyStore(self.store.engine))
        self.http = httpx.AsyncClient(timeout=30.0)
        self.broker = redis.Redis.from_url(self.settings.broker_url, socket_timeout=2, socket_connect_timeout=2)

    async def live_workers(self, max_age_s: float = 2.0) -> list[Worker]:
        """Workers with a recent heartbeat, read from the database at most every `max_age_s`."""
        read_at, workers = self._live
        if time.monotonic() - read_at > max_age_s:
            workers = await run_in_threadpool(self.store.workers, time.time() - self.settings.worker_live_s)
            self._live = (time.monotonic(), workers)
        return workers

    async def dataset(self, dataset_id: str) -> Dataset | None:
        """The dataset, if it exists now: read each time (a primary-key read), since any API process may have deleted
        it; a per-process copy would have to ask the database whether it still exists anyway."""
        return await run_in_threadpool(self.store.get_dataset, dataset_id)


async def services(request: Request) -> Services:
    return request.app.state.services


def dispatch_callback(svc: Services, callback_id: str) -> None:
    """Ask the service worker to deliver a callback now; if the broker refuses, the reconciler sends it later."""
    try:
        send_callback(svc.celery, callback_id)
    except Exception as exc:  # noqa: BLE001 - kombu raises many kinds of connection errors
        log.warning("Callback %s: not sent now (%s); the reconciler will", callback_id, exc)
