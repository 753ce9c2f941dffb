"""Experiment tracking against a real `mlflow server` (SQLite store, served artifacts) and W&B in offline mode: the
session stack's workers report to both (MLflow through a proxy that a test cuts). conftest's `dpo_job` (through the
OpenAI face, with a `wandb` integration) is checked in MLflow and in storage; the registry mirror task runs on the
service worker; a job still succeeds while the MLflow server cannot be reached."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import python_env
from tests.services import DPO_JOB_HYPER, HUB_ID, WANDB, submit, wait


@pytest.fixture(scope="module")
def toy_file(stack, toy_dpo, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("trk-data") / "pairs.jsonl"
    path.write_text("".join(toy_dpo.read_text().splitlines(keepends=True)[:160]))
    answer = stack.http.post("/datasets", files={"file": ("pairs.jsonl", path.read_bytes())})
    assert answer.status_code in (200, 201), answer.text
    return answer.json()["id"]


def mlflow_client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(mlflow_server.uri)


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

    from training.parent import run_env

    secret = {
        "MLFLOW_TRACKING_TOKEN": "t",
        "MLFLOW_TRACKING_PASSWORD": "p",
        "WANDB_API_KEY": "k",
        "PREFQ_MLFLOW_TRACKING_URI": "https://user:pass@mlflow.example",
        "PATH": "/bin",
    }
    assert run_env(secret, [], 1).keys() == {"PATH", "PYTHONUNBUFFERED", "CUDA_VISIBLE_DEVICES"}


def test_mlflow_run_of_a_job(stack, dpo_job, mlflow_server):
    client = mlflow_client(mlflow_server)
    run = the_run(client, dpo_job.job["id"])
    assert run.info.run_name == dpo_job.job["id"] and run.info.status == "FINISHED"
    params = run.data.params
    assert params["method"] == "dpo" and params["trainer"] == "basic" and params["model"] == HUB_ID
    assert params["dataset"] == dpo_job.file.id and params["max_steps"] == str(DPO_JOB_HYPER["max_steps"])
    assert params["beta"] == "0.2"
    assert params["result_uri"] == dpo_job.job["result_uri"] == run.data.tags["prefq.result_uri"]
    assert "train_file" not in params and "ref_cache_dir" not in params, "no paths of the worker"

    events = stack.get(f"/jobs/{dpo_job.job['id']}/events")["data"]
    steps = {kind: [e["data"]["step"] for e in events if e["type"] == kind] for kind in ("progress", "eval")}
    assert len(steps["progress"]) == DPO_JOB_HYPER["max_steps"] and len(steps["eval"]) >= 3, steps
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


def test_wandb_offline_run_kept_with_the_job(stack, dpo_job):
    from jobs import layout
    from storage import open_storage

    storage = open_storage(
        stack.env["PREFQ_STORAGE_URL"],
        endpoint_url=stack.env["PREFQ_S3_ENDPOINT_URL"],
        access_key_id=stack.env["PREFQ_S3_ACCESS_KEY_ID"],
        secret_access_key=stack.env["PREFQ_S3_SECRET_ACCESS_KEY"],
    )
    prefix = layout.artifacts_prefix("default", dpo_job.job["id"]) + "wandb/"
    runs = [k for k in storage.list(prefix) if k.endswith(".wandb")]
    assert len(runs) == 1 and "/offline-run-" in runs[0], storage.list(prefix)
    local = Path(stack.log_dir) / "run.wandb"
    storage.get_file(runs[0], local)
    data = local.read_bytes()  # records are protobufs: their strings are there as they are
    for text in ("toy-project", "toy-run", dpo_job.job["id"], "eval_loss", "rewards/accuracies"):
        assert text.encode() in data, text


def test_openai_integrations(stack, micro_model, toy_file):
    """Shapes are checked; a server without W&B refuses any integration, naming the field."""
    from cli.stack import free_port, stop, wait_for_port

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
        answer = stack.http.post("/v1/fine_tuning/jobs", json={**base, "integrations": [integration]})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text
    answer = stack.http.post("/v1/fine_tuning/jobs", json={**base, "integrations": [WANDB]})
    assert answer.status_code == 200 and answer.json()["integrations"] == [WANDB], answer.text
    stack.http.post(f"/v1/fine_tuning/jobs/{answer.json()['id']}/cancel")

    port = free_port()
    api = stack.start("api-no-wandb", "api", "--port", str(port), env={"PREFQ_WANDB_MODE": "off"})
    try:
        wait_for_port(port, 60)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/fine_tuning/jobs",
            json={**base, "integrations": [WANDB]},
            headers=stack.http.headers,
            timeout=30,
        )
    finally:
        stop([api])
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "integrations" and "integrations" in answer.json()["error"]["message"]


def test_samples_become_artifacts(mlflow_server, tmp_path):
    """A `samples` event (training.events) becomes a JSON artifact of the run and a W&B table."""
    from jobs.models import Job, JobStatus
    from settings import Settings
    from storage import open_storage
    from worker.tracking import Tracker

    settings = Settings(data_dir=tmp_path, mlflow_tracking_uri=mlflow_server.uri, wandb_mode="offline")
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


def test_mirror_model_version(stack, dpo_job, mlflow_server):
    """The task, sent by name to the service queue, registers the version in MLflow with its source, run and
    aliases; a second version takes `production` over; a repeated message changes nothing."""
    from queue_config import make_celery, send_model_mirror
    from settings import Settings

    app = make_celery(Settings(broker_url=stack.env["PREFQ_BROKER_URL"]), "tests")
    client = mlflow_client(mlflow_server)
    run = the_run(client, dpo_job.job["id"])
    name = f"toy-{secrets.token_hex(3)}"

    def version_with(alias):
        from mlflow.exceptions import MlflowException

        try:
            return client.get_model_version_by_alias(f"default.{name}", alias)
        except MlflowException:
            return None

    send_model_mirror(
        app,
        "default",
        name,
        1,
        dpo_job.job["result_uri"],
        ["production", "staging"],
        {"eval_loss": 0.5},
        dpo_job.job["id"],
    )
    first = wait(lambda: version_with("staging"), 60, "version 1 was not mirrored")
    assert first.source == dpo_job.job["result_uri"] and first.run_id == run.info.run_id
    assert first.tags["prefq.version"] == "1" and first.tags["metric.eval_loss"] == "0.5"
    assert version_with("production").version == first.version

    send_model_mirror(app, "default", name, 2, dpo_job.job["result_uri"], ["production"], {}, None)
    wait(
        lambda: (v := version_with("production")) and v.tags["prefq.version"] == "2",
        60,
        "production did not move to version 2",
    )
    send_model_mirror(
        app, "default", name, 1, dpo_job.job["result_uri"], ["staging"], {"eval_loss": 0.5}, dpo_job.job["id"]
    )
    wait(
        lambda: not (set(client.get_model_version(f"default.{name}", first.version).aliases) - {"staging"}),
        60,
        "version 1 kept production",
    )
    assert len(client.search_model_versions(f"name = 'default.{name}'")) == 2


def test_a_promote_through_the_api_is_mirrored_into_mlflows_registry(stack, dpo_job, mlflow_server):
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

    answer = stack.http.post(f"/models/{name}/versions", json={"job_id": dpo_job.job["id"], "aliases": ["staging"]})
    assert answer.status_code == 201, answer.text
    mirrored = wait(lambda: version_with("staging"), 60, "the promote was not mirrored")
    assert mirrored.source == dpo_job.job["result_uri"] and mirrored.tags["prefq.version"] == "1"
    assert mirrored.run_id == the_run(client, dpo_job.job["id"]).info.run_id
    assert stack.http.put(f"/models/{name}/aliases/production", json={"version": 1}).status_code == 200
    wait(lambda: version_with("production"), 60, "the alias was not mirrored")


def test_cancelled_then_retried_job_continues_its_run(stack, mlflow_server, micro_model, toy_dpo):
    """Cancel marks the run KILLED; the retried attempt finds the same run by its tag and finishes it."""
    job_id = submit(stack, micro_model, toy_dpo, "--set", "max_steps=40", "--set", "eval_fraction=0.05")
    stack.wait_for_event(job_id, "progress", timeout_s=120)
    assert stack.http.post(f"/jobs/{job_id}/cancel").status_code == 200
    assert stack.wait_for(job_id, {"cancelled", "succeeded", "failed"}, timeout_s=120)["status"] == "cancelled"
    client = mlflow_client(mlflow_server)
    killed = the_run(client, job_id)
    assert killed.info.status == "KILLED"
    steps_before = len(client.get_metric_history(killed.info.run_id, "loss"))
    assert stack.http.post(f"/jobs/{job_id}/retry").status_code == 202
    job = stack.wait_for(job_id, {"succeeded", "failed", "cancelled"}, timeout_s=180)
    assert job["status"] == "succeeded", job
    run = the_run(client, job_id)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["prefq.attempt"] == "2" and run.data.params["result_uri"] == job["result_uri"]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert len(history) > steps_before and max(m.step for m in history) == 40


def test_job_succeeds_while_mlflow_is_down(stack, mlflow_server, micro_model, toy_dpo):
    """With the tracking server out of reach (the proxy the workers reach it through is cut), a job trains and
    succeeds; the worker's log says tracking is off."""
    mlflow_server.proxy.cut()
    try:
        job_id = submit(stack, micro_model, toy_dpo, "--set", "max_steps=2", "--set", "eval_fraction=0.05")
        job = stack.wait_for(job_id, {"succeeded", "failed", "cancelled"}, timeout_s=180)
    finally:
        mlflow_server.proxy.restore()
    assert job["status"] == "succeeded", job
    log = (Path(stack.log_dir) / "worker.log").read_text()
    assert f"Job {job_id}: MLflow tracking is off for this attempt" in log, log[-3000:]
