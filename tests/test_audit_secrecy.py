"""A training run cannot read its worker's secrets from /proc (issue 21, item 7): a real stack whose runs carry a
`sitecustomize` (passed on by PYTHONPATH, as a run's environment does) that reads the environment of the warm
starter that forked it, of the pool process above that and of the Celery main process, as hostile code in a run
could.

Two workers: one with every capability (these tests run as root), which its runs could read even when it is not
dumpable, and one without any (as a worker started by an ordinary user, or as root with every capability dropped),
which only its not being dumpable protects."""

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, python_env

HOOK = """
import json, os, sys


def report():
    found, pid = {}, os.getppid()
    while True:  # the warm starter that forked the run, the pool process that runs the job, the Celery main process
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            command = fh.read()
        if b"celery" not in command and b"training" not in command:
            break
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                found[pid] = fh.read().decode(errors="replace")
        except OSError as exc:
            found[pid] = f"refused: {exc.strerror}"
        with open(f"/proc/{pid}/status") as fh:
            pid = next(int(line.split()[1]) for line in fh if line.startswith("PPid:"))
    with open(os.path.join(os.path.dirname(__file__), f"run-{os.getpid()}.json"), "w") as fh:
        json.dump(found, fh)
    os._exit(3)


if "training" in sys.orig_argv and "run" in sys.orig_argv:
    report()
elif "training" in sys.orig_argv and "warm" in sys.orig_argv:
    import atexit

    # code loaded by the warm starter runs in each run it forks: here as the run ends
    os.register_at_fork(after_in_child=lambda: atexit.register(report))
"""


@pytest.fixture(params=["worker with capabilities", "worker without capabilities"])
def hooked_stack(request, tmp_path, broker_url):
    from cli.stack import free_port, wait_for_port
    from jobs.db import upgrade
    from tests.services import Stack, create_pg_database, drop_pg_database

    url, name = create_pg_database()
    upgrade(url)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HOOK)
    secret = secrets.token_hex(16)
    env = dict(
        python_env(),
        PREFQ_DATA_DIR=str(tmp_path / "data"),
        PREFQ_DATABASE_URL=url,
        PREFQ_BROKER_URL=broker_url.rsplit("/", 1)[0] + "/11",
        PREFQ_CALLBACK_SECRET=secret,
        PREFQ_S3_SECRET_ACCESS_KEY=secret,
        PREFQ_CPU_DEVICES="2",
        PREFQ_METRICS_PORT=str(free_port()),
        PREFQ_MODEL_ROOTS=str(tmp_path.parents[1]),
        PYTHONPATH=f"{hooks}{os.pathsep}{ROOT}",
    )
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    stack = Stack(env, tmp_path)
    if request.param == "worker with capabilities":
        stack.up()
    else:
        from training.parent import confine_child

        stack.start("api", "api", "--port", str(stack.port))
        with open(tmp_path / "worker.log", "ab") as log:
            stack.procs["worker"] = subprocess.Popen(
                ["prefq", "worker", "--name", "prefq-test-worker@%h"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=confine_child,
            )
        wait_for_port(stack.port, 60)
        stack.wait_for_worker("prefq-test-worker@")
    yield stack, hooks, secret
    stack.down()
    drop_pg_database(name)


def test_a_training_run_cannot_read_the_environment_of_the_worker_processes_above_it(
    hooked_stack, micro_model, toy_dpo
):
    from tests.services import submit

    stack, hooks, secret = hooked_stack
    submit(stack, micro_model, toy_dpo)
    deadline = time.monotonic() + 180
    while not (runs := list(hooks.glob("run-*.json"))) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert runs, f"no run started; logs in {stack.log_dir}"
    found = json.loads(runs[0].read_text())
    commands = [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() for pid in found]
    assert " -m training warm " in commands[0], f"the run was forked warm: {commands}"
    assert len(found) == 3 and all("celery" in c and "worker.app" in c for c in commands[1:]), commands
    leaked = {pid: text[:80] for pid, text in found.items() if secret in text or "PREFQ_" in text}
    assert not leaked, f"the run read its worker's environment: {leaked}"
