"""GRPO, OpenAI's reinforcement method, through the queue on the session stack: a short SFT job teaches the micro
model the answers' form, then reinforcement jobs sample answers to the toy questions and learn from their graders'
scores. The graders run inside the run's process tree; model graders' judges are answered by the worker (a model of
the tenant's served by `prefq serve`, or the operator's endpoint)."""

from __future__ import annotations

import json
import subprocess

import openai
import pytest

from tests.conftest import of_type, run_training
from tests.services import GRADER, HUB_ID, OPERATOR_JUDGE, tenant_clients
from tests.test_ui import Watched, sign_in
from training.formats import check_lines

GRPO = {  # 4 prompts of 8 answers a step; answers of up to 12 tokens (" The answer is 7." is 7)
    "learning_rate": 1e-3,
    "lr_scheduler": "constant",
    "max_length": 64,
    "max_completion_length": 12,
    "eval_fraction": 0.15,
    "sample_prompts": 4,
    "sample_max_tokens": 12,
    "logging_steps": 10,
}
PYTHON = {
    "type": "python",
    "name": "exact",
    "source": "def grade(sample, item):\n    return float(sample['output_text'].strip() == 'The answer is ' + item['answer'] + '.')\n",
}


def _reinforce(stack, rft, grader: dict, **hyper) -> str:
    """A GRPO job of 80 steps (4 prompts of 8 answers) on the SFT model, created with the SDK: its id."""
    method = {
        "type": "reinforcement",
        "reinforcement": {
            "grader": grader,
            "hyperparameters": {"batch_size": 4, "compute_multiplier": 2, "eval_interval": 80},
        },
    }
    job = rft.client.fine_tuning.jobs.create(
        model=rft.model,
        training_file=rft.file.id,
        method=method,
        extra_body={"prefq": {"hyperparameters": {**GRPO, "max_steps": 80, **hyper}}},
    )
    return job.id


def _gain(stack, job_id: str, grader: str) -> tuple[float, float]:
    evals = {e["data"]["step"]: e["data"]["metrics"] for e in _events(stack, job_id, "eval")}
    before, after = evals[0]["eval_reward"], evals[80]["eval_reward"]
    print(f"{grader}: held-out mean reward (60 prompts x 8 answers) {before:.3f} after SFT, {after:.3f} after GRPO")
    return before, after


def _events(stack, job_id: str, kind: str) -> list[dict]:
    found = [e for e in stack.get(f"/jobs/{job_id}/events?limit=1000")["data"] if e["type"] == kind]
    return sorted(found, key=lambda e: e["seq"] if "seq" in e else e["created_at"])


def test_a_reinforcement_job_raises_the_held_out_reward_and_resumes_after_a_cancel(stack, rft, browser):
    """OpenAI's SDK creates a reinforcement job with a `string_check` grader; cancelled after its first checkpoint and
    retried, it goes on from there and ends with a higher held-out mean reward than the SFT model's. The dashboard
    draws its reward curves."""
    job_id = _reinforce(stack, rft, GRADER, save_steps=20)
    job = rft.client.fine_tuning.jobs.retrieve(job_id)
    native = stack.get(f"/jobs/{job.id}")
    assert native["method"] == "grpo"
    assert (native["hyperparameters"]["num_generations"], native["hyperparameters"]["batch_size"]) == (8, 32)

    stack.wait_for_event(job.id, "checkpoint", timeout_s=120)
    rft.client.fine_tuning.jobs.cancel(job.id)
    cancelled = stack.wait_for(job.id, {"cancelled", "succeeded", "failed"})
    assert cancelled["status"] == "cancelled" and cancelled["step"] < 80, cancelled
    retried = stack.http.post(f"/jobs/{job.id}/retry")
    assert retried.status_code == 202, retried.text
    done = stack.wait_for(job.id, {"succeeded", "failed", "cancelled"})
    assert done["status"] == "succeeded", done

    started = [e["data"] for e in _events(stack, job.id, "started")]
    (stopped,) = [e["data"] for e in _events(stack, job.id, "stopped")]
    assert started[-1]["resumed_from_step"] == stopped["step"] >= 20, "from the checkpoint saved at the cancel"
    before, after = _gain(stack, job.id, "string_check")
    assert after >= before + 0.04, (before, after)

    progress = [e["data"] for e in _events(stack, job.id, "progress")]
    metrics = progress[-1]["metrics"]
    for name in ("reward", "reward_std", "frac_reward_zero_std", "kl", "completions/mean_length", "graders/errors"):
        assert name in metrics, (name, sorted(metrics))
    assert metrics["rewards/right_number/mean"] == metrics["reward"] and metrics["graders/errors"] == 0
    samples = [e["data"] for e in _events(stack, job.id, "samples") if e["data"]["model"] == "policy"]
    assert samples and all(s["reward"] in (0.0, 1.0) for e in samples for s in e["samples"]), samples[:1]
    sdk = rft.client.fine_tuning.jobs.retrieve(job.id)
    assert sdk.method.type == "reinforcement" and sdk.fine_tuned_model, sdk
    assert sdk.method.reinforcement.grader.name == "right_number"
    assert sdk.method.reinforcement.hyperparameters.compute_multiplier == 2

    watched = Watched(browser, stack.url)
    page = watched.page()
    sign_in(page, rft.key, f"/ui/jobs/{job.id}")
    for chart in ("grader-reward", "no-signal", "kl", "answer-length"):  # 8 progress events and 2 evaluations
        page.wait_for_function(f"() => +document.querySelector('#chart-{chart}')?.dataset.points >= 8")
    assert not watched.errors, watched.errors
    watched.context.close()


def test_python_multi_and_model_graders_score_inside_a_run(stack, rft, rft_rows, tmp_path):
    """A `multi` grader over a python grader, a string check, a `score_model` judged by the tenant's served model and
    a `label_model` judged by the operator's endpoint: every one scores each answer inside the run (their scores
    need not mean much); a judge that another tenant names is refused before the job is queued."""
    judged = [{"role": "user", "content": "{{item.prompt}}"}]
    grader = {
        "type": "multi",
        "name": "all",
        "graders": {
            "exact": PYTHON,
            "number": GRADER,
            "served": {
                "type": "score_model",
                "name": "served",
                "model": rft.model,
                "input": judged,
                "range": [0, 10],
                "sampling_params": {"max_completions_tokens": 8},
            },
            "operator": {
                "type": "label_model",
                "name": "operator",
                "model": OPERATOR_JUDGE,
                "input": judged,
                "labels": ["The answer is 3.", "other"],
                "passing_labels": ["The answer is 3."],
            },
        },
        "calculate_output": "0.4 * exact + 0.4 * number + 0.1 * served / 10 + 0.1 * operator",
    }
    # 2 steps of 2 prompts with 4 answers, each asked of both judges; through the CLI, the grader in a file
    hyper = {**GRPO, "max_steps": 2, "batch_size": 8, "save_steps": 1000, "logging_steps": 2, "eval_fraction": 0.0}
    (tmp_path / "grader.json").write_text(json.dumps(grader))
    sets = [arg for k, v in hyper.items() for arg in ("--set", f"{k}={v}")]
    args = [
        "submit",
        str(rft_rows),
        "--model",
        rft.model,
        "--method",
        "grpo",
        "--grader",
        str(tmp_path / "grader.json"),
    ]
    out = subprocess.run(
        ["prefq", *args, *sets, "--wait"],
        env={**stack.env, "PREFQ_API_KEY": rft.key},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = next(w for w in out.stdout.split() if w.startswith("job_"))
    assert "dataset ds_" in out.stdout and "rft_prompt" in out.stdout, out.stdout
    metrics = _events(stack, job_id, "progress")[-1]["data"]["metrics"]
    for name in ("graders/exact", "graders/number", "graders/served", "graders/operator"):
        assert name in metrics, (name, sorted(metrics))
    told = [e["data"] for e in _events(stack, job_id, "grader_error")]
    assert metrics["graders/errors/python_grader_runtime_error"] == 0, told
    assert metrics["graders/errors/python_grader_server_error"] == 0, told
    assert metrics["graders/errors/model_grader_server_error"] == 0, (
        "both judges answered every question",
        json.dumps(told),
    )


def test_bad_reinforcement_jobs_are_400s_naming_the_param(stack, rft):
    other, *_ = tenant_clients(stack, "grpo-other")
    path_rows = [{"prompt": "What is 1 plus 1?", "answer": "2"}] * 8
    file = other.files.create(file=("rft.jsonl", "".join(json.dumps(r) + "\n" for r in path_rows)), purpose="fine-tune")
    cases = {
        "method.reinforcement.grader.type": {"grader": {**GRADER, "type": "regex_check"}},
        "method.reinforcement.grader.model": {
            "grader": {
                "type": "score_model",
                "name": "j",
                "model": rft.model,  # another tenant's
                "input": [{"role": "user", "content": "{{item.prompt}}"}],
                "range": [0, 1],
            }
        },
    }
    for param, reinforcement in cases.items():
        with pytest.raises(openai.BadRequestError) as err:
            other.fine_tuning.jobs.create(
                model=HUB_ID,
                training_file=file.id,
                method={"type": "reinforcement", "reinforcement": reinforcement},
            )
        assert err.value.param == param, (param, err.value.body)


def test_reinforcement_rows_are_prompts_with_their_row_as_the_item():
    """OpenAI's RFT rows (messages that end before the answer, with any fields beside them) and plain prompts; the
    whole row is the item the grader reads. Bad rows name their field."""
    rows = [
        {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "answer": 4},
        {"messages": [{"role": "user", "content": "3+3?"}], "answer": 6, "tags": ["easy"]},
    ]
    report, examples = check_lines([json.dumps(r).encode() for r in rows])
    assert (report.format, report.method, report.rows) == ("rft_messages", "rft", 2)
    assert examples[0]["prompt"][-1] == {"role": "user", "content": "2+2?"}
    assert json.loads(examples[1]["item"]) == rows[1]
    report, examples = check_lines([b'{"prompt": "What is 1 plus 1?", "answer": "2"}'], ("rft",))
    assert (report.format, examples[0]["prompt"]) == ("rft_prompt", "What is 1 plus 1?")
    report, _ = check_lines([b'{"prompt": "Q"}'], ("dpo",))
    assert [(e.field, e.reason) for e in report.errors] == [("chosen", "missing")], "a pair still lacks its answers"

    bad = {
        ("messages[1].role", "the last message is the answer the model is to write"): {
            "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
        },
        ("tools", "tools in reinforcement data are not supported yet"): {
            "messages": [{"role": "user", "content": "Q"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        ("prompt", "give messages or prompt, not both"): {
            "messages": [{"role": "user", "content": "Q"}],
            "prompt": "Q",
        },
    }
    for (field, reason), row in bad.items():
        report, _ = check_lines([json.dumps(row).encode()], ("rft",))
        assert [(e.line, e.field, e.reason) for e in report.errors] == [(1, field, reason)], report.errors


def test_grpo_on_fsdp_shards_the_policy_and_its_checkpoints_load(micro_model, rft_rows, tmp_path):
    """Two CPU ranks under FSDP2: the policy's parameters are DTensors, every rank samples and grades its share, and
    each checkpoint holds the gathered folder that the serve and exports load."""
    spec = {
        "method": "grpo",
        "model": str(micro_model),
        "train_file": str(rft_rows),
        "grader": GRADER,
        "trainer": "fsdp",
        "gpus": 2,
        "num_generations": 2,
        "batch_size": 2,
        "max_steps": 2,
        "save_steps": 2,
        "eval_fraction": 0.0,
        "max_length": 48,
        "max_completion_length": 8,
        "learning_rate": 1e-3,
    }
    code, events = run_training(spec, tmp_path / "out")
    assert code == 0, events[-3:]
    (started,) = of_type(events, "started")
    assert started["parallelism"]["dtensor_parameters"] > 0, started["parallelism"]
    assert "reward" in of_type(events, "progress")[-1]["metrics"]
    assert (tmp_path / "out" / "checkpoint-2" / "hf" / "config.json").is_file()
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


@pytest.mark.long
@pytest.mark.parametrize("kind", ["python", "multi"])
def test_python_and_multi_graders_raise_the_held_out_reward(stack, rft, kind):
    """The long form of the reinforcement test for the graders that run code: 80 steps of 32 answers each graded in
    a sandboxed child (about 40 s of grading here), so CI runs the short form above and `-m long` this one."""
    grader = PYTHON
    if kind == "multi":
        grader = {
            "type": "multi",
            "name": "both",
            "graders": {"exact": PYTHON, "number": GRADER},
            "calculate_output": "0.5 * exact + 0.5 * number",
        }
    job_id = _reinforce(stack, rft, grader, save_steps=1000)
    done = stack.wait_for(job_id, {"succeeded", "failed", "cancelled"})
    assert done["status"] == "succeeded", done["error"]
    before, after = _gain(stack, job_id, kind)
    assert after >= before + 0.04, (before, after)
