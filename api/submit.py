"""Group commit for `POST /jobs`: the jobs of requests that arrive together are written in one transaction
and sent in one pipelined write to the broker.

One thread takes whatever has queued up while it wrote the previous batch, so a lone request is a batch of
one (no added wait) and a burst shares the commit and the broker round trip. The order of DESIGN.md holds
for every job: its row is committed before its task is sent, and its request is answered after both.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from celery import Celery

from jobs.models import Job
from jobs.store import JobStore
from queue_config import enqueue_job

Events = list[tuple[str, dict]]


class EnqueueFailed(Exception):
    """The broker refused the batch: the job is failed (infrastructure, retryable)."""


@dataclass
class Submitter:
    store: JobStore
    celery: Celery
    max_batch: int = 64  # two broker commands per job (the task and its task-sent event)
    _queue: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def submit(self, job: Job, events: Events) -> Future:
        """A future of (job, created): the job holding the idempotency key when it was used before."""
        future: Future = Future()
        self._queue.put((job, events, future))
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="prefq-submit", daemon=True)
                    self._thread.start()
        return future

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write_and_send(batch)
            except Exception as exc:  # noqa: BLE001 - the database is down: each request answers with the error
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(exc)

    def _write_and_send(self, batch: list[tuple[Job, Events, Future]]) -> None:
        results = self.store.create_jobs([(job, events) for job, events, _ in batch])
        created = [job for job, new in results if new]
        failure, failed = None, set()
        if created:
            try:
                with self.celery.producer_or_acquire() as producer, producer.batch(max_size=2 * self.max_batch):
                    for job in created:
                        enqueue_job(self.celery, job.id, job.attempt, job.gpus, producer=producer)
            except Exception as exc:  # noqa: BLE001 - kombu raises many kinds of connection errors
                # A failed pipeline may have delivered part of the batch: a job a worker has already claimed
                # was sent, and stays; the rest are failed (retryable), so no message waits for a failed row.
                # Their callbacks wait in the outbox: the reconciler sends them once the broker is back.
                failure = EnqueueFailed(f"broker unavailable: {exc}")
                failed = {job.id for job in created if self.store.fail_unsent(job.id, job.attempt, str(failure))}
        for (job, new), (*_, future) in zip(results, batch, strict=True):
            if job.id in failed:  # a twin by idempotency key shares its job's fate
                future.set_exception(failure)
            else:
                future.set_result((job, new))
