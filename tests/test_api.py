"""The HTTP API in-process (FastAPI TestClient) against a real broker, SQLite and local storage."""

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from fastapi.testclient import TestClient
from kombu.transport.redis import PublishBatch
from prometheus_client import CollectorRegistry, generate_latest

from api.app import create_app
from tests.conftest import ROOT, python_env
from worker.metrics import DatabaseCollector

GOOD = b'{"prompt": "Q1", "chosen": "A", "rejected": "B"}\n{"prompt": "Q2", "chosen": "A", "rejected": "B"}\n'


def keyed(settings, tenant: str = "acme", admin: bool = False) -> TestClient:
    """An API client with a new key of `tenant`."""
    from tests.services import make_key

    key = make_key(settings.database_url, tenant, admin)
    return TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"})


@pytest.fixture
def client(settings):
    return keyed(settings)


@pytest.fixture
def dataset_id(client):
    return client.post("/datasets", files={"file": ("pairs.jsonl", GOOD)}).json()["id"]


def job_body(model, dataset, **extra):
    return {"model": str(model), "dataset": dataset, "method": "dpo", **extra}


def test_dataset_upload_reports_rows_format_and_warnings(client, settings):
    data = GOOD + b'{"prompt": "Q1", "chosen": "A", "rejected": "B"}\n'
    r = client.post("/datasets", files={"file": ("pairs.jsonl", data)}, data={"method": "dpo"})
    assert r.status_code == 201, r.text
    ds = r.json()
    assert (ds["rows"], ds["format"], ds["method"], ds["warning_count"]) == (3, "dpo_pairs", "dpo", 1)
    assert ds["warnings"] == [{"line": 3, "field": "-", "reason": "duplicate of line 1"}]
    assert client.get(f"/datasets/{ds['id']}").json() == ds
    stored = settings.data_dir / "storage" / "tenants" / "acme" / "datasets" / f"{ds['id']}.jsonl"
    assert stored.read_bytes() == data


def test_dataset_upload_counts_tool_conversations_and_weight_0_messages(client):
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 4}'}}
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    rows = [
        {
            "messages": [
                {"role": "user", "content": "2 plus 4?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "6"},
                {"role": "assistant", "content": "6."},
            ],
            "tools": tools,
        },
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello.", "weight": 0},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Bye.", "weight": 1},
            ]
        },
    ]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    r = client.post("/datasets", files={"file": ("chat.jsonl", data)}, data={"method": "sft"})
    assert r.status_code == 201, r.text
    ds = r.json()
    assert (ds["rows"], ds["format"], ds["tool_examples"], ds["untrained_messages"]) == (2, "sft_messages", 1, 1)
    assert client.get(f"/datasets/{ds['id']}").json() == ds


def test_bad_dataset_is_422_with_lines_and_nothing_is_stored(client, settings):
    bad = GOOD + b'{"prompt": "Q3", "chosen": 5, "rejected": "B"}\nnot json\n'
    r = client.post("/datasets", files={"file": ("bad.jsonl", bad)})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid_dataset" and err["field"] == "file"
    assert err["details"] == [
        {"line": 3, "field": "chosen", "reason": "expected a string, got number"},
        {"line": 4, "field": "-", "reason": "malformed JSON: Expecting value at column 1"},
    ]
    assert not (settings.data_dir / "storage" / "datasets").exists()
    assert client.get("/jobs").json()["data"] == []


def test_job_is_accepted_queued_and_sent_once_per_idempotency_key(client, settings, dataset_id, micro_model):
    body = job_body(micro_model, dataset_id, hyperparameters={"beta": 0.2, "max_steps": 5}, metadata={"team": "a"})
    first = client.post("/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 202, first.text
    job = first.json()
    assert job["status"] == "queued" and job["attempt"] == 1 and job["metadata"] == {"team": "a"}
    assert job["warnings"] == [
        "no live worker takes 1-device jobs (queue gpu1; the largest live worker has 0 "
        "devices): the job waits until such a worker joins"
    ]
    again = client.post("/jobs", json=body, headers={"Idempotency-Key": "k1"}).json()
    assert again["id"] == job["id"]
    assert redis.Redis.from_url(settings.broker_url).llen("gpu1") == 1, "one message for one job"
    events = client.get(f"/jobs/{job['id']}/events").json()
    assert [e["type"] for e in events["data"]] == ["queued", "unschedulable"] and events["last_seq"] == 2
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'prefq_api_requests_total{route="/jobs",status="202"}' in metrics.text
    registry = CollectorRegistry()  # the database-wide figures: the service worker's exporter
    registry.register(DatabaseCollector(settings, client.app.state.services.store, holder="test"))
    exported = generate_latest(registry).decode()
    assert 'prefq_jobs{status="queued"} 1.0' in exported and 'prefq_queue_depth{queue="gpu1"} 1.0' in exported


def test_jobs_posted_together_share_a_commit_and_a_broker_write(client, settings, dataset_id, micro_model, monkeypatch):
    svc = client.app.state.services
    real, batches, held = svc.store.create_jobs, [], threading.Event()  # batch sizes

    def recorded(items):
        batches.append(len(items))
        held.wait(30)  # the first batch holds the writer until every other request has queued behind it
        return real(items)

    monkeypatch.setattr(svc.store, "create_jobs", recorded)
    writes, real_flush = [], PublishBatch.flush  # commands per pipelined write to the broker

    def counted(batch):
        writes.append(batch._buffered)
        return real_flush(batch)

    monkeypatch.setattr(PublishBatch, "flush", counted)
    body = job_body(micro_model, dataset_id)
    with ThreadPoolExecutor(12) as pool:
        answers = [pool.submit(client.post, "/jobs", json=body) for _ in range(12)]
        while not batches or batches[0] + svc.submitter._queue.qsize() < 12:
            time.sleep(0.01)
        held.set()
        jobs = [a.result().json() for a in answers]
    assert len(batches) == 2 and sum(batches) == 12, batches  # the eleven or so that waited went in one batch
    # one write per batch: each job's task and its task-sent event
    assert [w for w in writes if w] == [2 * b for b in batches], (writes, batches)
    assert {j["status"] for j in jobs} == {"queued"} and len({j["id"] for j in jobs}) == 12
    messages = [json.loads(m) for m in redis.Redis.from_url(settings.broker_url).lrange("gpu1", 0, -1)]
    assert sorted(m["headers"]["id"] for m in messages) == sorted(f"{j['id']}.1" for j in jobs)
    assert sorted(m["headers"]["argsrepr"] for m in messages) == sorted(f"['{j['id']}', 1]" for j in jobs)


@pytest.mark.parametrize(
    ("change", "status", "code", "field"),
    [
        ({"dataset": "ds_nope"}, 422, "dataset_not_found", "dataset"),
        ({"eval_dataset": "ds_nope"}, 422, "dataset_not_found", "eval_dataset"),
        ({"model": "/no/such/model"}, 422, "reference_not_allowed", "model"),
        ({"method": "sft"}, 422, "dataset_method_mismatch", "dataset"),
        ({"hyperparameters": {"beta": -1}}, 422, "invalid_hyperparameters", "hyperparameters.beta"),
        ({"hyperparameters": {"model": "/x"}}, 422, "invalid_hyperparameters", "hyperparameters.model"),
        ({"hyperparameters": {"bogus": 1}}, 422, "invalid_hyperparameters", "hyperparameters.bogus"),
        ({"trainer": "basic", "gpus": 4}, 422, "invalid_hyperparameters", "gpus"),
        ({"gpus": -1}, 422, "invalid_request", "gpus"),
        ({"callback_url": "not a url"}, 422, "invalid_request", "callback_url"),
    ],
)
def test_bad_jobs_name_what_is_wrong(client, dataset_id, micro_model, change, status, code, field):
    r = client.post("/jobs", json={**job_body(micro_model, dataset_id), **change})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["code"], err["field"]) == (code, field), err
    assert client.get("/jobs").json()["data"] == [], "nothing is created"


def test_cancel_retry_and_errors_share_one_shape(client, dataset_id, micro_model):
    job = client.post("/jobs", json=job_body(micro_model, dataset_id)).json()
    cancelled = client.post(f"/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
    again = client.post(f"/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    retried = client.post(f"/jobs/{job['id']}/retry")
    assert retried.status_code == 202 and retried.json()["attempt"] == 2 and retried.json()["status"] == "queued"
    assert client.post(f"/jobs/{job['id']}/retry").json()["error"]["code"] == "not_retryable"
    assert [e["type"] for e in client.get(f"/jobs/{job['id']}/events?after=2").json()["data"]] == [
        "cancelled",
        "retried",
    ]
    missing = client.get("/jobs/job_nope")
    assert missing.status_code == 404 and missing.json() == {
        "error": {"code": "job_not_found", "message": "no job with id 'job_nope'"}
    }
    assert client.get("/nowhere").json()["error"]["code"] == "not_found"
    assert client.get(f"/jobs/{job['id']}/model").json()["error"]["code"] == "model_not_ready"


def test_list_pages_with_a_cursor_and_filters_by_status(client, dataset_id, micro_model):
    ids = [client.post("/jobs", json=job_body(micro_model, dataset_id)).json()["id"] for _ in range(5)]
    client.post(f"/jobs/{ids[0]}/cancel")
    page = client.get("/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = client.get("/jobs", params={"limit": 10, "after": page["next_cursor"]}).json()
    assert [j["id"] for j in rest["data"]] == ids[::-1][2:] and not rest["has_more"] and rest["next_cursor"] is None
    cancelled = client.get("/jobs", params={"status": "cancelled"}).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert client.get("/jobs", params={"status": "exploded"}).status_code == 422


def test_callbacks_need_a_secret(settings, dataset_id, micro_model):
    client = keyed(settings.model_copy(update={"callback_secret": None}))
    ds = client.post("/datasets", files={"file": ("p.jsonl", GOOD)}).json()["id"]
    r = client.post("/jobs", json=job_body(micro_model, ds, callback_url="http://127.0.0.1:9/hook"))
    assert r.status_code == 422 and r.json()["error"]["code"] == "callbacks_disabled"


def test_readyz_names_what_is_down_and_a_dead_broker_fails_the_job_cleanly(settings, micro_model):
    dead = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    client = keyed(dead)
    ready = client.get("/readyz")
    assert ready.status_code == 200, "a broker outage does not take the API out of service"
    assert ready.json()["broker"].startswith("error") and ready.json()["checks"]["database"] == "ok"
    ds = client.post("/datasets", files={"file": ("p.jsonl", GOOD)}).json()["id"]
    r = client.post("/jobs", json=job_body(micro_model, ds))
    assert r.status_code == 503 and r.json()["error"]["code"] == "broker_unavailable"
    (job,) = client.get("/jobs").json()["data"]
    assert job["status"] == "failed" and job["error"]["code"] == "enqueue_failed"


@pytest.mark.parametrize("module", ["api.app", "worker.app", "cli.app", "serve.app"])
def test_api_and_worker_processes_import_no_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], env=python_env(), cwd=ROOT, check=True)


def test_openapi_lists_the_routes(client):
    paths = set(client.get("/openapi.json").json()["paths"])
    assert {
        "/datasets",
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/events",
        "/jobs/{job_id}/checkpoints",
        "/jobs/{job_id}/cancel",
        "/jobs/{job_id}/retry",
        "/healthz",
        "/readyz",
        "/metrics",
        "/workers",
    } <= paths
    assert json.loads(client.get("/healthz").text) == {"status": "ok"}
