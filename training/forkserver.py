"""The warm starter's server: `python -m training warm SOCKET` imports torch, transformers, TRL and the trainers once,
then forks one process per run from that state (`training.warm` is the client, the protocol and the reasons).

Each request is one SOCK_SEQPACKET message, a JSON object {"argv", "env", "cwd"} with the run's descriptors attached
(stdout, stderr, then any it must hold, such as its folder's lock). This process never parses a request: it forks
at once and the child reads it, so no request (another job's paths, its environment) stays in the memory that later
runs are forked from. The child
- gets a process group of its own (as `start_new_session` gives a cold run) and dies with this server, which dies
  with the worker process that started it;
- refuses, and exits before running anything, where a cold start would differ: its environment differs from this
  server's in more than its CUDA devices, or the run needs a library that this server left out;
- else answers {"pid": N} on the connection and runs `python -m training ARGV`'s own `main`.
This server answers {"exit": CODE} when the child has exited.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import socket
import sys

from training.parent import die_with_parent, hide_process, make_dumpable
from training.warm import LEFT_OUT, MAX_FDS, MAX_REQUEST, PER_RUN, differs, fork_hazards

_started_with: dict[str, str] = {}  # this server's environment before its imports


def _preload() -> None:
    for name in LEFT_OUT:  # as a run marks them (`training.run._skip_unused_libraries`); a run needing one starts cold
        sys.modules.setdefault(name, None)
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from trl import DPOTrainer, KTOTrainer, RewardTrainer, SFTTrainer  # noqa: F401

    import training.dpo  # noqa: F401
    import training.kto  # noqa: F401
    import training.reward  # noqa: F401
    import training.run  # noqa: F401
    import training.samples  # noqa: F401
    import training.sft  # noqa: F401


def _refusal(argv: list[str], env: dict) -> str | None:
    """Why this run must start cold, or None."""
    changed = differs(env, _started_with)
    if changed:
        return f"{changed} differs from the warm starter's"
    if argv[:1] == ["run"] and len(argv) > 1:
        from training.run import libraries_needed
        from training.spec import load_spec

        try:
            needed = libraries_needed(load_spec(argv[1]))
        except ValueError:  # SpecError: the run itself reports a spec it cannot read
            return None
        if needed:
            return f"the run needs {', '.join(sorted(needed))}"
    return None


def _child(message: bytes, fds: list[int], conn: socket.socket) -> int:
    """In the forked process: become the run described by `message`, or refuse it."""
    os.setpgid(0, 0)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    die_with_parent()
    make_dumpable()  # the server is hidden from its runs; a run is as a cold one is (it resets its own peak memory)
    request = json.loads(message)
    os.chdir(request["cwd"])
    reason = _refusal(request["argv"], request["env"])
    if reason:
        conn.send(json.dumps({"refused": reason}).encode())
        return 0
    devnull = os.open(os.devnull, os.O_RDONLY)
    for target, fd in ((0, devnull), (1, fds[0]), (2, fds[1])):
        os.dup2(fd, target)
    for fd in (devnull, fds[0], fds[1]):
        os.close(fd)
    for name in PER_RUN:
        if name in request["env"]:
            os.environ[name] = request["env"][name]
        else:
            os.environ.pop(name, None)
    conn.send(json.dumps({"pid": os.getpid()}).encode())
    conn.close()
    from training.__main__ import main

    sys.argv = [sys.argv[0], *request["argv"]]
    try:
        return main(request["argv"])
    except SystemExit as exc:  # argparse
        return exc.code if isinstance(exc.code, int) else 2


def _fork(message: bytearray, size: int, fds: list[int], conn: socket.socket, own: list) -> int:
    """Fork the run of one request; `own`: this server's sockets and selector, which the child closes."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for thing in own:
                thing.close()
            code = _child(bytes(message[:size]), fds, conn)
        except BaseException:  # noqa: BLE001 - the child must end in os._exit below, whatever happens
            import traceback

            traceback.print_exc()
        finally:
            atexit._run_exitfuncs()  # as a cold run's interpreter would at exit
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)
    try:
        os.setpgid(pid, pid)  # whichever of the two runs first makes the group
    except OSError:
        pass
    message[:] = bytes(len(message))  # nothing of the request stays here
    for fd in fds:
        os.close(fd)
    return pid


def serve(path: str) -> int:
    _started_with.update(os.environ)
    die_with_parent()
    hide_process()
    _preload()
    hazards = fork_hazards()
    if hazards:
        print(f"refused: {hazards}", flush=True)
        return 1
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(8)
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    conns: dict[int, socket.socket] = {}  # fd -> a client's connection
    runs: dict[int, socket.socket] = {}  # pid -> the connection that asked for it
    buffer = bytearray(MAX_REQUEST)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                conn, _ = listener.accept()
                conns[conn.fileno()] = conn
                selector.register(conn, selectors.EVENT_READ)
            elif key.fileobj is wake_r:
                try:
                    while wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
                _reap(runs)
            else:
                conn = key.fileobj
                try:
                    size, ancdata, flags, _ = conn.recvmsg_into([buffer], socket.CMSG_SPACE(MAX_FDS * 4))
                except OSError:
                    size, ancdata, flags = 0, [], 0
                fds = _received_fds(ancdata)
                selector.unregister(conn)
                del conns[conn.fileno()]
                if size == 0 or len(fds) < 2 or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    for fd in fds:
                        os.close(fd)
                    conn.close()  # the client went away, or sent no run
                    continue
                own = [listener, wake_r, wake_w, selector, *conns.values(), *runs.values()]
                runs[_fork(buffer, size, fds, conn, own)] = conn


def _received_fds(ancdata) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += list(memoryview(data).cast("i")[: len(data) // 4])
    return fds


def _reap(runs: dict[int, socket.socket]) -> None:
    while runs:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = runs.pop(pid, None)
        if conn is not None:
            try:
                conn.send(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode())
            except OSError:
                pass
            conn.close()
