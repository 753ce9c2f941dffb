"""An attempt's run, followed to its exit. Its JSON-lines events (`training.events`) become event rows and the job's
progress and metrics through the attempt's lease, which renews itself meanwhile; each checkpoint the run saves, and
the reference log-probs it computes, are uploaded while it trains (manifest last); its `samples` events are kept as
one artifact. Cancel, a lease that cannot be renewed in time, and the worker's shutdown stop the run: SIGTERM (it
checkpoints), then SIGKILL once its grace is over, and always before the lease may expire (see `worker.lease`).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from jobs import layout
from jobs.models import JobStatus
from storage import Storage, StorageError, put_dir
from training.events import metrics_of, read_event
from training.spec import MANIFEST_NAME
from worker.attempt import Attempt, JobFailed
from worker.inputs import Inputs
from worker.lease import Lease, LeaseLost
from worker.process import RunProcess

log = logging.getLogger("prefq.worker")


@dataclass
class Outcome:
    returncode: int | None = None
    done: dict | None = None  # the `done` event's fields
    error: dict | None = None  # the `error` event's fields
    unplaced: str | None = None  # the `unplaced` event's message: a run of several nodes that Ray could not place
    cancelled: bool = False
    lease_expiring: bool = False  # stopped because the lease could not be renewed in time
    stopping: bool = False  # stopped because the worker shuts down


class Uploader:
    """Uploads checkpoint folders in order on one thread, so training and heartbeats go on meanwhile. Every file
    goes up only while the lease is valid: an attempt that lost it writes nothing more to the job's prefix."""

    def __init__(self, storage: Storage, lease: Lease):
        self.storage, self.lease, self.jobs, self.errors = storage, lease, queue.Queue(), []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _put(self, local: Path, key: str) -> None:
        if not self.lease.valid():
            raise LeaseLost(f"upload of {key} stopped: the lease is gone")
        self.storage.put_file(local, key)

    def _loop(self) -> None:
        while (item := self.jobs.get()) is not None:
            local, prefix = item
            try:
                if local.is_file():  # one file (a reference log-prob cache), to `prefix` + its name
                    self._put(local, prefix + local.name)
                else:
                    put_dir(self.storage, local, prefix, last=MANIFEST_NAME, put=self._put)
            except LeaseLost as exc:
                log.warning("%s", exc)
            except (StorageError, OSError) as exc:
                self.errors.append(f"upload of {local} failed: {exc}")

    def add(self, local: Path, prefix: str) -> None:
        self.jobs.put((local, prefix))

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()


class Follower:
    """Follows one run to its exit (`follow`); `outcome` says how it ended."""

    def __init__(self, a: Attempt, run: RunProcess, inputs: Inputs):
        self.a, self.run, self.refcache_prefix = a, run, inputs.refcache_prefix
        self.samples = list(inputs.samples)  # the job's `samples` events, earlier attempts' first
        self.outcome = Outcome()
        self.uploader = Uploader(a.storage, a.lease)
        self.kill_at: float | None = None  # when the run, told to stop, is SIGKILLed
        self.lengths: dict[str, dict] = {}  # the run's `lengths` events by split, for the job's row

    def follow(self) -> Outcome:
        """Read the run's events until it exits; `LeaseLost` if the lease went meanwhile, `JobFailed` for an
        upload that failed (unless the run was stopped for its lease: the next attempt uploads again)."""
        a, outcome = self.a, self.outcome
        try:
            for line in self.run.output():
                if line is not None:
                    try:
                        self._handle(*read_event(line))
                    except (ValueError, TypeError, KeyError, AttributeError):
                        log.warning("Job %s: unreadable event line %r", a.job_id, line[:200])
                self.kill_at = self._steer() or self.kill_at
                if self.kill_at is not None and time.monotonic() >= self.kill_at and self.run.running():
                    log.warning("Job %s: the run ignored SIGTERM, SIGKILL", a.job_id)
                    self.run.signal(signal.SIGKILL)
        finally:
            outcome.returncode = self.run.wait()
            self.uploader.close()
        if a.lease.lost.is_set():
            raise LeaseLost(f"Job {a.job_id}: attempt {a.attempt} lost its lease; its run is stopped")
        if self.uploader.errors and not outcome.lease_expiring:
            raise JobFailed("storage_error", "; ".join(self.uploader.errors), user_error=False)
        return outcome

    def _handle(self, kind: str, data: dict) -> None:
        a, fields = self.a, {}
        if kind == "started":
            fields["total_steps"] = data["total_steps"]
        elif kind == "progress" and (found := metrics_of(kind, data)):
            fields.update(step=found[0], total_steps=data["total_steps"], metrics=found[1])
        elif kind == "eval" and (found := metrics_of(kind, data)):
            fields["eval_metrics"] = found[1]
        elif kind == "lengths":
            self.lengths[data["split"]] = {k: v for k, v in data.items() if k != "split"}
            fields["lengths"] = dict(self.lengths)
        elif kind == "checkpoint":
            self.uploader.add(Path(data["path"]), layout.checkpoint_prefix(a.job.tenant, a.job_id, data["step"]))
        elif kind == "ref_logprobs" and not data.get("cached") and data.get("path") and self.refcache_prefix:
            self.uploader.add(Path(data["path"]), self.refcache_prefix)  # for the next attempt or job
        elif kind == "samples":
            self._keep_samples(data)
        elif kind == "done":
            self.outcome.done = data
        elif kind == "error":
            self.outcome.error = data
        elif kind == "unplaced":
            self.outcome.unplaced = data.get("message") or "the Ray cluster could not place the job's nodes"
        a.lease.post((kind, data), **fields)
        a.tracker.on_event(kind, data)

    def _keep_samples(self, samples: dict) -> None:
        """Every `samples` event of the job so far, earlier attempts' included, as one artifact (`samples.json`)."""
        self.samples.append(samples)
        path = self.a.work / "artifacts" / layout.SAMPLES_ARTIFACT
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.samples))
        os.replace(tmp, path)  # the uploader reads one whole version
        self.uploader.add(path, layout.artifacts_prefix(self.a.job.tenant, self.a.job_id))

    def _steer(self) -> float | None:
        """Stop the run when the job is cancelled or the lease runs short; returns when to SIGKILL, if due."""
        a, outcome = self.a, self.outcome
        left = a.lease.remaining_s()
        if a.lease.lost.is_set() or left <= a.kill_margin_s:
            self.run.signal(signal.SIGKILL)
            return None
        stop = None
        if a.lease.status == JobStatus.cancelling and not outcome.cancelled:
            log.info("Job %s: cancelling, SIGTERM to the run", a.job_id)
            outcome.cancelled, stop = True, a.settings.cancel_grace_s
        if left <= a.kill_margin_s + a.stop_grace_s and not outcome.lease_expiring:
            log.warning("Job %s: the lease could not be renewed (%.1fs left); stopping the run", a.job_id, left)
            outcome.lease_expiring, stop = True, a.stop_grace_s
        if a.stopping.is_set() and not outcome.stopping:
            log.info("Job %s: the worker is shutting down, SIGTERM to the run", a.job_id)
            outcome.stopping, stop = True, a.settings.cancel_grace_s
        if stop is not None:
            self.run.signal(signal.SIGTERM)
            return time.monotonic() + stop
        return None
