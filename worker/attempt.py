"""What the phases of one attempt share (`worker.supervisor` runs them): the attempt's context, how it ends, and
the error that fails it."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from jobs.models import Job
from jobs.store import Finished, JobStore
from settings import Settings
from storage import Storage
from worker.lease import Lease
from worker.tracking import Tracker


class JobFailed(Exception):
    """The attempt cannot go on; recorded on the job as (code, message, user's fault)."""

    def __init__(self, code: str, message: str, user_error: bool):
        super().__init__(message)
        self.code, self.message, self.user_error = code, message, user_error


@dataclass
class Result:
    """How the attempt ended: a terminal transition, a new attempt to enqueue, or neither (lease lost)."""

    finished: Finished | None = None
    requeued: int | None = None
    requeued_in_s: float | None = None  # the new attempt's task is sent for then (a job waiting for its nodes)


@dataclass(frozen=True)
class Attempt:
    """One attempt of one job, as its phases see it. Every store write goes through `lease` (fenced by attempt
    and owner) or, at the end, through `store` with the attempt and owner."""

    settings: Settings
    store: JobStore
    storage: Storage
    job: Job  # the row as claimed
    owner: str  # `<worker host>/<pid>/<task id>`: who holds the lease
    lease: Lease
    tracker: Tracker
    work: Path  # the attempt's folder, locked by this process and the run (`worker.workdir.AttemptDir`)
    held_fds: list[int]  # locks the run inherits: its folder's, then the cached model's it reads
    pid_file: Path  # where the worker's main process finds the run to stop it on shutdown
    stopping: threading.Event  # set when this process is told to shut down (SIGTERM)

    @property
    def job_id(self) -> str:
        return self.job.id

    @property
    def attempt(self) -> int:
        return self.job.attempt

    # When renewals fail, the run is SIGTERMed (it checkpoints) `stop_grace_s` before the SIGKILL that comes
    # `kill_margin_s` before the lease may expire: half the lease is tolerance, half the time to stop. A run whose
    # supervisor died stops itself within `stop_grace_s` too (`python -m training run --stop-grace-s`).
    @property
    def kill_margin_s(self) -> float:
        return max(1.0, 0.1 * self.settings.lease_ttl_s)

    @property
    def stop_grace_s(self) -> float:
        ttl, beat = self.settings.lease_ttl_s, self.settings.heartbeat_s
        return max(1.0, min(self.settings.cancel_grace_s, (ttl - beat) / 2 - self.kill_margin_s))
