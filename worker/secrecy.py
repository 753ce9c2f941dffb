"""Keeping the worker's secrets from its training runs (Linux; elsewhere this does nothing).

A run's own environment is clean (`training.launch.run_env`), but it runs as the worker's user, and its worker's
environment is not: `/proc/<worker>/environ` (and `/proc/<worker>/mem`) hold the storage secret, the database URL
and the callback secret. The kernel lets one process read those files of another only with ptrace read access,
which it refuses when
- the target is not dumpable and the reader lacks CAP_SYS_PTRACE: `hide_worker` makes every worker process (the
  Celery main process and each pool process) not dumpable. That is enough where the worker runs as an ordinary
  user (the images run as uid 10001).
- the reader holds a capability the target does not (commoncap). Where the worker runs as root, a run started
  the ordinary way holds every capability, CAP_SYS_PTRACE too, and reads a non-dumpable worker all the same
  (measured here). `confine_run`, run in the child before exec, makes the run root without capabilities:
  SECBIT_NOROOT (locked) so that exec grants uid 0 none, the ambient set emptied, and no_new_privs so that no
  setuid program or file capability gives any back. A training run needs none.
A root worker without CAP_SETPCAP cannot set SECBIT_NOROOT: its runs keep its bounding set (Docker's default set
has no CAP_SYS_PTRACE, so non-dumpable still holds there).
"""

from __future__ import annotations

import ctypes
import sys

from celery import signals

from training.parent import die_with_parent

PR_SET_DUMPABLE, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 4, 28, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECBIT_NOROOT, SECBIT_NOROOT_LOCKED = 1 << 0, 1 << 1
# Resolved now, in the worker: a forked child should not load libraries before it execs.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


@signals.worker_init.connect
@signals.worker_process_init.connect
def hide_worker(**_) -> None:
    """This process's /proc files become readable only with CAP_SYS_PTRACE (and it dumps no core)."""
    if _prctl is not None:
        _prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def confine_run() -> None:
    """`preexec_fn` of a training run: it dies with its parent (`die_with_parent`) and execs without capabilities.
    Each step that the kernel refuses (an unprivileged worker has nothing to give up) is skipped."""
    die_with_parent()
    if _prctl is not None:
        _prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED, 0, 0, 0)
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
