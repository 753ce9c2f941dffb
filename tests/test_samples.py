"""What the model learned, on real processes (API, broker, worker, PostgreSQL, S3): a DPO job's sample generations
(conftest's `dpo_job`: 3 held-out prompts, 24 tokens, at steps 0, 8 and 16) change as it trains; they are kept as
events and as an artifact; its model, promoted to the registry, trains a second job by its registered name."""

from __future__ import annotations

import json

import httpx
import pytest

from jobs import modelref
from tests.services import prefq, submit


def test_samples_change_as_training_goes_and_a_promoted_model_trains_by_its_name(stack, dpo_job, toy_dpo):
    job, job_id = dpo_job.job, dpo_job.job["id"]

    data = stack.get(f"/jobs/{job_id}/samples")["data"]
    assert [(d["step"], d["model"]) for d in data] == [(0, "policy"), (0, "reference"), (8, "policy"), (16, "policy")]
    start, reference, end = data[0]["samples"], data[1]["samples"], data[3]["samples"]
    assert [s["index"] for s in start] == [0, 1, 2] and all(0 < s["tokens"] <= 24 for s in start + end)
    assert [s["prompt"] for s in start] == [s["prompt"] for s in end]  # the same held-out prompts each time
    # what the policy thinks of its answers moved (below); the greedy text of a 150k-parameter model after 16 steps
    # may stay the same on one processor and change on another, so it is not the proof
    assert [s["reward"] for s in start] != [s["reward"] for s in end], "training changed nothing"
    # before training the policy is the reference: same completions, no reward; after, DPO has moved it
    assert [s["completion"] for s in reference] == [s["completion"] for s in start]
    assert all(s["reward"] is None for s in reference)
    assert all(abs(s["reward"]) < 0.05 for s in start), start
    assert any(abs(s["reward"]) > 0.1 for s in end), end

    artifacts = {f["name"]: f["url"] for f in stack.get(f"/jobs/{job_id}/artifacts")["data"]}
    assert {name for name in artifacts if not name.startswith("wandb/")} == {"samples.json"}  # W&B's: test_tracking
    kept = httpx.get(artifacts["samples.json"], timeout=30).json()
    assert [(k["step"], k["model"], k["samples"]) for k in kept] == [
        (d["step"], d["model"], d["samples"]) for d in data
    ]
    shown = prefq(stack, "samples", job_id)
    assert shown.returncode == 0 and "reference" in shown.stdout, shown.stdout + shown.stderr

    promoted = prefq(stack, "models", "promote", job_id, "--name", "toy-dpo", "--alias", "production")
    assert promoted.returncode == 0 and "toy-dpo version 1 (production)" in promoted.stdout, promoted.stderr
    version = stack.get("/models/toy-dpo")["versions"][0]
    assert version["metrics"]["eval"]["eval_rewards/accuracies"] == job["eval_metrics"]["eval_rewards/accuracies"]
    shown = prefq(stack, "models", "show", "toy-dpo", "--json")
    assert json.loads(shown.stdout)["aliases"] == {"production": 1}

    second_id = submit(stack, "toy-dpo@production", toy_dpo, "--set", "max_steps=4", "--set", "sample_prompts=0")
    second = stack.wait_for(second_id, {"succeeded", "failed"})
    assert second["status"] == "succeeded", second["error"]
    assert second["model"] == modelref.fine_tuned_name(job["model"], job["tenant"], dpo_job.created.suffix, job_id)
    events = {e["type"]: e["data"] for e in stack.get(f"/jobs/{second_id}/events")["data"]}
    assert events["registered_model"] == {
        "requested": "toy-dpo@production",
        "name": "toy-dpo",
        "version": 1,
        "model": second["model"],
    }
    assert "samples" not in events  # sample_prompts=0 turns them off


def test_a_job_stopped_early_promotes_its_best_checkpoint(stack, dpo_job, micro_model, toy_dpo):
    """Through the queue: held-out reward accuracy stalls at its ceiling, the job stops early saying why, and
    `promote --best` registers the checkpoint of its best evaluation, not its final model."""
    extra = ["max_steps=120", "eval_steps=3", "save_steps=1000", "sample_prompts=0", "learning_rate=0.003"]
    extra += ["best_metric=rewards/accuracies", "early_stopping_patience=2", "early_stopping_min_delta=0.001"]
    job_id = submit(stack, micro_model, toy_dpo, *[arg for item in extra for arg in ("--set", item)])
    job = stack.wait_for(job_id, {"succeeded", "failed"})
    assert job["status"] == "succeeded", job["error"]
    events = stack.get(f"/jobs/{job_id}/events")["data"]
    best = [e["data"] for e in events if e["type"] == "best"][-1]
    (stopping,) = [e["data"] for e in events if e["type"] == "early_stopping"]
    assert stopping["step"] == best["step"] + 6 == job["step"] < 120
    steps = [c["step"] for c in stack.get(f"/jobs/{job_id}/checkpoints")["data"]]
    assert best["step"] in steps

    promoted = prefq(stack, "models", "promote", job_id, "--name", "toy-best", "--best", "--json")
    assert promoted.returncode == 0, promoted.stderr
    version = json.loads(promoted.stdout)
    assert version["fine_tuned_model"].endswith(f":{job_id}:ckpt-step-{best['step']}"), version
    assert version["metrics"]["eval"] == {"eval_rewards/accuracies": best["value"]}

    refused = stack.http.post("/models/toy-best/versions", json={"job_id": dpo_job.job["id"], "best": True})
    assert refused.status_code == 409 and refused.json()["error"]["field"] == "best", refused.text
    missing = stack.http.post("/models/toy-best/versions", json={"job_id": job_id, "checkpoint": 99999})
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "checkpoint", missing.text


def test_sft_samples_and_the_time_budget(micro_model, toy_sft, toy_dpo, tmp_path):
    """SFT samples have no reward and no reference; a budget that runs out skips the prompts left."""
    from tests.conftest import dpo_spec, of_type, run_training

    spec = dpo_spec(
        micro_model,
        toy_sft,
        method="sft",
        max_steps=4,
        eval_steps=4,
        sample_prompts=2,
        sample_max_tokens=8,
        learning_rate=1e-3,
    )
    code, events = run_training(spec, tmp_path / "sft")
    assert code == 0
    samples = of_type(events, "samples")
    assert [(e["step"], e["model"]) for e in samples] == [(0, "policy"), (4, "policy")]
    assert all(s["reward"] is None and 0 < s["tokens"] <= 8 for e in samples for s in e["samples"])

    spec = dpo_spec(micro_model, toy_dpo, max_steps=2, sample_prompts=3, sample_max_seconds=1e-6)
    code, events = run_training(spec, tmp_path / "budget")
    assert code == 0
    samples = of_type(events, "samples")
    assert samples and all(e["prompts"] == 3 and len(e["samples"]) < 3 for e in samples), samples


def test_a_sample_grader_scores_each_evaluation_and_picks_the_best(micro_model, toy_sft, tmp_path):
    """`sample_grader` grades each evaluation's samples against their held-out rows; the mean is the evaluation's
    `eval_sample_grade`, which `best_metric` names. SFT on the toy answers: the samples grow like the reference
    answers (fuzzy match), from nothing like them before training."""
    from tests.conftest import dpo_spec, of_type, run_training

    grader = {
        "type": "text_similarity",
        "name": "like_the_answer",
        "input": "{{sample.output_text}}",
        "reference": "{{item.completion}}",
        "evaluation_metric": "fuzzy_match",
    }
    spec = dpo_spec(micro_model, toy_sft, method="sft", max_steps=60, eval_steps=30, sample_prompts=8)
    spec |= dict(sample_max_tokens=10, sample_grader=grader, best_metric="sample_grade")
    code, events = run_training(spec, tmp_path / "graded")
    assert code == 0, events[-2:]
    grades = {e["step"]: e["metrics"]["eval_sample_grade"] for e in of_type(events, "eval")}
    assert sorted(grades) == [0, 30, 60] and grades[60] > grades[0] + 0.3, grades
    (last,) = [e for e in of_type(events, "samples") if e["step"] == 60]
    assert sum(s["grade"] for s in last["samples"]) / len(last["samples"]) == pytest.approx(grades[60])
    best = of_type(events, "best")[-1]
    assert best["metric"] == "eval_sample_grade" and best["value"] == max(grades.values()), best

    spec |= dict(sample_grader={**grader, "evaluation_metric": "cosine"})
    code, events = run_training(spec, tmp_path / "refused")
    (error,) = of_type(events, "error")
    assert error["code"] == "invalid_spec" and error["message"].startswith("sample_grader.evaluation_metric"), error
