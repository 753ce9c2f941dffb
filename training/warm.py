"""Warm starts: runs forked from a process that has already imported torch, transformers, TRL and the trainers
(`training.forkserver`), instead of started as `python -m training run`. Those imports take about 5 s of every
run's start on CPU; forked, a run starts in milliseconds. This module is the client (torch-free: the worker
imports it) and what client and server agree on.

A run starts cold instead (the caller catches `ColdStart`, with the reason) where a forked one could differ from it:
- the server is not ready (still importing, or it refused to serve: see `fork_hazards`) or has exited;
- the run's environment differs from the server's in more than CUDA_VISIBLE_DEVICES, which CUDA reads when it
  starts, in the run (the worker starts its server in its runs' environment, so only the devices differ);
- the run needs a library that the server leaves out (`LEFT_OUT`: bitsandbytes for a QLoRA run).

A warm run is as a cold one otherwise: its own process group, stdout and stderr, environment and folder, the
descriptors it must hold (its locks), no capabilities (the server was started confined), and it dies with the
server, which dies with the process that started it. Its exit code comes from the server, which is its parent.
Only /proc/PID/environ differs: it shows the environment the server was started with (the devices aside).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

# What may differ between a forked run's environment and the server's: CUDA reads it when it starts, in the run.
PER_RUN = ("CUDA_VISIBLE_DEVICES",)
# Libraries a run marks absent unless it needs them (`training.run._skip_unused_libraries`), and the server too.
LEFT_OUT = ("wandb", "mlflow", "bitsandbytes")
MAX_REQUEST = 256 * 1024  # bytes of one request's JSON; a bigger one starts cold
MAX_FDS = 32
EXIT_LOST = 70  # the server exited before the run: its exit code is unknown (EX_SOFTWARE)


def fork_hazards(harmless: tuple[str, ...] = ()) -> str | None:
    """Why this process must not fork runs, or None: a second Python thread (in a forked child, what it held would
    stay held) other than those named `harmless` (a thread that only sleeps and polls holds nothing), or the CUDA
    driver loaded (a forked child cannot use CUDA once its parent has started it). The native helper threads of torch
    and of pyarrow's allocator are not counted: those libraries reset them at fork."""
    others = [t.name for t in threading.enumerate() if t is not threading.main_thread() and t.name not in harmless]
    if others:
        return f"{len(others) + 1} Python threads ({', '.join(others)})"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    if "libcuda.so" in maps:
        return "the CUDA driver was loaded by the imports"
    return None


def leave_out(names) -> None:
    """Mark `names` absent before anything imports them: `import name` then raises ImportError, and the libraries
    that would load them as they load (peft, transformers, TRL) take them as not installed."""
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = None


class ColdStart(Exception):
    """This run cannot be forked warm; the message says why. Start it the ordinary way."""


def differs(env: dict, server_env: dict) -> str | None:
    """The first variable, other than those of `PER_RUN`, that differs between a run's environment and the server's;
    None where none does. Libraries read the environment when imported (the hub's folders, thread counts, the
    allocator's settings) and Python when it starts: a run forked from the server has read the server's."""
    for name in sorted(set(env) | set(server_env)):
        if name not in PER_RUN and env.get(name) != server_env.get(name):
            return name
    return None


class WarmRun:
    """A run forked by the server: `pid` (also its process group), `poll()` and `wait()` as `subprocess.Popen`'s."""

    def __init__(self, pid: int, conn: socket.socket):
        self.pid = pid
        self.returncode: int | None = None
        self.stdout = None  # the reading end of its stdout, where the caller keeps it
        self._conn = conn
        self._exited = threading.Event()
        try:
            self._pidfd = os.pidfd_open(pid)  # to see it end if the server goes first
        except OSError:
            self._pidfd = None
        threading.Thread(target=self._follow, daemon=True, name=f"warm-run-{pid}").start()

    def _follow(self) -> None:
        try:
            reply = self._conn.recv(4096)
        except OSError:
            reply = b""
        self._conn.close()
        if reply:
            self.returncode = json.loads(reply)["exit"]
        else:  # the server is gone; the run got SIGTERM with it and ends on its own
            if self._pidfd is not None:
                select.select([self._pidfd], [], [])
            self.returncode = EXIT_LOST
        if self._pidfd is not None:
            os.close(self._pidfd)
        self._exited.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(f"warm run {self.pid}", timeout)
        return self.returncode


class WarmStarter:
    """The server process (`python -P -m training warm SOCKET`), started at construction in `env` and `cwd`; it is
    ready once its imports are done. `preexec_fn` confines it (`training.parent.confine_child`)."""

    def __init__(self, env: dict, cwd: str | Path, preexec_fn: Callable[[], None] | None = None, stderr=None):
        self.env = dict(env)
        self.problem: str | None = None  # why it does not serve: it refused to, or it exited
        self.refused = False  # it refused to serve here (`fork_hazards`): starting another would refuse again
        self._folder = tempfile.mkdtemp(prefix="prefq-warm-")  # 0700: the socket is this user's alone
        self.socket_path = os.path.join(self._folder, "sock")
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "training", "warm", self.socket_path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=self.env,
            cwd=cwd,
            start_new_session=True,  # a Ctrl-C in the worker's terminal is the worker's to pass on
            preexec_fn=preexec_fn,
        )
        threading.Thread(target=self._await_ready, daemon=True, name="warm-starter").start()

    def _await_ready(self) -> None:
        line = self.proc.stdout.readline().decode(errors="replace").strip()
        if line == "ready":
            self._ready.set()
        else:
            self.refused = line.startswith("refused: ")
            self.problem = line.removeprefix("refused: ") or f"exited with {self.proc.wait()}"
        self.proc.stdout.close()

    def ready(self, timeout: float = 0) -> bool:
        """Whether it serves runs, waiting up to `timeout` seconds for its imports."""
        return self._ready.wait(timeout) and self.proc.poll() is None

    def alive(self) -> bool:
        """Ready or still importing."""
        return self.problem is None and self.proc.poll() is None

    def start(
        self,
        argv: Sequence[str],
        env: dict,
        cwd: str | Path,
        stdout: int,
        stderr: int,
        keep: Sequence[int] = (),
        wait_s: float = 0,
    ) -> WarmRun:
        """Fork `python -m training ARGV` with these descriptors as its stdout and stderr and `keep` held open;
        raises ColdStart where it cannot (waiting up to `wait_s` for the server's imports)."""
        if not self.ready(wait_s):
            raise ColdStart(f"the warm starter is {'still importing' if self.alive() else 'not running'}")
        changed = differs(env, self.env)
        if changed:
            raise ColdStart(f"{changed} differs from the warm starter's")
        request = json.dumps({"argv": list(argv), "env": env, "cwd": str(cwd)}).encode()
        if len(request) > MAX_REQUEST or 2 + len(keep) > MAX_FDS:
            raise ColdStart("the request is too big")
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            conn.settimeout(30)
            conn.connect(self.socket_path)
            socket.send_fds(conn, [request], [stdout, stderr, *keep])
            reply = json.loads(conn.recv(4096) or b"{}")
        except (OSError, ValueError) as exc:
            conn.close()
            raise ColdStart(f"the warm starter did not answer ({exc})") from None
        if "pid" not in reply:
            conn.close()
            raise ColdStart(reply.get("refused", "the warm starter did not answer"))
        conn.settimeout(None)
        return WarmRun(reply["pid"], conn)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._folder, ignore_errors=True)
