"""A child process's ties to the process that started it (Linux; elsewhere these do nothing): it dies with its
parent (`die_with_parent`), and it cannot read its parent's secrets (`hide_process` in the parent, `confine_child`
in the child).

A child's own environment can be clean (`run_env`), but `/proc/<parent>/environ` and
`/proc/<parent>/mem` hold the parent's: the storage secret, the database URL, the callback secret. The kernel lets
one process read those files of another only with ptrace read access, which it refuses when
- the target is not dumpable and the reader lacks CAP_SYS_PTRACE: `hide_process`. That is enough where the parent
  runs as an ordinary user (the images run as uid 10001).
- the reader holds a capability the target does not. Where the parent runs as root, a child started the ordinary
  way holds every capability, CAP_SYS_PTRACE too, and reads a non-dumpable parent all the same (measured here).
  `confine_child`, run in the child before exec, makes it root without capabilities: SECBIT_NOROOT (locked) so that
  exec grants uid 0 none, the ambient set emptied, and no_new_privs so that no setuid program or file capability
  gives any back. A training run or a model process needs none.
A root parent without CAP_SETPCAP cannot set SECBIT_NOROOT: its children keep its bounding set (Docker's default set
has no CAP_SYS_PTRACE, so non-dumpable still holds there).
"""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 4, 28, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECBIT_NOROOT, SECBIT_NOROOT_LOCKED = 1 << 0, 1 << 1
# Resolved at import, in the parent: a forked child should not load libraries before it execs.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies, even by SIGKILL.

    Called in a child before exec (`preexec_fn`) or first thing in a process. A parent that is SIGKILLed
    runs no cleanup, so without this its children (a broker, a training run, a rank holding GPU memory and
    ports) would live on as orphans. SIGTERM lets the child save and exit; SIGKILL is for processes whose own
    supervisor would otherwise wait on them.
    """
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def hide_process() -> None:
    """This process's /proc files become readable only with CAP_SYS_PTRACE (and it dumps no core)."""
    if _prctl is not None:
        _prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def make_dumpable() -> None:
    """Undo `hide_process` in a process forked from a hidden one (exec would have done it)."""
    if _prctl is not None:
        _prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)


def confine_child() -> None:
    """`preexec_fn` of a child that runs untrusted work (a training run, a model process): it dies with its parent
    and execs without capabilities. Each step that the kernel refuses (an unprivileged parent has nothing to give
    up) is skipped."""
    die_with_parent()
    if _prctl is not None:
        _prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED, 0, 0, 0)
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


# What a training process inherits of its parent's environment: nothing secret (no storage or callback
# credentials, API keys or database URLs), only what Python, CUDA, the libraries and the hub need.
ENV_PREFIXES = ("CUDA_", "NVIDIA_", "NCCL_", "HF_", "TORCH", "OMP_", "MKL_", "KMP_", "LD_", "PYTHON", "TRANSFORMERS_")
ENV_NAMES = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TZ", "TMPDIR", "VIRTUAL_ENV", "HOSTNAME", "TERM")
ENV_SECRETS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # passed only to hub downloads, never to the run


def run_env(environ: dict, gpu_ids: list[str], gpus: int) -> dict:
    """A training process's environment: its parent's, without secrets (see ENV_PREFIXES), on the first `gpus`
    of `gpu_ids`."""
    env = {k: v for k, v in environ.items() if (k in ENV_NAMES or k.startswith(ENV_PREFIXES)) and k not in ENV_SECRETS}
    env.update(PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES=",".join(gpu_ids[:gpus]))
    return env
