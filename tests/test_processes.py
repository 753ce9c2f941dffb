"""prefq's processes and their surroundings: the dev stack dies with its parent, no process imports from its
working folder, and the database-wide metrics are a valid, exported-once Prometheus histogram."""

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
from prometheus_client import CollectorRegistry, generate_latest

from jobs.db import make_engine, upgrade
from jobs.models import Job, JobStatus, new_id
from jobs.store import JobStore
from settings import Settings
from tests.conftest import ROOT
from worker.metrics import DatabaseCollector

PREFQ = os.path.join(os.path.dirname(sys.executable), "prefq")


def test_the_dev_stack_dies_with_its_parent_even_by_sigkill(tmp_path):
    """An OOM kill or a closed terminal's hard kill of `prefq dev` leaves no broker, API or worker holding ports."""
    from cli.stack import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFQ_")}
    dev = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli.app",
            "dev",
            "--port",
            str(port),
            "--flower-port",
            "0",
            "--data-dir",
            str(tmp_path / "dev"),
            "--cpu-devices",
            "0",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    health = tmp_path / "dev" / "work" / "health"  # written once a worker is ready, its pool started

    def up() -> bool:  # every process started, the API ready, both workers ready
        try:
            ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
        return ready and len(list(health.glob("*.json"))) >= 2

    deadline = time.monotonic() + 90
    while not up() and time.monotonic() < deadline:
        assert dev.poll() is None, "prefq dev exited"
        time.sleep(0.3)
    children = psutil.Process(dev.pid).children(recursive=True)
    assert up() and len(children) >= 3, [c.cmdline() for c in children]
    dev.send_signal(signal.SIGKILL)
    dev.wait()
    gone, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, [p.cmdline() for p in alive]


def test_no_prefq_process_imports_from_its_working_folder(tmp_path, broker_url):
    """Workers and the API started from a folder that holds `storage/`, `jobs/`, ... folders (common names), a
    `queue_config.py` and a `settings.py` run prefq's own packages, not those."""
    from cli.stack import free_port, wait_for_port
    from training.parent import die_with_parent

    for name in ("storage", "jobs", "worker", "api", "training", "cli", "serve"):
        (tmp_path / name).mkdir()
    for name in ("queue_config.py", "settings.py"):
        (tmp_path / name).write_text("raise ImportError('the working folder was imported')\n")
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PREFQ_")}
    env.update(PREFQ_DATA_DIR=str(data), PREFQ_BROKER_URL=broker_url.rsplit("/", 1)[0] + "/3", PREFQ_METRICS_PORT="0")
    upgrade(Settings(data_dir=data).database_url)
    port = free_port()
    procs = [
        subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        for cmd in ([PREFQ, "worker", "--service", "--name", "cwd-test@%h"], [PREFQ, "api", "--port", str(port)])
    ]
    try:
        wait_for_port(port, 60)
        deadline = time.monotonic() + 60
        while not list((data / "work" / "health").glob("cwd-test@*.json")) and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), "a process died at start-up"
            time.sleep(0.3)
        assert list((data / "work" / "health").glob("cwd-test@*.json")), "the worker came up"
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=60)


def test_the_run_time_histogram_never_decreases_and_is_exported_once(tmp_path):
    settings = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0")
    upgrade(settings.database_url)
    store = JobStore(make_engine(settings.database_url))
    job = Job(id=new_id("job"), method="dpo", trainer="basic", gpus=1, model="/m", dataset_id="ds_x")
    store.create_jobs([(job, [])])
    store.claim(job.id, 1, "w", 30)
    store.finish(job.id, 1, "w", JobStatus.failed, error_code="run_crashed", error_is_user=False)

    def scrape(holder: str) -> str:
        registry = CollectorRegistry()
        registry.register(_NoBroker(settings, store, holder))
        return generate_latest(registry).decode()

    first = scrape("a")
    assert 'prefq_job_duration_seconds_count{status="failed"} 1.0' in first
    assert store.retry(job.id, 3) == 2  # the job is no longer finished: a derived histogram would go down
    assert 'prefq_job_duration_seconds_count{status="failed"} 1.0' in scrape("a")
    other = scrape("b")  # a second service worker: exports nothing database-wide
    assert "prefq_exporter_active 0.0" in other and "prefq_jobs" not in other


class _NoBroker(DatabaseCollector):
    """The exporter without a broker to count queue depths in (not what this test is about)."""

    def collect(self):
        import worker.metrics as m

        real, m.queue_depths = m.queue_depths, lambda url: {}
        try:
            yield from super().collect()
        finally:
            m.queue_depths = real


def test_free_port_never_hands_out_a_port_twice():
    """Two servers that start at once are each given a port before either binds it: the ports must differ (the
    tests' MLflow server and Ray's head were once given the same one, and MLflow found it taken)."""
    from cli.stack import free_port

    ports = [free_port() for _ in range(3000)]
    assert len(set(ports)) == len(ports)
