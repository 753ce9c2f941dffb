"""Warm starts (`training.warm`): runs forked from a process that imported the trainers once. A forked run is as a
cold one (its own process group, descriptors, folder and environment; it stops with its server), the server keeps
nothing of a request, a run that could differ starts cold, and the worker's jobs start warm and survive a dead
starter."""

import json
import os
import re
import secrets
import signal
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, dpo_spec, python_env
from tests.services import wait
from training.spec import EXIT_OK
from training.warm import EXIT_LOST, ColdStart, WarmStarter


def _env(**changes) -> dict:
    """The tests' environment, the same for every test (as a worker's is for every run)."""
    return {k: v for k, v in python_env().items() if k != "PYTEST_CURRENT_TEST"} | changes


@pytest.fixture(scope="module")
def starter():
    server = WarmStarter(_env(), ROOT)
    assert server.ready(120), server.problem
    yield server
    server.close()


def _start(starter: WarmStarter, tmp_path: Path, spec: dict, env: dict | None = None, keep=()):
    out = tmp_path / "out"
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    events = tmp_path / "events.jsonl"
    with open(events, "wb") as stdout, open(tmp_path / "train.log", "wb") as stderr:
        run = starter.start(
            ["run", "spec.json", "--out", str(out)], env or _env(), tmp_path, stdout.fileno(), stderr.fileno(), keep
        )
    return run, events


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_warm_run_is_a_cold_run_in_its_own_group_folder_and_environment(starter, tmp_path, micro_model, toy_dpo):
    devices = f"GPU-{secrets.token_hex(8)}"  # the one variable that may differ per run (torch on CPU ignores it)
    lock = open(tmp_path / "folder.lock", "w")  # noqa: SIM115 - held across the run, as an attempt's lock is
    env = _env(CUDA_VISIBLE_DEVICES=devices)
    spec = dpo_spec(micro_model, toy_dpo, max_steps=12, save_steps=6, eval_steps=6)
    run, events = _start(starter, tmp_path, spec, env, keep=[lock.fileno()])
    proc = psutil.Process(run.pid)
    assert proc.ppid() == starter.proc.pid
    assert os.getpgid(run.pid) == run.pid != os.getpgid(starter.proc.pid), "a process group of its own"
    assert proc.cwd() == str(tmp_path)
    assert _memory_holds(run.pid, [f"CUDA_VISIBLE_DEVICES={devices}".encode()]), "its devices in its environment"
    assert str(tmp_path / "folder.lock") in [f.path for f in proc.open_files()], "the descriptors it must hold"
    lock.close()
    assert run.wait(300) == EXIT_OK
    kinds = [e["event"] for e in _events(events)]
    assert kinds[:3] == ["lengths", "lengths", "started"] and kinds[-1] == "done", kinds
    assert (tmp_path / "out" / "final").is_dir()
    assert starter.ready(), "the server goes on serving"

    # nothing of the request stays in the memory that later runs are forked from
    found = _memory_holds(starter.proc.pid, [devices.encode(), str(tmp_path).encode()])
    assert not found, f"the warm starter's memory holds {found}"


def _memory_holds(pid: int, needles: list[bytes]) -> list[bytes]:
    """Which of `needles` occur in the writable memory of process `pid` (read as root: it is not dumpable)."""
    found = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) rw", line)
            if not m:
                continue
            start, end = int(m[1], 16), int(m[2], 16)
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            found |= {n for n in needles if n in chunk}
    return sorted(found)


def test_runs_that_could_differ_from_a_cold_start_start_cold(starter, tmp_path, micro_model, toy_dpo):
    spec = dpo_spec(micro_model, toy_dpo, max_steps=2)
    with pytest.raises(ColdStart, match="HF_HOME differs"):  # read when the hub is imported
        _start(starter, tmp_path, spec, _env(HF_HOME=str(tmp_path / "hf")))
    with pytest.raises(ColdStart, match="bitsandbytes"):  # left out of the server, needed to quantize
        _start(starter, tmp_path, dict(spec, lora={"r": 4, "quantize": "4bit"}))

    # the server checks the environment itself too (a client that skipped the check)
    env = _env(TOKENIZERS_PARALLELISM="sometimes")
    starter.env, saved = env, starter.env
    try:
        with pytest.raises(ColdStart, match="TOKENIZERS_PARALLELISM differs"):
            _start(starter, tmp_path, spec, env)
    finally:
        starter.env = saved
    assert not list(tmp_path.glob("out/*")), "a refused run ran nothing"


def test_a_server_with_a_second_thread_refuses_to_fork(tmp_path, micro_model, toy_dpo):
    """A thread started by something the server imported (here a `sitecustomize`) could hold a lock that a forked
    child would wait on forever: the server says so and serves nothing; its runs start cold."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n"
    )
    env = _env(PYTHONPATH=f"{hooks}{os.pathsep}{ROOT}")
    server = WarmStarter(env, ROOT)
    try:
        wait(lambda: server.problem, 120, "the server's answer")
        assert server.refused and "2 Python threads" in server.problem
        assert not server.ready() and not server.alive()
        with pytest.raises(ColdStart, match="not running"):
            _start(server, tmp_path, dpo_spec(micro_model, toy_dpo, max_steps=2), env)
    finally:
        server.close()


def test_a_warm_run_stops_with_a_checkpoint_when_its_server_dies(tmp_path, micro_model, toy_dpo):
    """The server dies with the worker process that started it, and its runs with it: they get SIGTERM, save and
    exit, as a cold run does when its worker dies."""
    server = WarmStarter(_env(), ROOT)
    try:
        assert server.ready(120), server.problem
        spec = dpo_spec(micro_model, toy_dpo, max_steps=5000, save_steps=1000, eval_fraction=0)
        run, events = _start(server, tmp_path, spec)
        wait(lambda: events.exists() and "progress" in events.read_text(), 120, "the run trains")
        server.proc.send_signal(signal.SIGKILL)
        assert run.wait(120) == EXIT_LOST, "its exit code went with the server"
        wait(lambda: not psutil.pid_exists(run.pid), 30, "the run has exited")
        last = _events(events)[-1]
        assert last["event"] == "stopped" and last["checkpoint"], last
        assert not server.ready() and not server.alive()
    finally:
        server.close()


def test_jobs_start_warm_and_a_dead_starter_is_replaced(stack, dpo_job, micro_model, toy_dpo):
    from tests.services import submit

    def launched(job_id: str) -> dict:
        return next(e for e in stack.get(f"/jobs/{job_id}/events")["data"] if e["type"] == "launched")

    def starters() -> list[psutil.Process]:
        """The worker's warm starters; not the runs forked from one, which bear its command line (a slow machine
        may still be ending an earlier job's run)."""
        worker = psutil.Process(stack.procs["worker"].pid)

        def warm(p: psutil.Process) -> bool:
            return p.cmdline()[3:5] == ["training", "warm"]

        found = [p for p in worker.children(recursive=True) if warm(p)]
        return [p for p in found if not any(q.pid == p.ppid() for q in found)]

    assert launched(dpo_job.job["id"])["data"]["warm"] is True
    (old,) = starters()
    old.kill()
    job_id = submit(stack, micro_model, toy_dpo, "--set", "max_steps=2", "--set", "eval_fraction=0")
    assert stack.wait_for(job_id, {"succeeded", "failed", "cancelled"})["status"] == "succeeded"
    assert launched(job_id)["data"]["warm"] is False, "started cold while its starter was gone"
    (new,) = wait(starters, 60, "a new warm starter")
    assert new.pid != old.pid
