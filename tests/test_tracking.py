"""Experiment tracking against a real `mlflow server` (SQLite store, served artifacts) and W&B in offline mode: a
stack of its own whose workers report to both. One short DPO job (through the OpenAI face, with a `wandb`
integration) is checked in MLflow and in storage; the registry mirror task runs on the service worker; a job still
succeeds once the MLflow server is gone."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import python_env
from tests.services import Stack, submit

WANDB = {"type": "wandb", "wandb": {"project": "toy-project", "name": "toy-run", "tags": ["toy", "dpo"]}}
HYPER = {
    "max_steps": 6,
    "eval_steps": 2,
    "logging_steps": 1,
    "batch_size": 16,
    "learning_rate": 3e-3,
    "lr_scheduler": "constant",
    "max_length": 64,
    "eval_fraction": 0.15,
    "save_steps": 100,
}


def wait_until(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free port with a SQLite store and served artifacts; yields (tracking URI, process)."""
    from cli.stack import free_port, stop
    from training.parent import die_with_parent

    root, port = tmp_path_factory.mktemp("mlflow"), free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    log = open(root / "server.log", "wb")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    log.close()
    uri = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return httpx.get(f"{uri}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None and pytest.fail(f"mlflow server exited; see {root / 'server.log'}")

    wait_until(healthy, 120, f"mlflow server did not answer; see {root / 'server.log'}")
    yield uri, proc
    stop([proc])


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, broker_url, s3, mlflow_server):
    """A stack (its own broker database and PostgreSQL database) whose workers log to MLflow and to W&B offline."""
    from cli.stack import free_port
    from jobs.db import upgrade
    from tests.services import create_pg_database, drop_pg_database

    url, name = create_pg_database()
    upgrade(url)
    env = dict(
        python_env(),
        PREFQ_DATA_DIR=str(tmp_path_factory.mktemp("prefq-tracking")),
        PREFQ_DATABASE_URL=url,
        PREFQ_BROKER_URL=broker_url.rsplit("/", 1)[0] + "/9",
        PREFQ_STORAGE_URL=f"s3://{s3['bucket']}/trk-{secrets.token_hex(3)}",
        PREFQ_S3_ENDPOINT_URL=s3["endpoint_url"],
        PREFQ_S3_ACCESS_KEY_ID=s3["access_key_id"],
        PREFQ_S3_SECRET_ACCESS_KEY=s3["secret_access_key"],
        PREFQ_HEARTBEAT_S="0.5",
        PREFQ_LEASE_TTL_S="10",
        PREFQ_RECONCILE_INTERVAL_S="2",
        PREFQ_CPU_DEVICES="1",
        PREFQ_METRICS_PORT=str(free_port()),
        PREFQ_MODEL_ROOTS=str(tmp_path_factory.getbasetemp()),
        PREFQ_MLFLOW_TRACKING_URI=mlflow_server[0],
        PREFQ_WANDB_MODE="offline",
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
        MLFLOW_HTTP_REQUEST_TIMEOUT="5",
    )
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    stack = Stack(env, tmp_path_factory.mktemp("logs-tracking")).up()
    yield stack
    stack.down()
    drop_pg_database(name)


@pytest.fixture(scope="module")
def toy_file(tracked, toy_dpo, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("trk-data") / "pairs.jsonl"
    path.write_text("".join(toy_dpo.read_text().splitlines(keepends=True)[:160]))
    answer = tracked.http.post("/datasets", files={"file": ("pairs.jsonl", path.read_bytes())})
    assert answer.status_code in (200, 201), answer.text
    return answer.json()["id"]


@pytest.fixture(scope="module")
def trained(tracked, micro_model, toy_file) -> dict:
    """One short DPO job through the OpenAI face with a W&B integration, trained to the end."""
    answer = tracked.http.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": str(micro_model),
            "training_file": toy_file,
            "method": {"type": "dpo"},
            "integrations": [WANDB],
            "prefq": {"hyperparameters": HYPER},
        },
    )
    assert answer.status_code == 200, answer.text
    job = tracked.wait_for(answer.json()["id"], {"succeeded", "failed", "cancelled"}, timeout_s=240)
    assert job["status"] == "succeeded", job
    return job


def mlflow_client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(mlflow_server[0])


def the_run(client, job_id: str):
    experiment = client.get_experiment_by_name("prefq/default")
    runs = client.search_runs([experiment.experiment_id], f"tags.`prefq.job_id` = '{job_id}'")
    assert len(runs) == 1, runs
    return runs[0]


def test_worker_stays_torch_free_and_keeps_tracking_secrets(tmp_path):
    """The worker process imports mlflow and wandb without torch; their credentials never reach the training run."""
    code = (
        "import sys, worker.app, worker.tracking, mlflow, wandb, mlflow.entities; "
        "assert 'torch' not in sys.modules, [m for m in sys.modules if m.startswith('torch')]"
    )
    env = dict(python_env(), PREFQ_DATA_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    from training.launch import run_env

    secret = {
        "MLFLOW_TRACKING_TOKEN": "t",
        "MLFLOW_TRACKING_PASSWORD": "p",
        "WANDB_API_KEY": "k",
        "PREFQ_MLFLOW_TRACKING_URI": "https://user:pass@mlflow.example",
        "PATH": "/bin",
    }
    assert run_env(secret, [], 1).keys() == {"PATH", "PYTHONUNBUFFERED", "CUDA_VISIBLE_DEVICES"}


def test_mlflow_run_of_a_job(tracked, trained, mlflow_server, toy_file, micro_model):
    client = mlflow_client(mlflow_server)
    run = the_run(client, trained["id"])
    assert run.info.run_name == trained["id"] and run.info.status == "FINISHED"
    params = run.data.params
    assert params["method"] == "dpo" and params["trainer"] == "basic" and params["model"] == str(micro_model)
    assert params["dataset"] == toy_file and params["max_steps"] == "6" and params["beta"] == "0.1"
    assert params["result_uri"] == trained["result_uri"] == run.data.tags["prefq.result_uri"]
    assert "train_file" not in params and "ref_cache_dir" not in params, "no paths of the worker"

    events = tracked.get(f"/jobs/{trained['id']}/events")["data"]
    steps = {kind: [e["data"]["step"] for e in events if e["type"] == kind] for kind in ("progress", "eval")}
    assert len(steps["progress"]) == 6 and len(steps["eval"]) >= 3, steps
    for metric, kind in (
        ("loss", "progress"),
        ("rewards/accuracies", "progress"),
        ("learning_rate", "progress"),
        ("eval_loss", "eval"),
        ("eval_rewards/accuracies", "eval"),
    ):
        history = client.get_metric_history(run.info.run_id, metric)
        assert sorted(m.step for m in history) == sorted(steps[kind]), (metric, history)
    assert client.get_metric_history(run.info.run_id, "eval_loss")[-1].value == pytest.approx(
        [e for e in events if e["type"] == "eval"][-1]["data"]["metrics"]["eval_loss"]
    )
    samples = {f"samples/step-{e['data']['step']}-{e['data']['model']}.json" for e in events if e["type"] == "samples"}
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "samples")} if samples else set()
    assert samples <= logged


def test_wandb_offline_run_kept_with_the_job(tracked, trained):
    from jobs import layout
    from storage import open_storage

    storage = open_storage(
        tracked.env["PREFQ_STORAGE_URL"],
        endpoint_url=tracked.env["PREFQ_S3_ENDPOINT_URL"],
        access_key_id=tracked.env["PREFQ_S3_ACCESS_KEY_ID"],
        secret_access_key=tracked.env["PREFQ_S3_SECRET_ACCESS_KEY"],
    )
    prefix = layout.artifacts_prefix("default", trained["id"]) + "wandb/"
    runs = [k for k in storage.list(prefix) if k.endswith(".wandb")]
    assert len(runs) == 1 and "/offline-run-" in runs[0], storage.list(prefix)
    local = Path(tracked.log_dir) / "run.wandb"
    storage.get_file(runs[0], local)
    data = local.read_bytes()  # records are protobufs: their strings are there as they are
    for text in ("toy-project", "toy-run", trained["id"], "eval_loss", "rewards/accuracies"):
        assert text.encode() in data, text


def test_openai_integrations(tracked, micro_model, toy_file):
    """Shapes are checked; a server without W&B refuses any integration, naming the field."""
    from cli.stack import free_port, wait_for_port

    base = {
        "model": str(micro_model),
        "training_file": toy_file,
        "method": {"type": "dpo"},
        "prefq": {"trainer": "fsdp", "gpus": 8},
    }  # no worker here takes 8-device jobs
    for integration, param in (
        ({"type": "comet", "comet": {}}, "integrations.0.type"),
        ({"type": "wandb", "wandb": {"name": "x"}}, "integrations.0.wandb.project"),
        ({"type": "wandb", "wandb": {"project": "p", "colour": "red"}}, "integrations.0.wandb.colour"),
    ):
        answer = tracked.http.post("/v1/fine_tuning/jobs", json={**base, "integrations": [integration]})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text
    answer = tracked.http.post("/v1/fine_tuning/jobs", json={**base, "integrations": [WANDB]})
    assert answer.status_code == 200 and answer.json()["integrations"] == [WANDB], answer.text
    tracked.http.post(f"/v1/fine_tuning/jobs/{answer.json()['id']}/cancel")

    port = free_port()
    tracked.start("api-no-wandb", "api", "--port", str(port), env={"PREFQ_WANDB_MODE": "off"})
    wait_for_port(port, 60)
    answer = httpx.post(
        f"http://127.0.0.1:{port}/v1/fine_tuning/jobs",
        json={**base, "integrations": [WANDB]},
        headers=tracked.http.headers,
        timeout=30,
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "integrations" and "integrations" in answer.json()["error"]["message"]


def test_samples_become_artifacts(mlflow_server, tmp_path):
    """A `samples` event (training.events) becomes a JSON artifact of the run and a W&B table."""
    from jobs.models import Job, JobStatus
    from settings import Settings
    from storage import open_storage
    from worker.tracking import Tracker

    settings = Settings(data_dir=tmp_path, mlflow_tracking_uri=mlflow_server[0], wandb_mode="offline")
    job = Job(
        id=f"job_samples{secrets.token_hex(4)}", method="dpo", trainer="basic", gpus=1, model="m", dataset_id="ds_x"
    )
    samples = {
        "step": 3,
        "model": "policy",
        "seconds": 0.1,
        "time": time.time(),
        "samples": [{"index": 0, "prompt": "Q?", "completion": " A.", "tokens": 2, "reward": 0.5}],
    }
    storage = open_storage(f"file://{tmp_path / 'storage'}")
    tracker = Tracker(settings, job, tmp_path / "work", storage)
    tracker.start({"method": "dpo", "beta": 0.1})
    tracker.on_event("samples", samples)
    tracker.finish(JobStatus.failed)
    client = mlflow_client(mlflow_server)
    run = the_run(client, job.id)
    assert run.info.status == "FAILED"
    local = client.download_artifacts(run.info.run_id, "samples/step-3-policy.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["samples"][0]["completion"] == " A."
    keys = storage.list("")
    assert any(k.endswith(".table.json") and "samples/policy" in k for k in keys), keys


def test_mirror_model_version(tracked, trained, mlflow_server):
    """The task, sent by name to the service queue, registers the version in MLflow with its source, run and
    aliases; a second version takes `production` over; a repeated message changes nothing."""
    from queue_config import make_celery, send_model_mirror
    from settings import Settings

    app = make_celery(Settings(broker_url=tracked.env["PREFQ_BROKER_URL"]), "tests")
    client = mlflow_client(mlflow_server)
    run = the_run(client, trained["id"])
    name = f"toy-{secrets.token_hex(3)}"

    def version_with(alias):
        from mlflow.exceptions import MlflowException

        try:
            return client.get_model_version_by_alias(f"default.{name}", alias)
        except MlflowException:
            return None

    send_model_mirror(
        app, "default", name, 1, trained["result_uri"], ["production", "staging"], {"eval_loss": 0.5}, trained["id"]
    )
    first = wait_until(lambda: version_with("staging"), 60, "version 1 was not mirrored")
    assert first.source == trained["result_uri"] and first.run_id == run.info.run_id
    assert first.tags["prefq.version"] == "1" and first.tags["metric.eval_loss"] == "0.5"
    assert version_with("production").version == first.version

    send_model_mirror(app, "default", name, 2, trained["result_uri"], ["production"], {}, None)
    wait_until(
        lambda: (v := version_with("production")) and v.tags["prefq.version"] == "2",
        60,
        "production did not move to version 2",
    )
    send_model_mirror(app, "default", name, 1, trained["result_uri"], ["staging"], {"eval_loss": 0.5}, trained["id"])
    wait_until(
        lambda: not (set(client.get_model_version(f"default.{name}", first.version).aliases) - {"staging"}),
        60,
        "version 1 kept production",
    )
    assert len(client.search_model_versions(f"name = 'default.{name}'")) == 2


def test_a_promote_through_the_api_is_mirrored_into_mlflows_registry(tracked, trained, mlflow_server):
    """`POST /models/{name}/versions` and `PUT .../aliases/...` on a stack with MLflow: the service worker mirrors the
    version and its aliases as `<tenant>.<name>`."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(mlflow_server)
    name = f"api-{secrets.token_hex(3)}"

    def version_with(alias):
        try:
            return client.get_model_version_by_alias(f"default.{name}", alias)
        except MlflowException:
            return None

    answer = tracked.http.post(f"/models/{name}/versions", json={"job_id": trained["id"], "aliases": ["staging"]})
    assert answer.status_code == 201, answer.text
    mirrored = wait_until(lambda: version_with("staging"), 60, "the promote was not mirrored")
    assert mirrored.source == trained["result_uri"] and mirrored.tags["prefq.version"] == "1"
    assert mirrored.run_id == the_run(client, trained["id"]).info.run_id
    assert tracked.http.put(f"/models/{name}/aliases/production", json={"version": 1}).status_code == 200
    wait_until(lambda: version_with("production"), 60, "the alias was not mirrored")


def test_cancelled_then_retried_job_continues_its_run(tracked, mlflow_server, micro_model, toy_dpo):
    """Cancel marks the run KILLED; the retried attempt finds the same run by its tag and finishes it."""
    job_id = submit(tracked, micro_model, toy_dpo, "--set", "max_steps=40", "--set", "eval_fraction=0.05")
    tracked.wait_for_event(job_id, "progress", timeout_s=120)
    assert tracked.http.post(f"/jobs/{job_id}/cancel").status_code == 200
    assert tracked.wait_for(job_id, {"cancelled", "succeeded", "failed"}, timeout_s=120)["status"] == "cancelled"
    client = mlflow_client(mlflow_server)
    killed = the_run(client, job_id)
    assert killed.info.status == "KILLED"
    steps_before = len(client.get_metric_history(killed.info.run_id, "loss"))
    assert tracked.http.post(f"/jobs/{job_id}/retry").status_code == 202
    job = tracked.wait_for(job_id, {"succeeded", "failed", "cancelled"}, timeout_s=180)
    assert job["status"] == "succeeded", job
    run = the_run(client, job_id)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["prefq.attempt"] == "2" and run.data.params["result_uri"] == job["result_uri"]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert len(history) > steps_before and max(m.step for m in history) == 40


def test_job_succeeds_while_mlflow_is_down(tracked, mlflow_server, micro_model, toy_dpo):
    """With the tracking server gone, a job trains and succeeds; the worker's log says tracking is off."""
    from cli.stack import stop

    stop([mlflow_server[1]])
    job_id = submit(tracked, micro_model, toy_dpo, "--set", "max_steps=2", "--set", "eval_fraction=0.05")
    job = tracked.wait_for(job_id, {"succeeded", "failed", "cancelled"}, timeout_s=180)
    assert job["status"] == "succeeded", job
    log = (Path(tracked.log_dir) / "worker.log").read_text()
    assert f"Job {job_id}: MLflow tracking is off for this attempt" in log, log[-3000:]
