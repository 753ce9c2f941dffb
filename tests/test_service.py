"""The whole service as separate processes: API, broker, worker, service worker, PostgreSQL and S3. (A worker that
dies and is replaced: test_faults.py, whose stack may lose its processes.)"""

import hashlib
import hmac
import json
import os
import signal
import time

import httpx

from tests.services import FAST, Receiver, alive, prefq, submit


def test_dpo_job_end_to_end(stack, micro_model, toy_dpo, callback_url, tmp_path):
    out = prefq(
        stack,
        "submit",
        str(toy_dpo),
        "--model",
        str(micro_model),
        "--method",
        "dpo",
        *FAST,
        "--set",
        "max_steps=30",
        "--set",
        "save_steps=10",
        "--set",
        "eval_steps=15",
        "--callback-url",
        callback_url,
        "--wait",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("dataset ds_") and lines[1].startswith("job_"), "the job id comes first"
    job_id = lines[1].strip()
    assert "30/30" in out.stdout and f"{job_id} succeeded" in out.stdout

    job = stack.http.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["step"] == 30 and job["progress"] == 1.0
    assert job["eval_metrics"]["eval_rewards/accuracies"] >= 0.9
    assert job["result_uri"].startswith("s3://prefq/stack-") and job["result_uri"].endswith(f"/jobs/{job_id}/model/")

    events = stack.http.get(f"/jobs/{job_id}/events").json()["data"]
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["queued", "claimed", "launched"] and kinds[-2:] == ["done", "succeeded"]
    assert [k for k in kinds[3:] if k not in ("lengths", "ref_logprobs")][0] == "started"
    assert kinds.index("lengths") < kinds.index("started"), "max_length's effect is told before training starts"
    first = next(e for e in events if e["type"] == "ref_logprobs")["data"]
    assert not first["cached"] and first["forward_passes"] > 0, "the first attempt computes the reference pass"
    assert kinds.count("progress") == 30 and kinds.count("checkpoint") == 3
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    later = stack.http.get(f"/jobs/{job_id}/events", params={"after": len(events) - 2}).json()["data"]
    assert [e["type"] for e in later] == kinds[-2:]

    checkpoints = stack.http.get(f"/jobs/{job_id}/checkpoints").json()["data"]
    assert [c["step"] for c in checkpoints] == [30, 20, 10]
    manifest = next(f for f in checkpoints[-1]["files"] if f["name"] == "prefq-manifest.json")
    assert json.loads(httpx.get(manifest["url"]).content)["step"] == 10, "presigned URLs download"

    model_dir = tmp_path / "model"
    out = prefq(stack, "download", job_id, str(model_dir))
    assert out.returncode == 0, out.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir)("What is 1 plus 2?")["input_ids"]
    assert model.config.model_type == "llama"

    deadline = time.monotonic() + 30
    while not Receiver.received and time.monotonic() < deadline:
        time.sleep(0.2)
    (headers, body), *_ = Receiver.received
    signed = f"{headers['X-Prefq-Timestamp']}.".encode() + body
    expected = "sha256=" + hmac.new(b"test-secret", signed, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Prefq-Signature"], expected)
    assert headers["X-Prefq-Event"] == "job.succeeded" and headers["X-Prefq-Delivery"].startswith("cb_")
    assert json.loads(body)["id"] == job_id and json.loads(body)["status"] == "succeeded"
    deadline = time.monotonic() + 10
    while stack.get(f"/jobs/{job_id}")["callback_status"] != "delivered" and time.monotonic() < deadline:
        time.sleep(0.1)  # marked once the receiver has answered
    assert stack.get(f"/jobs/{job_id}")["callback_status"] == "delivered"
    assert abs(int(headers["X-Prefq-Timestamp"]) - time.time()) < 60

    streamed = prefq(stack, "events", job_id, "--follow")
    assert [json.loads(line)["type"] for line in streamed.stdout.splitlines()] == kinds


def test_a_job_no_worker_can_take_is_told_so_and_cancelled_at_once(stack, micro_model, toy_dpo):
    out = prefq(
        stack,
        "submit",
        str(toy_dpo),
        "--model",
        str(micro_model),
        "--method",
        "dpo",
        "--gpus",
        "8",
        "--trainer",
        "fsdp",
    )
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.splitlines()[1].strip()
    assert "warning: no live worker takes 8-device jobs (queue gpu8; the largest live worker has 2 devices)" in (
        " ".join(out.stdout.split())
    )
    assert stack.http.get(f"/jobs/{job_id}").json()["status"] == "queued"
    out = prefq(stack, "cancel", job_id)
    assert out.returncode == 0 and "cancelled" in out.stdout


def test_cancel_running_job_stops_every_process(stack, micro_model, toy_dpo):
    job_id = submit(
        stack, micro_model, toy_dpo, "--set", "max_steps=5000", "--set", "save_steps=1000", "--set", "eval_fraction=0"
    )
    pid = stack.wait_for_event(job_id, "launched")["data"]["pid"]
    stack.wait_for_event(job_id, "progress")
    assert alive(pid)
    assert stack.http.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelling"
    job = stack.wait_for(job_id, {"cancelled", "failed", "succeeded"}, timeout_s=120)
    assert job["status"] == "cancelled"
    assert not alive(pid), "the run's process group is gone"
    kinds = [e["type"] for e in stack.http.get(f"/jobs/{job_id}/events").json()["data"]]
    assert "stopped" in kinds and kinds.index("cancel_requested") < kinds.index("stopped")
    step = job["step"]
    assert [c["step"] for c in stack.http.get(f"/jobs/{job_id}/checkpoints").json()["data"]] == [step]


def test_retry_of_a_failed_job_resumes_from_its_newest_checkpoint(stack, micro_model, toy_dpo):
    job_id = submit(
        stack, micro_model, toy_dpo, "--set", "max_steps=60", "--set", "save_steps=5", "--set", "eval_fraction=0"
    )
    pid = stack.wait_for_event(job_id, "launched")["data"]["pid"]
    stack.wait_for_event(job_id, "checkpoint")
    os.killpg(pid, signal.SIGKILL)  # the run dies mid-training
    failed = stack.wait_for(job_id, {"failed", "succeeded"})
    assert failed["status"] == "failed" and failed["error"]["code"] == "run_crashed"
    assert failed["error"]["user_error"] is False
    saved = max(c["step"] for c in stack.http.get(f"/jobs/{job_id}/checkpoints").json()["data"])
    assert 5 <= saved < 60

    out = prefq(stack, "retry", job_id)
    assert out.returncode == 0, out.stderr
    done = stack.wait_for(job_id, {"succeeded", "failed"})
    assert done["status"] == "succeeded" and done["attempt"] == 2 and done["step"] == 60
    events = stack.http.get(f"/jobs/{job_id}/events").json()["data"]
    second = [e for e in events if e["attempt"] == 2]
    resuming = next(e for e in second if e["type"] == "resuming")
    assert resuming["data"]["step"] == saved
    started = next(e for e in second if e["type"] == "started")
    assert started["data"]["resumed_from_step"] == saved
    reference = [e["data"] for e in second if e["type"] == "ref_logprobs"]
    assert reference and all(r["cached"] and r["forward_passes"] == 0 for r in reference), "0 reference passes"
    assert next(e for e in second if e["type"] == "progress")["data"]["step"] == saved + 1


def test_workers_show_the_pool(stack):
    out = prefq(stack, "workers")
    assert out.returncode == 0 and "prefq-test-worker@" in out.stdout and "CPU x2" in out.stdout
    (w,) = [w for w in stack.http.get("/workers").json()["data"] if w["name"].startswith("prefq-test-worker")]
    assert w["live"] and w["devices"] == 2 and w["queues"] == ["cpu", "gpu1", "gpu2"]
    assert w["inventory"]["cpu_count"] >= 1 and w["inventory"]["memory_gib"] > 0
