"""A warm start for the tests' `run_training`: `python -m tests.warm SOCKET` imports torch, transformers, TRL and the
trainers once, then forks one child per request, which runs `python -m training`'s own `main` with its stdout in a
file. A run then starts in milliseconds instead of the 5 s or so those imports take, about 40 times per suite.

Only `run_training` (run to the end, read the events) uses it, in the caller's environment, and only while the
variables that libraries read at import are those the server started with. Tests of signals and orphans start
`python -m training` themselves (`start_training`), and every job through the queue is started by a worker, so the
real start is tested there.

A request is one JSON line, {"argv": [...], "stdout": PATH, "env": {...}}; the answer one line,
{"returncode": N}, once the child has exited. Requests are served one at a time, as the tests make them.
"""

from __future__ import annotations

import json
import os
import socket
import sys


def _preload() -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from trl import DPOTrainer, KTOTrainer, RewardTrainer, SFTTrainer  # noqa: F401

    import training.dpo  # noqa: F401
    import training.kto  # noqa: F401
    import training.reward  # noqa: F401
    import training.run  # noqa: F401
    import training.samples  # noqa: F401
    import training.sft  # noqa: F401


def _child(request: dict) -> int:
    from training.__main__ import main

    os.environ.clear()
    os.environ.update(request["env"])
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        return main(request["argv"])
    except SystemExit as exc:  # argparse
        return exc.code if isinstance(exc.code, int) else 2
    except BaseException:  # noqa: BLE001 - the child must end in os._exit below, whatever happens
        return 1


def serve(path: str) -> None:
    from training.parent import die_with_parent

    die_with_parent()  # with the test session, however it ends
    _preload()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        conn, _ = server.accept()
        with conn, conn.makefile("rw") as stream:
            request = json.loads(stream.readline())
            pid = os.fork()
            if pid == 0:
                server.close()
                code = 1
                try:
                    code = _child(request)
                finally:
                    sys.stdout.flush()
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            stream.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
            stream.flush()


if __name__ == "__main__":
    serve(sys.argv[1])
