"""One attempt of one job, from claimed to its end, in named phases (as rq splits a job's life):

1. inputs (`worker.inputs`): dataset, model, cached reference log-probs and the newest checkpoint fetched into
   the attempt's folder, and the spec written;
2. the run (`worker.process`): `python -m training run` as a child process in its own process group;
3. following it (`worker.follow`): its events become event rows, progress and uploads, and it is stopped on cancel,
   on shutdown, or before the lease can expire;
4. the conclusion (`worker.conclusion`): succeeded, failed, cancelled, or handed back as the next attempt.

The attempt holds a `Lease` on the job from the claim on; it renews itself through every phase (fetches and
uploads included), and every write is fenced by it: an attempt that lost its lease writes nothing more.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from jobs.models import Job, JobStatus
from jobs.store import JobStore
from settings import Settings
from storage import Storage
from worker import grading
from worker.attempt import Attempt, JobFailed, Result
from worker.conclusion import conclude, fail, finish, hand_back
from worker.follow import Follower
from worker.inputs import fetch_inputs
from worker.lease import Lease, LeaseLost
from worker.process import RunProcess
from worker.tracking import Tracker
from worker.workdir import AttemptDir, sweep

log = logging.getLogger("prefq.worker")


def run_attempt(
    settings: Settings,
    store: JobStore,
    storage: Storage,
    job: Job,
    owner: str,
    pid_file: Path,
    claim_sent: float,
    stopping: threading.Event,
) -> Result:
    """Run the attempt that `owner` claimed (`claim_sent`: the monotonic time the claim was sent) to its end.
    `pid_file`: where the worker's main process finds the run to stop it; `stopping`: set when it shuts down."""
    lease = Lease(store, job.id, job.attempt, owner, settings.lease_ttl_s, settings.heartbeat_s, claim_sent)
    sweep(settings.work_dir)
    folder = AttemptDir(settings.work_dir, job.id, job.attempt)
    tracker = Tracker(settings, job, folder.path, storage)
    a = Attempt(settings, store, storage, job, owner, lease, tracker, folder.path, [folder.fd], pid_file, stopping)
    lease.post(("claimed", {"worker": owner.split("/")[0], "attempt": job.attempt}))
    try:
        inputs = fetch_inputs(a)
        if lease.lost.is_set():
            raise LeaseLost(f"Job {job.id}: attempt {job.attempt} lost its lease while fetching")
        if lease.status == JobStatus.cancelling:
            return Result(finished=finish(a, JobStatus.cancelled))
        if stopping.is_set():
            return Result(requeued=hand_back(a, "interrupted_attempt"))
        with grading.serving(a, inputs.judges, inputs.grading_socket):
            run = RunProcess(a, inputs.spec_path, inputs.resume)
            return conclude(a, Follower(a, run, inputs).follow())
    except JobFailed as exc:
        return fail(a, exc)
    except LeaseLost as exc:
        log.warning("%s; it writes nothing more", exc)
        return Result()
    finally:
        tracker.finish(None, keep=False)  # the lease was lost: nothing more to the job's storage
        lease.close()
        for fd in a.held_fds[1:]:
            os.close(fd)
        folder.release()
