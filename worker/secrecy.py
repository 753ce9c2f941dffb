"""Keeping the worker's secrets from its training runs (`training.parent`): every worker process, the Celery main
process and each pool process, is hidden (not dumpable); each run is started confined (`confine_child`, in
`worker.process`)."""

from __future__ import annotations

from celery import signals

from training.parent import hide_process


@signals.worker_init.connect
@signals.worker_process_init.connect
def hide_worker(**_) -> None:
    hide_process()
