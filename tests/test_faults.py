"""Faults that a GPU pool sees every day, against the real service (API, Valkey, PostgreSQL, SeaweedFS, Celery
workers, training runs), on a stack of this file's own: its tests kill, cut and restart its processes. Worker A
reaches PostgreSQL and S3 through proxies that a test cuts or slows down; worker B, the API and the service worker
keep their own paths. Each test is a defect found by using prefq from outside, as an operator would.

The short forms of `bench/chaos.py`'s scenarios are here (the long run is `pytest -m chaos`, tests/test_chaos.py):
worker-kill: `test_a_killed_worker_is_replaced_its_job_resumes_and_its_folders_are_swept`; db-outage:
`test_a_database_outage_never_lets_two_attempts_train_at_once`; broker-restart:
`test_a_broker_restart_loses_no_running_or_waiting_job` and `test_queued_jobs_whose_message_is_lost_are_sent_again_once`;
api-kill: `test_an_api_killed_under_concurrent_posts_loses_no_committed_job`; redelivery:
`test_a_redelivered_message_never_trains_a_second_copy`; sigterm-group:
`test_sigterm_to_the_worker_process_group_hands_the_job_back_from_a_fresh_checkpoint`."""

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from sqlmodel import select

from jobs.db import make_engine, session
from jobs.models import Job, JobStatus, new_id
from jobs.service import ServiceLeases
from jobs.store import JobStore
from storage import open_storage, put_dir
from tests.conftest import python_env
from tests.proxy import Proxy
from tests.services import (
    Receiver,
    Stack,
    alive,
    create_pg_database,
    drop_pg_database,
    serve_callbacks,
    submit,
    wait,
)

LEASE_TTL_S = 8
RESEND_AFTER_S = 3


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, s3, pg_template):
    from cli.stack import free_port, start_valkey, stop

    pg_url, pg_name = create_pg_database(template=pg_template)
    broker_port = free_port()
    valkey = start_valkey(broker_port, tmp_path_factory.mktemp("faults-valkey"))
    pg_proxy = Proxy("127.0.0.1", 5432)
    endpoint = urlsplit(s3["endpoint_url"])
    s3_proxy = Proxy(endpoint.hostname, endpoint.port)
    data = tmp_path_factory.mktemp("faults")
    prefix = f"faults-{secrets.token_hex(3)}"
    env = dict(
        python_env(),
        PREFQ_DATA_DIR=str(data),
        PREFQ_DATABASE_URL=pg_url,
        PREFQ_BROKER_URL=f"redis://127.0.0.1:{broker_port}/0",
        PREFQ_STORAGE_URL=f"s3://{s3['bucket']}/{prefix}",
        PREFQ_S3_ENDPOINT_URL=s3["endpoint_url"],
        PREFQ_S3_ACCESS_KEY_ID=s3["access_key_id"],
        PREFQ_S3_SECRET_ACCESS_KEY=s3["secret_access_key"],
        PREFQ_CALLBACK_SECRET="test-secret",
        PREFQ_HEARTBEAT_S="0.5",
        PREFQ_LEASE_TTL_S=str(LEASE_TTL_S),
        PREFQ_RECONCILE_INTERVAL_S="1",
        PREFQ_RESEND_AFTER_S=str(RESEND_AFTER_S),
        PREFQ_CANCEL_GRACE_S="20",
        PREFQ_CPU_DEVICES="1",
        PREFQ_WORKER_LIVE_S="10",
        PREFQ_CALLBACK_TIMEOUT_S="2",
        PREFQ_METRICS_PORT=str(free_port()),
        PREFQ_MODEL_ROOTS=str(tmp_path_factory.getbasetemp()),
        PREFQ_SHARED_MODELS=f"s3://{s3['bucket']}/{prefix}/models",
    )
    env["PATH"] = str(os.path.dirname(sys.executable)) + os.pathsep + env["PATH"]
    stack = Stack(env, tmp_path_factory.mktemp("faults-logs"))
    a_env = {
        "PREFQ_DATABASE_URL": pg_url.replace(":5432/", f":{pg_proxy.port}/"),
        "PREFQ_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_proxy.port}",
        "PREFQ_WORK_DIR": str(data / "work-a"),
    }
    b_env = {"PREFQ_WORK_DIR": str(data / "work-b")}
    stack.start("api", "api", "--port", str(stack.port))
    stack.start("service", "worker", "--service", "--name", "faults-service@%h")
    stack.start("a", "worker", "--name", "faults-a@%h", env=a_env)
    from cli.stack import wait_for_port

    wait_for_port(stack.port, 60)
    stack.wait_for_worker("faults-a@")
    faults = SimpleNamespace(
        stack=stack,
        pg_proxy=pg_proxy,
        s3_proxy=s3_proxy,
        pg_url=pg_url,
        a_env=a_env,
        b_env=b_env,
        data=data,
        store=JobStore(make_engine(pg_url)),
        s3=s3,
        prefix=prefix,
        broker=redis.Redis.from_url(env["PREFQ_BROKER_URL"]),
        broker_port=broker_port,
        valkey=valkey,
        valkey_dir=tmp_path_factory.mktemp("faults-valkey-2"),
    )
    yield faults
    stack.down()
    pg_proxy.close()
    s3_proxy.close()
    stop([faults.valkey])
    drop_pg_database(pg_name)


def events(stack: Stack, job_id: str) -> list[dict]:
    return stack.http.get(f"/jobs/{job_id}/events").json()["data"]


def attempt_pid(stack: Stack, job_id: str, attempt: int) -> int | None:
    return next(
        (e["data"]["pid"] for e in events(stack, job_id) if e["type"] == "launched" and e["attempt"] == attempt), None
    )


def reconciler_passes(faulty, n: int, after: float) -> None:
    """Wait until `n` passes of the reconciler have ended after the wall-clock time `after`: the last of them began
    after it, and saw whatever was there by then."""
    leases, ended = ServiceLeases(faulty.store.engine), set()

    def enough() -> bool:
        lease = leases.get("reconciler")
        if lease and lease.last_run_at and lease.last_run_at > after:
            ended.add(lease.last_run_at)
        return len(ended) >= n

    wait(enough, 60 + n * 5, f"{n} reconciler passes", every_s=0.2)


def test_fetches_and_uploads_keep_the_lease(faulty, micro_model, toy_dpo):
    """A model download longer than the lease: the attempt heartbeats while it fetches, so it is not lost."""
    storage = open_storage(
        f"s3://{faulty.s3['bucket']}/{faulty.prefix}",
        endpoint_url=faulty.s3["endpoint_url"],
        access_key_id=faulty.s3["access_key_id"],
        secret_access_key=faulty.s3["secret_access_key"],
    )
    put_dir(storage, micro_model, "models/micro/")
    size = sum(f.stat().st_size for f in micro_model.iterdir())
    faulty.s3_proxy.bytes_per_s = size / (1.6 * LEASE_TTL_S)  # the fetch takes about 1.6 leases
    try:
        job_id = submit(
            faulty.stack, storage.uri("models/micro/"), toy_dpo, "--set", "max_steps=6", "--set", "eval_fraction=0"
        )
        wait(lambda: attempt_pid(faulty.stack, job_id, 1) or attempt_pid(faulty.stack, job_id, 2), 120, "launched")
    finally:
        faulty.s3_proxy.bytes_per_s = None
    job = faulty.stack.wait_for(job_id, {"succeeded", "failed"})
    kinds = [e["type"] for e in events(faulty.stack, job_id)]
    assert job["status"] == "succeeded" and job["attempt"] == 1, (job, kinds)
    assert "requeued" not in kinds


def test_sigterm_to_the_worker_process_group_hands_the_job_back_from_a_fresh_checkpoint(faulty, micro_model, toy_dpo):
    """How `prefq dev` and process managers stop a worker: every process of its group gets SIGTERM. The run saves a
    checkpoint, it is uploaded, and the job is queued again at once; the next attempt resumes from that step."""
    job_id = submit(
        faulty.stack,
        micro_model,
        toy_dpo,
        "--set",
        "max_steps=5000",
        "--set",
        "save_steps=1000",
        "--set",
        "eval_fraction=0",
    )
    run_pid = wait(lambda: attempt_pid(faulty.stack, job_id, 1), 60, "launched")
    faulty.stack.wait_for_event(job_id, "progress")
    worker = faulty.stack.procs["a"]
    signalled = time.monotonic()
    os.killpg(worker.pid, signal.SIGTERM)
    worker.wait(timeout=60)
    requeued = wait(
        lambda: next((e for e in events(faulty.stack, job_id) if e["type"] == "requeued"), None), 30, "requeued"
    )
    assert requeued["data"] == {"interrupted_attempt": 1} and time.monotonic() - signalled < 20
    assert not alive(run_pid)
    stopped = next(e for e in events(faulty.stack, job_id) if e["type"] == "stopped")["data"]["step"]
    checkpoints = [c["step"] for c in faulty.stack.get(f"/jobs/{job_id}/checkpoints")["data"]]
    assert checkpoints == [stopped], "the checkpoint of the stop was uploaded"
    faulty.stack.start("a", "worker", "--name", "faults-a@%h", env=faulty.a_env)
    started = wait(
        lambda: next((e for e in events(faulty.stack, job_id) if e["type"] == "started" and e["attempt"] == 2), None),
        90,
        "attempt 2 started",
    )
    assert started["data"]["resumed_from_step"] == stopped
    faulty.stack.http.post(f"/jobs/{job_id}/cancel")
    faulty.stack.wait_for(job_id, {"cancelled"}, timeout_s=60)


def test_a_broker_restart_loses_no_running_or_waiting_job(faulty, micro_model, toy_dpo):
    """chaos `broker-restart`, short: Valkey is killed while worker A (one device) trains a job and another waits,
    and started again empty. The worker reconnects and trains on: the running job succeeds on its first attempt;
    the waiting one's message, gone with the broker, is sent again by the reconciler, and it succeeds once."""
    from cli.stack import start_valkey, stop

    running = submit(faulty.stack, micro_model, toy_dpo, "--set", "max_steps=12", "--set", "eval_fraction=0")
    waiting = submit(faulty.stack, micro_model, toy_dpo, "--set", "max_steps=2", "--set", "eval_fraction=0")
    faulty.stack.wait_for_event(running, "progress", timeout_s=120)
    assert faulty.stack.get(f"/jobs/{waiting}")["status"] == "queued" and faulty.broker.llen("gpu1") == 1
    stop([faulty.valkey])
    faulty.valkey = start_valkey(faulty.broker_port, faulty.valkey_dir)
    _resent(faulty, waiting, "not in the broker", timeout_s=60)
    for job_id in (running, waiting):
        job = faulty.stack.wait_for(job_id, {"succeeded", "failed", "cancelled"}, timeout_s=240)
        kinds = [e["type"] for e in events(faulty.stack, job_id)]
        assert job["status"] == "succeeded" and job["attempt"] == 1, (job, kinds)
        assert kinds.count("claimed") == kinds.count("launched") == 1, kinds
    assert [e["type"] for e in events(faulty.stack, running)].count("resent") == 0, "it never left its worker"


def test_a_database_outage_never_lets_two_attempts_train_at_once(faulty, micro_model, toy_dpo):
    """Worker A loses PostgreSQL while it trains; worker B and the reconciler keep it. A must stop its run before its
    lease can expire, so that B's attempt never trains beside it."""
    job_id = submit(
        faulty.stack,
        micro_model,
        toy_dpo,
        "--set",
        "max_steps=5000",
        "--set",
        "save_steps=5",
        "--set",
        "eval_fraction=0",
    )
    pid1 = wait(lambda: attempt_pid(faulty.stack, job_id, 1), 60, "attempt 1 launched")
    faulty.stack.wait_for_event(job_id, "checkpoint")
    faulty.stack.start("b", "worker", "--name", "faults-b@%h", env=faulty.b_env)
    faulty.stack.wait_for_worker("faults-b@")
    faulty.pg_proxy.cut()
    cut_at, overlap, pid1_died = time.monotonic(), [], None
    try:
        while time.monotonic() - cut_at < 40:
            running1 = alive(pid1)
            if not running1 and pid1_died is None:
                pid1_died = time.monotonic() - cut_at
            pid2 = attempt_pid(faulty.stack, job_id, 2)
            if pid2 and running1:
                overlap.append(time.monotonic() - cut_at)
            if pid2 and not running1 and time.monotonic() - cut_at > 1.5 * LEASE_TTL_S:  # past attempt 1's lease
                break
            time.sleep(0.1)
    finally:
        faulty.pg_proxy.restore()
    assert not overlap, f"attempts 1 and 2 trained at once from {overlap[0]:.1f}s after the outage began"
    assert pid1_died is not None and pid1_died < LEASE_TTL_S, f"attempt 1's run lived {pid1_died}s into the outage"
    assert attempt_pid(faulty.stack, job_id, 2), "the reconciler gave the job to a new attempt"
    started = wait(
        lambda: next((e for e in events(faulty.stack, job_id) if (e["attempt"], e["type"]) == (2, "started")), None),
        60,
        "attempt 2 started",
    )
    assert started["data"]["resumed_from_step"] >= 5
    faulty.stack.http.post(f"/jobs/{job_id}/cancel")
    faulty.stack.wait_for(job_id, {"cancelled"}, timeout_s=60)


def test_a_redelivered_message_never_trains_a_second_copy(faulty, micro_model, toy_dpo):
    """chaos `redelivery`, short: a worker C whose visibility timeout (2 s) is shorter than the job makes Redis hand
    the running job's unacknowledged message to the queue again, and an idle worker takes the copy: it finds the job
    leased and exits without training. The job succeeds once, on its first attempt, launched once."""
    work_c = faulty.data / "work-c"
    c = faulty.stack.start(
        "c",
        "worker",
        "--name",
        "faults-c@%h",
        env={**faulty.b_env, "PREFQ_WORK_DIR": str(work_c), "PREFQ_VISIBILITY_TIMEOUT_S": "2"},
    )
    try:
        faulty.stack.wait_for_worker("faults-c@")
        job_id = submit(faulty.stack, micro_model, toy_dpo, "--set", "max_steps=8", "--set", "eval_fraction=0")
        skipped = f"Job {job_id}: attempt 1 is not queued; skipping this message"

        def logs() -> str:
            return "".join((faulty.stack.log_dir / f"{w}.log").read_text(errors="replace") for w in ("a", "b", "c"))

        wait(lambda: skipped in logs(), 120, "a redelivered copy that exits")
        job = faulty.stack.wait_for(job_id, {"succeeded", "failed", "cancelled"}, timeout_s=240)
    finally:
        c.send_signal(signal.SIGTERM)
        c.wait(timeout=60)
    kinds = [e["type"] for e in events(faulty.stack, job_id)]
    assert job["status"] == "succeeded" and job["attempt"] == 1, (job, kinds)
    assert kinds.count("claimed") == kinds.count("launched") == kinds.count("started") == 1, kinds


def test_a_killed_worker_is_replaced_its_job_resumes_and_its_folders_are_swept(faulty, micro_model, toy_dpo):
    """chaos `worker-kill`, short: the worker that trains a job dies by SIGKILL (no goodbye) right after a checkpoint,
    while its upload may be under way. The orphaned run stops itself; the dead attempt's folder is left until the
    worker starts again, which sweeps it; the lease expires, the reconciler queues attempt 2, which resumes from the
    newest complete checkpoint and succeeds; nothing is left in any work folder."""
    job_id = submit(
        faulty.stack, micro_model, toy_dpo, "--set", "max_steps=30", "--set", "save_steps=5", "--set", "eval_fraction=0"
    )
    pid = wait(lambda: attempt_pid(faulty.stack, job_id, 1), 60, "launched")
    claimed = next(e for e in events(faulty.stack, job_id) if e["type"] == "claimed")["data"]["worker"]
    worker = "a" if claimed.startswith("faults-a@") else "b"
    dead = faulty.data / f"work-{worker}" / job_id / "attempt-1"
    wait(lambda: faulty.stack.get(f"/jobs/{job_id}/checkpoints")["data"], 120, "a checkpoint uploaded")
    saved = len([e for e in events(faulty.stack, job_id) if e["type"] == "checkpoint"])
    wait(
        lambda: len([e for e in events(faulty.stack, job_id) if e["type"] == "checkpoint"]) > saved,
        60,
        "the next checkpoint",
        every_s=0.05,
    )
    os.killpg(faulty.stack.procs[worker].pid, signal.SIGKILL)
    faulty.stack.procs[worker].wait()
    wait(lambda: not alive(pid), 30, "the orphaned run stops itself")
    assert dead.is_dir(), "the dead attempt's folder is left behind"
    faulty.stack.start(
        worker, "worker", "--name", f"faults-{worker}@%h", env=faulty.a_env if worker == "a" else faulty.b_env
    )
    wait(lambda: not dead.exists(), 60, "the folder of the dead attempt removed")

    done = faulty.stack.wait_for(job_id, {"succeeded", "failed", "cancelled"}, timeout_s=240)
    assert done["status"] == "succeeded" and done["attempt"] == 2 and done["step"] == 30, done
    history = events(faulty.stack, job_id)
    requeued = next(e for e in history if e["type"] == "requeued")
    assert requeued["attempt"] == 2 and requeued["data"] == {"expired_attempt": 1}
    resumed = next(e for e in history if e["attempt"] == 2 and e["type"] == "started")["data"]["resumed_from_step"]
    complete = [c["step"] for c in faulty.stack.get(f"/jobs/{job_id}/checkpoints")["data"]]
    assert resumed >= 5 and resumed % 5 == 0 and resumed in complete, (resumed, complete)
    assert [e["type"] for e in history].count("claimed") == 2
    for folder in ("work-a", "work-b"):
        wait(lambda f=folder: not list((faulty.data / f).glob("job_*/attempt-*")), 60, f"{folder} clean")


def _unschedulable_job(faulty, toy_dpo, micro_model) -> str:
    return submit(faulty.stack, micro_model, toy_dpo, "--gpus", "8", "--trainer", "fsdp")


def _resent(faulty, job_id: str, reason: str, timeout_s: float = 30) -> dict:
    return wait(
        lambda: next(
            (e for e in events(faulty.stack, job_id) if e["type"] == "resent" and e["data"]["reason"] == reason), None
        ),
        timeout_s,
        f"resent: {reason}",
    )


def test_queued_jobs_whose_message_is_lost_are_sent_again_once(faulty, micro_model, toy_dpo):
    # the broker restarted without its data
    job_id = _unschedulable_job(faulty, toy_dpo, micro_model)
    assert faulty.broker.llen("gpu8") == 1
    faulty.broker.flushall()
    _resent(faulty, job_id, "not in the broker")
    assert faulty.broker.llen("gpu8") == 1
    reconciler_passes(faulty, 2, after=time.time() + RESEND_AFTER_S)  # the job is due again: the one message waits
    assert (
        faulty.broker.llen("gpu8") == 1 and len([e for e in events(faulty.stack, job_id) if e["type"] == "resent"]) == 1
    )

    # a worker that took the message and died before it claimed the job
    code = (
        "import sys, os; from kombu import Connection\n"
        f"with Connection({faulty.stack.env['PREFQ_BROKER_URL']!r}) as c:\n"
        "    q = c.SimpleQueue('gpu8'); m = q.get(timeout=10); print(m.headers['id'], flush=True); os._exit(0)\n"
    )
    took = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=python_env())
    assert took.stdout.strip() == f"{job_id}.1", took.stderr
    assert faulty.broker.llen("gpu8") == 0 and faulty.broker.hlen("unacked") == 1
    _resent(faulty, job_id, "held by a worker that did not claim it")
    assert faulty.broker.llen("gpu8") == 1 and faulty.broker.hlen("unacked") == 0

    # the API killed between its commit and its send: a committed job without a message
    orphan = Job(id=new_id("job"), method="dpo", trainer="fsdp", gpus=8, model=str(micro_model), dataset_id="ds_x")
    faulty.store.create_jobs([(orphan, [("queued", {"queue": "gpu8"})])])
    _resent(faulty, orphan.id, "not in the broker")
    assert faulty.broker.llen("gpu8") == 2
    for jid in (job_id, orphan.id):
        faulty.stack.http.post(f"/jobs/{jid}/cancel")


def test_an_api_killed_under_concurrent_posts_loses_no_committed_job(faulty, micro_model, toy_dpo):
    """chaos `api-kill`, short: the API is SIGKILLed under 20 concurrent POST /jobs, once the first is accepted, and
    started again. Every accepted job was committed, and every committed job ends with exactly one message in its
    queue (the reconciler sends those whose send died with the API); none piles up. Their queue (4 devices) has no
    worker, so nothing trains: the claim of a message is `test_a_redelivered_message_never_trains_a_second_copy`'s."""
    stack, n = faulty.stack, 20
    dataset = stack.http.post("/datasets", files={"file": ("pairs.jsonl", toy_dpo.read_bytes())}).json()["id"]
    body = {"model": str(micro_model), "dataset": dataset, "method": "dpo", "trainer": "fsdp", "gpus": 4}

    def post(_) -> str | None:
        try:
            answer = httpx.post(f"{stack.url}/jobs", json=body, headers=stack.http.headers, timeout=30)
            return answer.json()["id"] if answer.status_code == 202 else None
        except httpx.HTTPError:
            return None

    with ThreadPoolExecutor(n) as pool:
        answers = [pool.submit(post, i) for i in range(n)]
        wait(lambda: any(a.done() and a.result() for a in answers), 60, "a POST accepted", every_s=0.005)
        os.killpg(stack.procs["api"].pid, signal.SIGKILL)
        stack.procs["api"].wait()
        accepted = {a.result() for a in answers} - {None}
    from cli.stack import wait_for_port

    stack.start("api", "api", "--port", str(stack.port))
    wait_for_port(stack.port, 60)
    with session(faulty.store.engine) as db:
        committed = {job.id for job in db.exec(select(Job).where(Job.dataset_id == dataset))}
    assert accepted and accepted <= committed, (accepted, committed)

    def messages() -> list[str]:
        return sorted(json.loads(m)["headers"]["id"] for m in faulty.broker.lrange("gpu4", 0, -1))

    expected = sorted(f"{job_id}.1" for job_id in committed)
    wait(lambda: messages() == expected, 60, f"one message for each of the {len(committed)} committed jobs")
    reconciler_passes(faulty, 2, after=time.time() + RESEND_AFTER_S)  # every job due again: no second copies
    assert messages() == expected
    for job_id in committed:
        stack.http.post(f"/jobs/{job_id}/cancel")
    faulty.broker.delete("gpu4")


def test_every_end_is_told_once(faulty, micro_model, toy_dpo):
    """Every terminal transition has its terminal event and its callback, delivered even when its task is lost."""
    server, url = serve_callbacks()
    try:
        cancelled = submit(
            faulty.stack, micro_model, toy_dpo, "--gpus", "8", "--trainer", "fsdp", "--callback-url", url
        )
        faulty.stack.http.post(f"/jobs/{cancelled}/cancel")
        lost = Job(
            id=new_id("job"), method="dpo", trainer="basic", gpus=8, model="/m", dataset_id="ds_x", callback_url=url
        )
        faulty.store.create_jobs([(lost, [])])
        faulty.store.request_cancel(lost.id)  # as an API process that died before it sent the callback's task
        expired = Job(
            id=new_id("job"),
            method="dpo",
            trainer="basic",
            gpus=8,
            model="/m",
            dataset_id="ds_x",
            callback_url=url,
            max_attempts=1,
        )
        faulty.store.create_jobs([(expired, [])])
        faulty.store.claim(expired.id, 1, "gone", ttl_s=0.1)  # a worker that died, on its last attempt

        def delivered():
            ids = {json.loads(body)["id"]: h for h, body in Receiver.received}
            return ids if {cancelled, lost.id, expired.id} <= ids.keys() else None

        got = wait(delivered, 60, "three callbacks")
        assert got[cancelled]["X-Prefq-Event"] == "job.cancelled" and got[lost.id]["X-Prefq-Event"] == "job.cancelled"
        assert got[expired.id]["X-Prefq-Event"] == "job.failed"
        for jid, status in ((cancelled, "cancelled"), (lost.id, "cancelled"), (expired.id, "failed")):
            assert events(faulty.stack, jid)[-1]["type"] == status
            wait(lambda j=jid: faulty.stack.get(f"/jobs/{j}")["callback_status"] == "delivered", 10, "delivered")
        reconciler_passes(faulty, 2, after=time.time())  # what sends a callback again, had one been left pending
        deliveries = [h["X-Prefq-Delivery"] for h, _ in Receiver.received]
        assert len(deliveries) == len(set(deliveries)) == 3, "each delivered once"
        with faulty.stack.http.stream(
            "GET", f"/jobs/{cancelled}/events", headers={"Accept": "text/event-stream"}, timeout=30
        ) as response:
            lines = list(response.iter_lines())
        streamed = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
        assert streamed and streamed[-1] == "cancelled", ("a live follower sees the end", response.status_code, lines)
    finally:
        server.shutdown()


def test_the_reconciler_runs_whatever_its_data_folder_and_its_death_stops_the_service_worker(faulty, tmp_path):
    """A service worker started with a data folder that does not exist (as compose started it) still reconciles; if
    its beat dies, it exits with a log line instead of reporting ready while no reconciler runs."""
    faulty.stack.procs["service"].send_signal(signal.SIGTERM)
    faulty.stack.procs["service"].wait(timeout=60)
    missing = tmp_path / "no" / "such" / "folder"
    proc = faulty.stack.start(
        "service2", "worker", "--service", "--name", "faults-service2@%h", env={"PREFQ_DATA_DIR": str(missing)}
    )
    job = Job(id=new_id("job"), method="dpo", trainer="basic", gpus=8, model="/m", dataset_id="ds_x")
    faulty.store.create_jobs([(job, [])])
    faulty.store.claim(job.id, 1, "gone", ttl_s=0.1)
    wait(lambda: faulty.store.get_job(job.id).status == JobStatus.queued, 60, "the expired lease reconciled")
    ready = faulty.stack.get("/readyz")
    assert ready["reconciler_last_run_s_ago"] is not None and ready["reconciler_last_run_s_ago"] < 10
    env = {**faulty.stack.env, "PREFQ_DATA_DIR": str(missing)}
    check = subprocess.run(
        [
            "prefq",
            "check",
            "service",
            "--name",
            next(w["name"] for w in faulty.stack.get("/workers")["data"] if w["name"].startswith("faults-service2@")),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr

    import psutil

    (beat,) = psutil.Process(proc.pid).children()  # the embedded beat: the threads pool has no other child
    beat.kill()
    assert proc.wait(timeout=60) == 1
    assert "the embedded beat has exited" in (faulty.stack.log_dir / "service2.log").read_text()
    faulty.stack.http.post(f"/jobs/{job.id}/cancel")
    faulty.stack.start("service", "worker", "--service", "--name", "faults-service@%h")
