"""The real `openai` SDK against a live prefq (uvicorn, a Celery worker, PostgreSQL, Valkey, SeaweedFS), with only
`base_url` changed; the base model is a hub id served from the session stack's offline hub cache. The CLI runs a
hub-id job and an SFT -> DPO pipeline on the same stack. Tenants of this file's own (`oai-*`) keep its lists apart
from the other tests on the stack."""

import json
import time
from pathlib import Path

import httpcore  # noqa: F401 - imports h2 (which the SDK's dependencies install) before any test thread can race it
import openai
import pytest
from openai import OpenAI

from tests.services import DPO_JOB_HYPER, GRADER, HUB_ID, make_key, openai_dpo_file, prefq

FAST = {
    "sample_prompts": 0,
    "max_steps": 4,
    "save_steps": 2,
    "max_length": 64,
    "eval_fraction": 0,
    "learning_rate": 3e-3,
    "lr_scheduler": "constant",
}
TERMINAL = {"succeeded", "failed", "cancelled"}
PARKED = {"prefq": {"trainer": "fsdp", "gpus": 8}}  # no worker here takes 8-device jobs: they stay queued


@pytest.fixture(scope="module")
def clients(stack):
    """An SDK client per tenant of this file's (`oai-alpha`, ...)."""
    url = stack.env["PREFQ_DATABASE_URL"]
    keys = {t: make_key(url, f"oai-{t}") for t in ("alpha", "beta", "gamma", "delta")}
    return {t: OpenAI(base_url=f"{stack.url}/v1", api_key=k, max_retries=0) for t, k in keys.items()}


def messages_file(toy_sft: Path, path: Path, rows: int = 64) -> Path:
    lines = [json.loads(line) for line in toy_sft.read_text().splitlines()[:rows]]
    path.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": r["prompt"]},
                        {"role": "assistant", "content": r["completion"]},
                    ]
                }
            )
            + "\n"
            for r in lines
        )
    )
    return path


def wait(client: OpenAI, job_id: str, timeout_s: float = 240):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in TERMINAL:
            return job
        time.sleep(0.5)
    raise TimeoutError(f"{job_id} is {job.status}")


def test_dpo_on_a_hub_model_then_sft_on_its_fine_tuned_model(dpo_job, clients, toy_sft, tmp_path):
    """conftest's `dpo_job` (the default tenant's, created through the SDK on the hub model) read through the SDK;
    then an SFT job on its fine-tuned model."""
    client, pairs, job = dpo_job.client, dpo_job.file, dpo_job.created
    assert (pairs.object, pairs.status, pairs.purpose, pairs.filename) == (
        "file",
        "processed",
        "fine-tune",
        "pairs.jsonl",
    )
    assert client.files.retrieve(pairs.id).bytes == dpo_job.path.stat().st_size
    assert client.files.content(pairs.id).read() == dpo_job.path.read_bytes()

    assert client.fine_tuning.jobs.create(**dpo_job.create).id == job.id, "Idempotency-Key: the same job"
    assert (job.object, job.model, job.status, job.seed) == ("fine_tuning.job", HUB_ID, "queued", 7)
    assert job.suffix == "pairs"
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    assert job.method.dpo.hyperparameters.n_epochs == 1, "auto is the documented default"
    assert job.metadata == {"team": "search"} and job.organization_id == "default"

    done, steps, every = dpo_job.sdk, DPO_JOB_HYPER["max_steps"], DPO_JOB_HYPER["save_steps"]
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{HUB_ID}:default:pairs:{job.id}"
    assert done.finished_at >= done.created_at and done.estimated_finish is None
    assert done.trained_tokens > 0
    lengths = dpo_job.job["lengths"]  # the run's `lengths` events, kept on the job's row by the worker
    assert (lengths["train"]["rows"], lengths["eval"]["rows"], lengths["train"]["dropped"]) == (340, 60, 0), lengths
    assert lengths["train"]["max_length"] == 64 and 0 < lengths["train"]["p50"] <= lengths["train"]["max"]

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=3))  # auto-paginates, newest first
    assert len(events) > 6 and len({e.id for e in events}) == len(events)
    assert events[0].message == "The job has successfully completed" and events[-1].message == "Fine-tuning job queued"
    assert not any({"path", "final_path", "pid"} & set(e.data or {}) for e in events), "no worker-local details"
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics if "train_loss" in e.data] == list(range(steps, 0, -1))
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == list(range(steps, 0, -every))
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-{steps}"
    assert checkpoints[1].metrics.train_loss is not None and checkpoints[1].fine_tuning_job_id == job.id
    assert checkpoints[0].metrics.train_mean_token_accuracy >= 0.9, "DPO: the reward accuracy of the toy pairs"
    (results,) = done.result_files
    csv_rows = client.files.content(results).text.splitlines()
    header = "step,train_loss,train_rewards_accuracy,train_rewards_margin,valid_loss,valid_rewards_accuracy"
    assert csv_rows[0] == header
    assert [r.split(",")[0] for r in csv_rows[1:]] == [str(s) for s in range(steps + 1)], "0: the first evaluation"
    assert client.files.retrieve(results).purpose == "fine-tune-results"

    with messages_file(toy_sft, tmp_path / "chat.jsonl").open("rb") as fh:
        chat = client.files.create(file=fh, purpose="fine-tune")
    sft = client.fine_tuning.jobs.create(
        model=done.fine_tuned_model,
        training_file=chat.id,
        suffix="chat",
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"batch_size": 16, "learning_rate_multiplier": 2}},
        },
        extra_body={"prefq": {"hyperparameters": {**FAST, "learning_rate": 1e-3}}},
    )
    assert sft.model == done.fine_tuned_model and sft.method.supervised.hyperparameters.learning_rate_multiplier == 50
    sft_done = wait(client, sft.id)
    assert sft_done.status == "succeeded", sft_done.error
    assert sft_done.fine_tuned_model == f"ft:{HUB_ID}:default:chat:{sft.id}", "the base stays the hub model"
    assert client.files.content(sft_done.result_files[0]).text.startswith(
        "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n"
    )

    # a checkpoint is a model too; cancel answers cancelled
    third = client.fine_tuning.jobs.create(
        model=checkpoints[1].fine_tuned_model_checkpoint,
        training_file=pairs.id,
        method={"type": "dpo"},
        extra_body=PARKED,
    )
    assert client.fine_tuning.jobs.cancel(third.id).status == "cancelled"
    with messages_file(toy_sft, tmp_path / "theirs.jsonl", rows=8).open("rb") as fh:
        theirs = clients["beta"].files.create(file=fh, purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as err:
        clients["beta"].fine_tuning.jobs.create(model=done.fine_tuned_model, training_file=theirs.id)
    assert err.value.param == "model" and err.value.code == "model_not_found", "another tenant's model is no model"
    assert done.fine_tuned_model not in {m.id for m in clients["beta"].models.list()}
    models = {m.id for m in client.models.list()}
    assert {HUB_ID, done.fine_tuned_model, sft_done.fine_tuned_model} <= models
    assert client.models.retrieve(done.fine_tuned_model).owned_by == "default"


def test_simpo_and_kto_through_the_sdk_orpo_and_reward_through_the_native_api(dpo_job, stack, tmp_path):
    """The pair methods without a reference model: `method.type` 'simpo' (prefq's documented extension of OpenAI's
    types) through the SDK, and `method: "orpo"` through `POST /jobs`, both on the DPO job's pair file; KTO on a
    file of labelled answers, through the SDK; a reward model on the pairs, which no job then trains on."""
    from training.toy_data import write_toy_data

    client = dpo_job.client
    write_toy_data(tmp_path / "kto.jsonl", "kto", 200, seed=5)
    with (tmp_path / "kto.jsonl").open("rb") as fh:
        labelled = client.files.create(file=fh, purpose="fine-tune")
    kto = client.fine_tuning.jobs.create(
        model=dpo_job.sdk.fine_tuned_model,
        training_file=labelled.id,
        method={"type": "kto", "kto": {"hyperparameters": {"batch_size": 8}}},
        extra_body={"prefq": {"hyperparameters": {**FAST, "eval_fraction": 0.2, "undesirable_weight": 1.5}}},
    )
    simpo = client.fine_tuning.jobs.create(
        model=dpo_job.sdk.fine_tuned_model,
        training_file=dpo_job.file.id,
        method={"type": "simpo", "simpo": {"hyperparameters": {"beta": 2.0, "batch_size": 16}}},
        extra_body={"prefq": {"hyperparameters": {**FAST, "simpo_gamma": 0.8}}},
    )
    orpo = stack.http.post(
        "/jobs",
        json={
            "model": dpo_job.sdk.fine_tuned_model,
            "dataset": dpo_job.file.id,
            "method": "orpo",
            "hyperparameters": {**FAST, "beta": 0.2, "batch_size": 16},
        },
    )
    assert orpo.status_code == 202, orpo.text
    reward = stack.http.post(
        "/jobs",
        json={
            "model": dpo_job.sdk.fine_tuned_model,
            "dataset": dpo_job.file.id,
            "method": "reward",
            "hyperparameters": {**FAST, "max_steps": 6, "eval_fraction": 0.2, "learning_rate": 3e-3},
        },
    )
    assert reward.status_code == 202, reward.text
    assert simpo.method.type == "simpo" and simpo.method.simpo["hyperparameters"]["beta"] == 2.0
    done = wait(client, simpo.id)
    assert done.status == "succeeded", done.error
    assert client.files.content(done.result_files[0]).text.startswith("step,train_loss,train_rewards_accuracy,")
    native = stack.wait_for(orpo.json()["id"], TERMINAL, timeout_s=240)
    assert native["status"] == "succeeded", native
    assert native["method"] == "orpo" and "log_odds_chosen" in native["metrics"], native["metrics"]
    types = {e["type"] for e in stack.get(f"/jobs/{native['id']}/events?limit=500")["data"]}
    assert "ref_logprobs" not in types
    sft = stack.http.post("/jobs", json={"model": HUB_ID, "dataset": dpo_job.file.id, "method": "sft"})
    assert sft.status_code == 422 and "trains on sft data" in sft.text, sft.text
    kto_done = wait(client, kto.id)
    assert kto_done.status == "succeeded", kto_done.error
    assert kto_done.method.type == "kto"
    csv_rows = client.files.content(kto_done.result_files[0]).text.splitlines()
    assert csv_rows[0] == "step,train_loss,train_rewards_margin,train_kl,valid_loss,valid_rewards_margin"
    assert len(csv_rows) == 1 + 5 and all(r.split(",")[3] for r in csv_rows[2:]), csv_rows
    scorer = stack.wait_for(reward.json()["id"], TERMINAL, timeout_s=240)
    assert scorer["status"] == "succeeded" and "eval_accuracy" in scorer["eval_metrics"], scorer
    assert client.fine_tuning.jobs.retrieve(scorer["id"]).method.type == "reward"
    on_scorer = stack.http.post("/jobs", json={"model": scorer["id"], "dataset": dpo_job.file.id, "method": "dpo"})
    assert on_scorer.status_code == 422 and "trained a reward model" in on_scorer.text, on_scorer.text
    dpo_on_kto = stack.http.post("/jobs", json={"model": HUB_ID, "dataset": labelled.id, "method": "dpo"})
    assert dpo_on_kto.status_code == 422 and "trains on dpo data" in dpo_on_kto.text, dpo_on_kto.text


def test_a_tool_calling_file_in_openais_format_trains_through_the_sdk(stack, tmp_path):
    """OpenAI's chat format whole (tools, parallel tool calls, tool results, weights) uploads through `/v1/files`
    and an SFT job trains on it on the hub model; only weight-1 assistant tokens carry the loss (`test_chat`)."""
    from tests.test_chat import CONVERSATION, call

    rows = []
    for n in range(48):
        row = json.loads(json.dumps(CONVERSATION))
        city = ("Paris", "Oslo", "Lima", "Kyiv")[n % 4]
        row["messages"][1]["content"] = f"Weather and time in {city}?"
        row["messages"][2]["tool_calls"] = [call("get_weather", {"city": city}, "c1"), call("get_time", {}, "c2")]
        rows.append(row)
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    key = make_key(stack.env["PREFQ_DATABASE_URL"], "oai-tools")  # a tenant of its own: the others' lists stay theirs
    client = OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0)
    with path.open("rb") as fh:
        upload = client.files.create(file=fh, purpose="fine-tune")
    assert upload.status == "processed", upload
    job = client.fine_tuning.jobs.create(
        model=HUB_ID,
        training_file=upload.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4}}},
        extra_body={"prefq": {"hyperparameters": {**FAST, "max_steps": 2, "max_length": 512}}},
    )
    done = wait(client, job.id)
    assert done.status == "succeeded", done.error
    losses = [
        e.data["train_loss"]
        for e in client.fine_tuning.jobs.list_events(job.id, limit=100)
        if e.type == "metrics" and "train_loss" in (e.data or {})
    ]
    assert len(losses) == 2 and all(loss > 0 for loss in losses), losses


def test_errors_in_openais_shape(stack, clients, toy_dpo, tmp_path):
    alpha, beta = clients["alpha"], clients["beta"]
    with openai_dpo_file(toy_dpo, tmp_path / "pairs.jsonl", rows=8).open("rb") as fh:
        pairs = alpha.files.create(file=fh, purpose="fine-tune")
    job = alpha.fine_tuning.jobs.create(model=HUB_ID, training_file=pairs.id, method={"type": "dpo"}, extra_body=PARKED)
    for call in (
        lambda: beta.fine_tuning.jobs.retrieve(job.id),
        lambda: beta.fine_tuning.jobs.cancel(job.id),
        lambda: list(beta.fine_tuning.jobs.list_events(job.id)),
        lambda: beta.files.retrieve(pairs.id),
        lambda: beta.fine_tuning.jobs.checkpoints.list(job.id),
        lambda: beta.files.content(pairs.id),
        lambda: beta.fine_tuning.jobs.retrieve("job_0000000000000"),
    ):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert err.value.body["type"] == "invalid_request_error" and err.value.code.endswith("_not_found")
    assert beta.fine_tuning.jobs.list().data == []
    with pytest.raises(openai.BadRequestError) as err:
        beta.fine_tuning.jobs.create(model=HUB_ID, training_file=pairs.id, method={"type": "dpo"})
    assert err.value.param == "training_file", "another tenant's file is no file"

    # (integrations, refused where the server has no W&B: test_tracking.py::test_openai_integrations)
    bad = {
        "method.dpo.hyperparameters.n_epochs": {"method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 0}}}},
        "method.dpo.hyperparameters.beta": {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": "big"}}}},
        "method.dpo.hyperparameters.batch_size": {
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 10**6}}}
        },
        "method.type": {"method": {"type": "ppo"}},
        "method.reinforcement.grader": {"method": {"type": "reinforcement"}},
        "method.reinforcement.hyperparameters.reasoning_effort": {
            "method": {
                "type": "reinforcement",
                "reinforcement": {"grader": GRADER, "hyperparameters": {"reasoning_effort": "high"}},
            }
        },
        "prefq.hyperparameters.loss_type": {
            "method": {"type": "dpo"},
            "extra_body": {"prefq": {"hyperparameters": {"loss_type": "nope"}}},
        },
        "model": {"model": "other-org/model", "method": {"type": "dpo"}},
        "suffix": {"suffix": "has spaces", "method": {"type": "dpo"}},
    }
    for param, kwargs in bad.items():
        with pytest.raises(openai.BadRequestError) as err:
            alpha.fine_tuning.jobs.create(**{"model": HUB_ID, "training_file": pairs.id, **kwargs})
        assert err.value.param == param, (param, err.value.body)
        assert err.value.body["message"] and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        alpha.fine_tuning.jobs.create(model="a/b/c", training_file=pairs.id, method={"type": "dpo"})
    assert err.value.param == "model" and "hub id" in err.value.message

    (tmp_path / "broken.jsonl").write_text('{"prompt": "Q", "chosen": "A", "rejected": "B"}\n{"prompt": 3}\n')
    broken = alpha.files.create(file=(tmp_path / "broken.jsonl").open("rb"), purpose="fine-tune")
    assert broken.status == "error" and "line 2" in broken.status_details
    with pytest.raises(openai.BadRequestError) as err:
        alpha.fine_tuning.jobs.create(model=HUB_ID, training_file=broken.id)
    assert err.value.param == "training_file"
    with pytest.raises(openai.BadRequestError) as err:
        alpha.files.create(file=(tmp_path / "broken.jsonl").open("rb"), purpose="batch")
    assert err.value.param == "purpose"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{stack.url}/v1", api_key="pq_nobody_nothing", max_retries=0).models.list()
    assert stack.http.get("/jobs/job_0000000000000").json()["error"]["code"] == "job_not_found", "native shape stays"

    # a hub model that is not in the offline cache fails the job as the user's error, naming the model
    missing = alpha.fine_tuning.jobs.create(
        model="prefq-test/absent@v2",
        training_file=pairs.id,
        method={"type": "dpo"},
        extra_body={"prefq": {"hyperparameters": FAST}},
    )
    failed = wait(alpha, missing.id)
    assert failed.status == "failed" and failed.error.code == "model_not_found" and failed.error.param == "model"
    assert "prefq-test/absent@v2" in failed.error.message and stack.get(f"/jobs/{missing.id}")["error"]["user_error"]
    alpha.fine_tuning.jobs.cancel(job.id)


def test_pagination_metadata_filter_pause_and_resume(clients, toy_dpo, tmp_path):
    gamma = clients["gamma"]
    with openai_dpo_file(toy_dpo, tmp_path / "pairs.jsonl", rows=8).open("rb") as fh:
        pairs = gamma.files.create(file=fh, purpose="fine-tune")
    ids = [
        gamma.fine_tuning.jobs.create(
            model=HUB_ID,
            training_file=pairs.id,
            method={"type": "dpo"},
            metadata={"batch": "odd" if i % 2 else "even"},
            extra_body=PARKED,
        ).id
        for i in range(5)
    ]
    first = gamma.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == ids[::-1][:2] and first.has_more
    assert [j.id for j in gamma.fine_tuning.jobs.list(limit=2)] == ids[::-1], "the SDK follows `after` across pages"
    pages = [p.data for p in gamma.fine_tuning.jobs.list(limit=2).iter_pages()]
    assert [len(p) for p in pages] == [2, 2, 1]
    even = gamma.fine_tuning.jobs.list(metadata={"batch": "even"}, limit=1)
    assert [j.id for j in even] == [ids[4], ids[2], ids[0]]
    assert gamma.fine_tuning.jobs.list(metadata={"batch": "none"}).data == []
    with openai_dpo_file(toy_dpo, tmp_path / "more.jsonl", rows=4).open("rb") as fh:
        more = gamma.files.create(file=fh, purpose="fine-tune")
    assert [f.id for f in gamma.files.list(limit=1)] == [more.id, pairs.id], "file lists page too"
    assert gamma.files.delete(more.id).deleted
    with pytest.raises(openai.NotFoundError):
        gamma.files.retrieve(more.id)
    with pytest.raises(openai.ConflictError) as err:
        gamma.files.delete(pairs.id)
    assert err.value.code == "file_in_use"

    paused = gamma.fine_tuning.jobs.pause(ids[0])
    assert paused.status == "paused"
    with pytest.raises(openai.ConflictError):
        gamma.fine_tuning.jobs.pause(ids[0])
    resumed = gamma.fine_tuning.jobs.resume(ids[0])
    assert resumed.status == "queued" and resumed.prefq["attempt"] == 2
    for job_id in ids:
        gamma.fine_tuning.jobs.cancel(job_id)
    assert {j.status for j in gamma.fine_tuning.jobs.list()} == {"cancelled"}


def test_the_cli_runs_a_hub_model_and_an_sft_then_dpo_pipeline(stack, toy_dpo, toy_sft):
    sets = [arg for k, v in FAST.items() for arg in ("--set", f"{k}={v}")] + ["--set", "batch_size=16"]
    out = prefq(
        stack,
        "submit",
        str(toy_sft),
        "--model",
        f"{HUB_ID}@v1",
        "--method",
        "sft",
        *sets,
        "--then",
        "dpo",
        str(toy_dpo),
        "--wait",
        "--gpus",
        "1",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    first, second = dict.fromkeys(w for w in out.stdout.split() if w.startswith("job_"))
    sft, dpo = stack.get(f"/jobs/{first}"), stack.get(f"/jobs/{second}")
    assert (sft["status"], sft["model"], sft["method"]) == ("succeeded", f"{HUB_ID}@v1", "sft")
    assert (dpo["status"], dpo["method"], dpo["metadata"]) == ("succeeded", "dpo", {"pipeline_after": first})
    assert dpo["model"] == f"ft:{HUB_ID}:default::{first}", "the SFT model is the DPO base (and its reference)"
    assert f"{second} succeeded" in out.stdout


def test_pause_checkpoints_and_frees_the_worker_and_resume_goes_on_from_there(stack, clients, toy_dpo, tmp_path):
    delta = clients["delta"]
    with openai_dpo_file(toy_dpo, tmp_path / "pairs.jsonl").open("rb") as fh:
        pairs = delta.files.create(file=fh, purpose="fine-tune")
    long = {**FAST, "max_steps": 5000, "save_steps": 5000}
    job = delta.fine_tuning.jobs.create(
        model=HUB_ID, training_file=pairs.id, method={"type": "dpo"}, extra_body={"prefq": {"hyperparameters": long}}
    )
    deadline = time.monotonic() + 120
    while delta.fine_tuning.jobs.retrieve(job.id).prefq["step"] < 3:
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.3)
    running = delta.fine_tuning.jobs.retrieve(job.id)
    assert running.status == "running" and running.estimated_finish > running.created_at
    assert running.fine_tuned_model is None and running.result_files == []
    assert delta.fine_tuning.jobs.pause(job.id).status == "paused"
    deadline = time.monotonic() + 120
    while (paused := delta.fine_tuning.jobs.retrieve(job.id)).prefq["status"] != "cancelled":
        assert time.monotonic() < deadline, "the run did not stop"
        time.sleep(0.3)
    assert paused.status == "paused"
    (saved,) = delta.fine_tuning.jobs.checkpoints.list(job.id).data
    assert saved.step_number >= 3, "the paused run saved a checkpoint"
    deadline = time.monotonic() + 30
    while stack.wait_for_worker("prefq-test-worker@")["current_job_id"] is not None:
        assert time.monotonic() < deadline, "the worker is still busy with the paused job"
        time.sleep(0.3)
    assert delta.fine_tuning.jobs.resume(job.id).status == "queued"
    resuming = stack.wait_for_event(job.id, "resuming", timeout_s=120)
    assert resuming["data"]["step"] == saved.step_number and resuming["attempt"] == 2
    delta.fine_tuning.jobs.cancel(job.id)
    assert wait(delta, job.id).status == "cancelled"
