"""The Celery app of the workers: `celery -A worker.app worker` (what `prefq worker` runs). Torch-free.

Store and storage clients are made lazily in each process, after the pool has forked.
"""

from __future__ import annotations

import functools
import logging

from celery import signals

from jobs.db import make_engine
from jobs.store import JobStore
from queue_config import make_celery
from settings import Settings
from storage import Storage, open_storage

settings = Settings()
app = make_celery(settings, "prefq-worker")
log = logging.getLogger("prefq.worker")


@functools.cache
def store() -> JobStore:
    return JobStore(make_engine(settings.database_url))


@functools.cache
def storage() -> Storage:
    return open_storage(settings.storage_url, **settings.storage_options())


@signals.worker_process_init.connect
def _fresh_clients(**_):
    """A forked pool child must not share the parent's database connections."""
    store.cache_clear()
    storage.cache_clear()


import worker.pool  # noqa: E402,F401 - registers the worker heartbeat signals
import worker.secrecy  # noqa: E402,F401 - keeps the worker processes' /proc files from their runs
import worker.tasks  # noqa: E402,F401 - registers the tasks
