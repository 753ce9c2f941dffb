"""A host's cache of models fetched from storage: one folder per URI, evicted least recently used first once the
folders take more than a size cap. The worker's jobs and `prefq serve` on the same host share it
(`<work_dir>/models`). A folder in use holds a shared `flock`; a fetch holds an exclusive one, so one process
fetches a model while the others wait, and no folder in use is evicted.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("prefq.storage")
COMPLETE = ".complete"


def try_lock(path: Path, mode: int) -> int | None:
    """An open descriptor holding a lock on `path` (created if missing), or None if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


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
            # shared first: a complete folder is used beside its other users (a `prefq serve` child may hold it for
            # as long as it serves the model); only a miss waits for the exclusive lock of the one fetch
            fcntl.flock(fd, fcntl.LOCK_SH)
            if not (folder / COMPLETE).is_file():
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
            fd = try_lock(folder.with_suffix(".lock"), fcntl.LOCK_EX)
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
