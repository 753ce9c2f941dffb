"""An attempt's run: `python -m training run` as a child process of the worker, which never imports torch; forked
warm (`training.warm`) by the pool process's warm starter where it can be, else started cold.

The run gets a process group of its own, so that a signal reaches every process of it (the ranks that
`accelerate launch` starts included); it dies with the worker and can read none of the worker's /proc files
(`worker.secrecy`), inherits the worker's environment without its secrets (`training.parent.run_env`) and the
locks of its folder and model, prints its events on stdout and its log to `train.log`. SIGTERM asks it to
checkpoint and stop; SIGKILL ends it.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from celery import signals

from training.parent import confine_child, run_env
from training.warm import ColdStart, WarmRun, WarmStarter
from worker.attempt import Attempt

_EOF = object()
log = logging.getLogger("prefq.worker")
WARM_WAIT_S = 120  # a run waits this long for the starter's imports, which a cold start would repeat beside them
_starter: WarmStarter | None = None


def start_warm_starter(settings) -> None:
    """This pool process's warm starter, in its runs' environment (their devices aside): started where it is
    enabled, and started again where it exited or the environment changed (not where it refused to serve)."""
    global _starter
    if not settings.warm_start:
        return
    env = run_env(dict(os.environ), settings.gpu_ids, 0)
    if _starter is not None:
        if (_starter.alive() or _starter.refused) and _starter.env == env:
            return  # serving, importing, or unable to serve on this machine (its runs start cold)
        log.warning("The warm starter stopped (%s); starting another", _starter.problem or "exited or outdated")
        _starter.close()
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    _starter = WarmStarter(env, settings.work_dir, confine_child)


@signals.worker_process_init.connect
def _warm_up(**_) -> None:
    """A training worker's pool process starts its warm starter at once: the imports are done before a job comes."""
    from worker.app import settings

    start_warm_starter(settings)


@signals.worker_process_shutdown.connect
def _cool_down(**_) -> None:
    if _starter is not None:
        _starter.close()


def _start(a: Attempt, cmd: list[str], env: dict) -> tuple[subprocess.Popen | WarmRun, bool]:
    """The run, forked warm where it can be, else started cold; and whether it was forked."""
    with open(a.work / "train.log", "wb") as stderr:  # the child keeps its own descriptor
        if _starter is not None:
            stdout_r, stdout_w = os.pipe()
            try:
                run = _starter.start(cmd[4:], env, a.work, stdout_w, stderr.fileno(), a.held_fds, WARM_WAIT_S)
                run.stdout = os.fdopen(stdout_r, "rb")
                return run, True
            except ColdStart as exc:
                os.close(stdout_r)
                log.info("Job %s: the run starts cold: %s", a.job.id, exc)
                start_warm_starter(a.settings)
            finally:
                os.close(stdout_w)
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            cwd=a.work,
            start_new_session=True,
            pass_fds=a.held_fds,
            preexec_fn=confine_child,
        )
        return proc, False


class RunProcess:
    """The run of one attempt, started at construction; its pid is in `a.pid_file` while it lives."""

    def __init__(self, a: Attempt, spec_path: Path, resume: bool):
        cmd = [sys.executable, "-P", "-m", "training", "run", str(spec_path), "--out", str(a.work / "out")]
        cmd += ["--stop-grace-s", str(a.stop_grace_s)] + (["--resume"] if resume else [])
        self.proc, warm = _start(a, cmd, run_env(dict(os.environ), a.settings.gpu_ids, a.job.gpus))
        self.pid_file = a.pid_file
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.write_text(str(self.proc.pid))
        a.lease.post(("launched", {"pid": self.proc.pid, "resume": resume, "warm": warm}))
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(_EOF)

    def output(self, tick_s: float = 0.1) -> Iterator[str | None]:
        """The run's stdout lines as they come, and None after each `tick_s` without one, until stdout closes."""
        while True:
            try:
                line = self._lines.get(timeout=tick_s)
            except queue.Empty:
                line = None
            if line is _EOF:
                return
            yield line

    def running(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """`sig` to every process of the run."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        """Wait for the run to exit and return its exit code; then no process of it outlives it."""
        returncode = self.proc.wait()
        self.signal(signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return returncode


def stop_run(pid_file: Path) -> None:
    """Ask the run recorded in `pid_file` to checkpoint and stop (the worker is shutting down)."""
    try:
        os.killpg(int(pid_file.read_text()), signal.SIGTERM)
    except (OSError, ValueError):
        pass
