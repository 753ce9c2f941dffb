"""The worker's local disk: a folder per attempt, swept when its owner is gone (the model cache shared with
`prefq serve` is `storage.cache`).

An attempt's folder holds an exclusive `flock` on its `.lock` file for as long as the attempt or any process
of its run lives (the run inherits the locked descriptor). A folder whose lock can be taken belongs to no
live process, so it is removed: when a worker starts on the work folder, and before every attempt. Models
fetched by URI stay in `models/`, shared by the jobs of the host, under a least-recently-used size cap.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from pathlib import Path

from storage.cache import try_lock

log = logging.getLogger("prefq.worker")
LOCK = ".lock"


class AttemptDir:
    """`work_dir/<job>/attempt-<n>/`, locked by this process (and the run it starts) until `release`."""

    def __init__(self, work_dir: Path, job_id: str, attempt: int):
        self.path = work_dir / job_id / f"attempt-{attempt}"
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        self.fd = try_lock(self.path / LOCK, fcntl.LOCK_EX)
        if self.fd is None:
            raise RuntimeError(f"{self.path} is locked by another process")

    def release(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self.fd)
        try:
            self.path.parent.rmdir()  # the job's folder, once its last attempt is gone
        except OSError:
            pass


def sweep(work_dir: Path, min_age_s: float = 30.0) -> list[Path]:
    """Remove the attempt folders of dead attempts; returns them. A folder without a lock file is left alone
    for `min_age_s` (its owner may be between mkdir and lock)."""
    removed = []
    for folder in sorted(work_dir.glob("job_*/attempt-*")):
        lock = folder / LOCK
        if not lock.exists():
            if time.time() - folder.stat().st_mtime < min_age_s:
                continue
            fd = None
        else:
            fd = try_lock(lock, fcntl.LOCK_EX)
            if fd is None:
                continue  # a live attempt
        shutil.rmtree(folder, ignore_errors=True)
        if fd is not None:
            os.close(fd)
        removed.append(folder)
        try:
            folder.parent.rmdir()
        except OSError:
            pass
    if removed:
        log.info("Removed %s folder(s) of dead attempts under %s", len(removed), work_dir)
    return removed
