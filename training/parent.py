"""A child process that dies with the process that started it (Linux)."""

from __future__ import annotations

import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies, even by SIGKILL (Linux only).

    Called in a child before exec (`preexec_fn`) or first thing in a process. A parent that is SIGKILLed
    runs no cleanup, so without this its children (a broker, a training run, a rank holding GPU memory and
    ports) would live on as orphans. SIGTERM lets the child save and exit; SIGKILL is for processes whose own
    supervisor would otherwise wait on them. Elsewhere this does nothing.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
