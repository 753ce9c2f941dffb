"""The worker's local disk: a folder per attempt, swept when its owner is gone, and a size-capped model cache.

An attempt's folder holds an exclusive `flock` on its `.lock` file for as long as the attempt or any process
of its run lives (the run inherits the locked descriptor). A folder whose lock can be taken belongs to no
live process, so it is removed: when a worker starts on the work folder, and before every attempt. Models
fetched by URI stay in `models/`, shared by the jobs of the host, under a least-recently-used size cap.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("prefq.worker")
LOCK = ".lock"
COMPLETE = ".complete"


def _try_lock(path: Path, mode: int) -> int | None:
    """An open descriptor holding a lock on `path` (created if missing), or None if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


class AttemptDir:
    """`work_dir/<job>/attempt-<n>/`, locked by this process (and the run it starts) until `release`."""

    def __init__(self, work_dir: Path, job_id: str, attempt: int):
        self.path = work_dir / job_id / f"attempt-{attempt}"
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        self.fd = _try_lock(self.path / LOCK, fcntl.LOCK_EX)
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
            fd = _try_lock(lock, fcntl.LOCK_EX)
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


class ModelCache:
    """Models fetched from storage, one folder per URI under `root`, evicted least recently used first once
    they take more than `cap_bytes`. A folder in use holds a shared lock; a fetch holds an exclusive one."""

    def __init__(self, root: Path, cap_bytes: int):
        self.root, self.cap_bytes = root, cap_bytes
        root.mkdir(parents=True, exist_ok=True)

    def _folder(self, uri: str) -> Path:
        return self.root / hashlib.sha1(uri.encode()).hexdigest()[:16]

    def open(self, uri: str, fetch: Callable[[Path], None]) -> tuple[Path, int]:
        """The model's local folder and a descriptor that holds it in use (close it when done); `fetch(folder)`
        downloads it on a miss."""
        folder = self._folder(uri)
        lock = folder.with_suffix(".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # one fetch per model per host; waits for a fetch under way
            if not (folder / COMPLETE).is_file():
                shutil.rmtree(folder, ignore_errors=True)
                fetch(folder)
                (folder / COMPLETE).write_text(uri)
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        os.utime(folder / COMPLETE)  # last use, for the LRU order
        self.evict(keep=folder)
        return folder, fd

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove complete, unused models, oldest use first, until the cache is within its cap."""
        entries = [(p.parent, (p.stat().st_mtime)) for p in self.root.glob(f"*/{COMPLETE}")]
        sizes = {folder: sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) for folder, _ in entries}
        total, removed = sum(sizes.values()), []
        for folder, _ in sorted(entries, key=lambda e: e[1]):
            if total <= self.cap_bytes:
                break
            if folder == keep:
                continue
            fd = _try_lock(folder.with_suffix(".lock"), fcntl.LOCK_EX)
            if fd is None:
                continue  # in use by a run on this host
            try:
                shutil.rmtree(folder, ignore_errors=True)
            finally:
                os.close(fd)
            total -= sizes[folder]
            removed.append(folder)
            log.info("Model cache: evicted %s (%.1f GB), %.1f GB left", folder.name, sizes[folder] / 1e9, total / 1e9)
        return removed
