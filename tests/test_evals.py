"""Evaluations: reference metrics against hand-computed values, pairwise verdicts and their win rate, the judge's
retries and rate limit, and evaluation runs through the queue on the session stack (`/evals` and OpenAI's Evals API
with the real `openai` SDK, the CLI, the dashboard, the registry): a DPO-trained model against its base judged by a
python grader and a pairwise judge, the base against itself, an SFT job's reference metrics on three rows, and a
judge that is down.

The pairwise judge that decides the win rate is the operator's `arithmetic-judge` (`tests.services.JudgeEndpoint`):
it stands in for the hosted LLM judge an operator would configure, which cannot run here, and the tiny models cannot
judge. The base-against-itself run is judged by a real model instead (tenant `judges`' SFT model, the operator's
`operator-judge`)."""

from __future__ import annotations

import json
import math
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from jobs import judges
from tests.services import ARITHMETIC_JUDGE, HUB_ID, OPERATOR_JUDGE, arithmetic_verdict, tenant_clients
from tests.test_ui import Watched, sign_in
from training import evalmetrics
from training.toy_data import write_toy_data

# (model's answer, reference): one right, one with the wrong number, one cut short
THREE = [
    ("The answer is 5.", "The answer is 5."),
    ("The answer is 7.", "The answer is 5."),
    ("answer 5", "The answer is 5."),
]


def test_reference_metrics_equal_their_hand_computed_values():
    """SQuAD's words drop "the": row 1 is [answer, is, 5] both sides; row 2 shares 2 of 3; row 3 has [answer, 5]
    against [answer, is, 5] (precision 1, recall 2/3). ROUGE-L's words keep "the": LCS 4 of 4/4, 3 of 4/4, 2 of 2/4.
    BLEU over the corpus: 1-grams 9 of 10 match, 2-grams 5 of 7, 3-grams 3 of 4, 4-grams 1 of 2; 10 words against
    12, so the brevity penalty is exp(1 - 12/10)."""
    predictions, references = zip(*THREE, strict=True)
    found = evalmetrics.reference_metrics(list(predictions), list(references))
    assert found["exact_match"] == pytest.approx(1 / 3)
    assert found["f1"] == pytest.approx((1 + 2 / 3 + 0.8) / 3)  # row 3: 2 * 1 * (2/3) / (1 + 2/3) = 0.8
    assert found["rouge_l"] == pytest.approx((1 + 0.75 + 2 / 3) / 3)  # row 3: 2 * 1 * 0.5 / 1.5
    assert found["bleu"] == pytest.approx(math.exp(-0.2) * (0.9 * 5 / 7 * 0.75 * 0.5) ** 0.25)
    assert evalmetrics.bleu(["no match at all here"], ["The answer is 5."]) == 0.0


def test_pairwise_verdicts_cancel_a_position_bias_and_the_interval_holds_the_win_rate():
    replies = ("A", " b.", "Tie", "**A** is better", "It's a tie.", "a tie", "B, by a mile", "neither", "")
    assert [evalmetrics.verdict(r) for r in replies] == ["A", "B", "tie", "A", "tie", "tie", "B", None, None]
    # the model's answer is A first, then B: a judge that always says "A" gives a tie
    assert evalmetrics.pair_score("A", "A") == 0.5
    assert evalmetrics.pair_score("A", "B") == 1.0 and evalmetrics.pair_score("B", "A") == 0.0
    assert evalmetrics.pair_score(None, "tie") == 0.5
    scores = [1.0] * 30 + [0.5] * 60 + [0.0] * 10
    found = evalmetrics.win_rate(scores, resamples=2000, seed=3)
    assert found["win_rate"] == pytest.approx(0.6)
    low, high = found["interval"]
    assert 0.5 < low < 0.6 < high < 0.7
    assert (found["wins"], found["ties"], found["losses"]) == (30, 60, 10)
    assert evalmetrics.win_rate([0.5] * 40)["interval"] == [0.5, 0.5]


def test_the_rate_limit_spaces_a_judges_questions():
    clock = [100.0]
    limit = judges.RateLimit(clock=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + s))
    waits = [limit.wait("http://judge", per_s=4) for _ in range(5)]
    assert waits == [0.0, 0.25, 0.25, 0.25, 0.25] and clock[0] == pytest.approx(101.0)
    assert limit.wait("http://other", per_s=4) == 0.0  # each endpoint its own
    assert limit.wait("http://judge", per_s=0) == 0.0  # 0: no limit


def test_a_judge_is_asked_again_while_it_answers_5xx_and_a_4xx_is_final():
    """A real HTTP server that answers 503 twice, then a reply; then one that answers 400."""
    answers = [503, 503, 200, 400]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            status = answers.pop(0)
            body = json.dumps({"choices": [{"message": {"content": "B"}}]} if status == 200 else {"error": "no"})
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = judges.Endpoint("judge", f"http://127.0.0.1:{server.server_port}/v1")
    slept = []
    with httpx.Client() as http:
        assert judges.ask(http, endpoint, [], {}, 10, retries=2, sleep=slept.append) == "B"
        assert slept == [0.5, 1.0]
        with pytest.raises(RuntimeError, match="HTTP 400"):
            judges.ask(http, endpoint, [], {}, 10, retries=2, sleep=slept.append)
    assert slept == [0.5, 1.0] and not answers
    server.shutdown()


def test_the_arithmetic_judge_reads_the_pairwise_question():
    question = evalmetrics.JUDGE_TEMPLATE.format(
        prompt="What is 2 plus 3?", first=" The answer is 5.", second=" The answer is 17."
    )
    assert arithmetic_verdict(question) == "A"
    assert arithmetic_verdict(question.replace("is 5.", "is 4.")) == "tie"


DPO_HYPER = {  # DPO with the chosen answers' NLL beside it (RPO), so that 40 steps teach the random base the form
    "max_steps": 40,
    "loss_type": ["sigmoid", "sft"],
    "batch_size": 16,
    "learning_rate": 3e-3,
    "lr_scheduler": "constant",
    "max_length": 64,
    "save_steps": 1000,
    "eval_steps": 40,
    "eval_fraction": 0.1,
    "sample_prompts": 6,
    "sample_max_tokens": 12,
    "sample_judge": ARITHMETIC_JUDGE,
}
PYTHON_GRADER = {
    "type": "python",
    "name": "right_sum",
    "source": "import re\n\ndef grade(sample, item):\n"
    "    found = re.search(r'-?\\d+', sample['output_text'])\n"
    "    return float(found is not None and found.group() == item['answer'])\n",
    "pass_threshold": 1.0,
}


@pytest.fixture(scope="module")
def evaluated(stack, toy_dpo, tmp_path_factory):
    """Tenant `evals`: a DPO job of 40 steps on the hub's random micro model (its win rate against the reference
    judged at each evaluation), held-out toy questions (RFT rows, their sums as `answer`), and an evaluation with a
    python grader and the arithmetic judge, created with the SDK."""
    from types import SimpleNamespace

    client, native, key = tenant_clients(stack, "evals")
    with toy_dpo.open("rb") as fh:
        pairs = native.post("/datasets", files={"file": ("pairs.jsonl", fh)}).json()
    job = native.post(
        "/jobs", json={"model": HUB_ID, "dataset": pairs["id"], "method": "dpo", "hyperparameters": DPO_HYPER}
    ).json()
    held_out = tmp_path_factory.mktemp("evals") / "held_out.jsonl"
    write_toy_data(held_out, "rft", rows=40, seed=7)
    with held_out.open("rb") as fh:
        questions = client.files.create(file=fh, purpose="evals")
    created = client.evals.create(
        name="sums",
        data_source_config={"type": "custom", "item_schema": {"type": "object"}},
        testing_criteria=[PYTHON_GRADER, {"type": "pairwise", "name": "judged", "judge": ARITHMETIC_JUDGE}],
    )
    trained = stack.wait_for(job["id"], {"succeeded", "failed", "cancelled"})
    assert trained["status"] == "succeeded", trained
    return SimpleNamespace(client=client, native=native, key=key, job=trained, questions=questions, eval=created)


def _run(evaluated, model: str, baseline: str, eval_id: str | None = None, name: str = "run", tokens: int = 12):
    return evaluated.client.evals.runs.create(
        eval_id or evaluated.eval.id,
        name=name,
        data_source={
            "type": "completions",
            "model": model,
            "source": {"type": "file_id", "id": evaluated.questions.id},
            "baseline": baseline,
            "sampling_params": {"max_completions_tokens": tokens},
        },
    )


def test_a_dpo_model_wins_against_its_base_and_the_base_ties_itself(stack, evaluated, rft, browser, mlflow_server):
    """Through the queue: the DPO job's model against its base on 40 held-out questions, graded by the python grader
    and judged in both orders: a win rate above 50% whose interval is above 50% too; the base against itself,
    judged by a real model, exactly 50%. The SDK reads the runs and their rows; `prefq evals show` prints the table;
    the dashboard shows the table and the judged pairs; the registry requires a minimum win rate; the DPO job's own
    evaluations judged its samples against the reference's; MLflow has the run's metrics; another tenant sees none of
    it."""
    client, job = evaluated.client, evaluated.job
    run = _run(evaluated, job["id"], HUB_ID, name="dpo-vs-base")
    assert run.status == "queued" and run.eval_id == evaluated.eval.id
    assert stack.wait_for(run.id, {"succeeded", "failed", "cancelled"})["status"] == "succeeded"
    found = client.evals.runs.retrieve(run.id, eval_id=evaluated.eval.id)
    assert found.status == "completed", found
    results = found.model_extra["prefq"]["results"]
    pairwise = results["pairwise"]
    low, high = pairwise["interval"]
    print(f"DPO against its base: win rate {pairwise['win_rate']:.3f} [{low:.3f}, {high:.3f}], {results['model']}")
    assert pairwise["win_rate"] > 0.5 and low > 0.5, pairwise
    assert pairwise["prompts"] == 40 and pairwise["unparsed"] == 0
    assert results["model"]["right_sum/mean"] > results["baseline"]["right_sum/mean"], results
    assert found.result_counts.total == 40
    assert found.result_counts.passed == found.per_testing_criteria_results[0].passed > 0
    rows = client.evals.runs.output_items.list(run.id, eval_id=evaluated.eval.id, limit=100).data
    assert len(rows) == 40
    judged = rows[0].model_extra["prefq"]["judge"]
    assert len(judged) == 2 and all(v["verdict"] in ("A", "B", "tie") for v in judged)
    assert {r.status for r in rows} <= {"pass", "fail"}

    # MLflow, as any job's evaluation
    from tests.test_tracking import mlflow_client

    tracking = mlflow_client(mlflow_server)
    experiment = tracking.get_experiment_by_name("prefq/evals")
    tracked = tracking.search_runs([experiment.experiment_id], f"tags.`prefq.job_id` = '{run.id}'")
    assert tracked[0].data.metrics["eval_win_rate"] == pytest.approx(pairwise["win_rate"])

    # the base against itself, judged by a real model (the operator's): every pair a tie, whatever it replies
    self_eval = client.evals.create(
        name="self",
        data_source_config={"type": "custom", "item_schema": {"type": "object"}},
        testing_criteria=[{"type": "pairwise", "name": "judged", "judge": OPERATOR_JUDGE}],
    )
    same = _run(evaluated, HUB_ID, HUB_ID, eval_id=self_eval.id, name="base-vs-base")
    assert stack.wait_for(same.id, {"succeeded", "failed", "cancelled"})["status"] == "succeeded"
    tied = client.evals.runs.retrieve(same.id, eval_id=self_eval.id).model_extra["prefq"]["results"]["pairwise"]
    assert tied["win_rate"] == 0.5 and tied["interval"] == [0.5, 0.5], tied

    # the training job's evaluations: its samples judged against the reference's, 0.5 before training
    evals = [e["data"] for e in stack.get(f"/jobs/{job['id']}/events?limit=1000")["data"] if e["type"] == "eval"]
    rates = {e["step"]: e["metrics"]["eval_win_rate"] for e in evals}
    assert rates[0] == 0.5 and rates[40] > 0.5, rates

    # the CLI's table
    env = {**stack.env, "PREFQ_API_KEY": evaluated.key}
    shown = subprocess.run(
        ["prefq", "evals", "show", evaluated.eval.id, run.id], env=env, capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert "right_sum/mean" in shown.stdout and f"win rate {pairwise['win_rate']:.3f}" in shown.stdout

    # the registry: a version needs the minimum, and carries the evaluation
    native = evaluated.native
    too_high = native.post("/models/sums/versions", json={"job_id": job["id"], "require": {"eval_win_rate": 0.99}})
    assert too_high.status_code == 409 and too_high.json()["error"]["field"] == "require.eval_win_rate", too_high.text
    promoted = native.post("/models/sums/versions", json={"job_id": job["id"], "require": {"eval_win_rate": 0.5}})
    assert promoted.status_code == 201, promoted.text
    assert promoted.json()["metrics"]["evaluation"]["run_id"] == run.id

    # the dashboard: the run's table and its judged pairs
    watched = Watched(browser, stack.url)
    page = watched.page()
    sign_in(page, evaluated.key, f"/ui/jobs/{run.id}")
    page.wait_for_selector("#evaluation .win-rate")
    assert page.locator("#evaluation .eval-rows tbody tr").count() == 40
    assert "right_sum/mean" in page.locator("#evaluation .eval-metrics").inner_text()
    assert page.locator("#evaluation .verdicts").first.inner_text().count("/") == 1
    page.goto(f"/ui/jobs/{job['id']}")  # the evaluated job lists the runs of its model
    assert "dpo-vs-base" in page.locator("#eval-runs").inner_text()
    assert not watched.errors, watched.errors
    watched.context.close()

    # another tenant: every face answers 404
    _, other, _ = tenant_clients(stack, "evals-other")
    paths = [
        f"/evals/{evaluated.eval.id}",
        f"/evals/{evaluated.eval.id}/runs",
        f"/evals/{evaluated.eval.id}/runs/{run.id}",
        f"/evals/{evaluated.eval.id}/runs/{run.id}/output_items",
        f"/v1/evals/{evaluated.eval.id}/runs/{run.id}",
        f"/jobs/{run.id}",
    ]
    for path in paths:
        assert other.get(path).status_code == 404, path
    assert other.get("/evals").json()["data"] == []
    watched = Watched(browser, stack.url)
    page = watched.page()
    sign_in(page, other.headers["Authorization"].removeprefix("Bearer "), "/ui/jobs")
    assert page.goto(f"/ui/jobs/{run.id}").status == 404
    watched.context.close()


def test_an_sft_jobs_reference_metrics_match_a_hand_computation_on_three_rows(stack, rft, tmp_path):
    """The SFT job's model on three rows with references, natively: exact match, F1 and ROUGE-L equal the formulas
    (pinned to hand-computed values above) on its answers, and perplexity equals exp of the mean negative
    log-likelihood of the references' tokens, computed here from the model's downloaded weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [
        {"prompt": "What is 1 plus 2?", "completion": " The answer is 3."},
        {"prompt": "What is 4 plus 4?", "completion": " The answer is 8."},
        {"prompt": "What is 0 plus 3?", "completion": " It is 3, the answer."},
    ]
    native = rft.native
    path = tmp_path / "three.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with path.open("rb") as fh:
        data = native.post("/datasets", files={"file": ("three.jsonl", fh)}, data={"method": "sft"}).json()
    criteria = [{"type": "reference_metrics", "metrics": ["exact_match", "f1", "rouge_l", "perplexity"]}]
    created = native.post("/evals", json={"name": "three", "testing_criteria": criteria})
    assert created.status_code == 201, created.text
    eval_id = created.json()["id"]
    source = {"model": rft.job_id, "source": {"id": data["id"]}, "sampling_params": {"max_completions_tokens": 10}}
    run = native.post(f"/evals/{eval_id}/runs", json={"data_source": source})
    assert run.status_code == 202, run.text
    assert stack.wait_for(run.json()["id"], {"succeeded", "failed", "cancelled"})["status"] == "succeeded"
    found = native.get(f"/evals/{eval_id}/runs/{run.json()['id']}").json()
    metrics = found["prefq"]["results"]["model"]
    items = native.get(f"/evals/{eval_id}/runs/{found['id']}/output_items").json()["data"]
    answers = [i["prefq"]["answers"]["model"] for i in sorted(items, key=lambda i: i["datasource_item_id"])]
    references = [r["completion"] for r in rows]
    expected = evalmetrics.reference_metrics(answers, references)
    print(f"SFT model on three rows: answers {answers}; {metrics}")
    for name in ("exact_match", "f1", "rouge_l"):
        assert metrics[name] == pytest.approx(expected[name]), name
    assert metrics["exact_match"] < 1  # the third reference is not what it learned to say

    folder = tmp_path / "model"
    folder.mkdir()
    for f in native.get(f"/jobs/{rft.job_id}/model").json()["files"]:
        (folder / f["name"]).parent.mkdir(parents=True, exist_ok=True)
        (folder / f["name"]).write_bytes(httpx.get(f["url"]).content)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    started = [e for e in stack.get(f"/jobs/{found['id']}/events")["data"] if e["type"] == "started"][0]["data"]
    bf16 = started["precision"] == "bf16"  # the run's autocast (`precision: auto` on this CPU)
    nll, count = 0.0, 0
    for row in rows:
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        answer = tok(row["completion"], add_special_tokens=False)["input_ids"]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(torch.tensor([prompt + answer])).logits[0]
        for i, token in enumerate(answer):
            nll -= torch.log_softmax(logits[len(prompt) + i - 1].float(), -1)[token].item()
        count += len(answer)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_a_judge_that_is_down_fails_the_run_clearly_and_leaves_the_training_job(stack, evaluated):
    job = evaluated.job
    before = stack.get(f"/jobs/{job['id']}")
    events_before = stack.get(f"/jobs/{job['id']}/events?limit=1000")["data"]
    stack.judge.down = True
    try:
        run = _run(evaluated, job["id"], HUB_ID, name="judge-down")
        failed = stack.wait_for(run.id, {"succeeded", "failed", "cancelled"})
    finally:
        stack.judge.down = False
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "judge_unavailable", failed["error"]
    assert ARITHMETIC_JUDGE in failed["error"]["message"] and "503" in failed["error"]["message"], failed["error"]
    after = stack.get(f"/jobs/{job['id']}")
    assert (after["status"], after["eval_metrics"], after["attempt"]) == (
        before["status"],
        before["eval_metrics"],
        before["attempt"],
    )
    assert stack.get(f"/jobs/{job['id']}/events?limit=1000")["data"] == events_before


def test_bad_evaluations_are_refused_naming_the_field(stack, evaluated):
    native = evaluated.native
    cases = [
        ([{"type": "cosine"}], "testing_criteria.0.type"),
        ([{"type": "pairwise", "judge": "someone-elses-model"}], "testing_criteria.0.judge"),
        ([{"type": "reference_metrics", "metrics": ["accuracy"]}], "testing_criteria.0.metrics"),
        ([{"type": "pairwise", "judge": ARITHMETIC_JUDGE, "template": "no fields"}], "testing_criteria.0.template"),
        ([{"type": "string_check", "name": "x", "input": "a", "reference": "b"}], "testing_criteria.0.operation"),
        ([{"type": ["x"]}], "testing_criteria.0.type"),
        ([{"type": "reference_metrics", "metrics": 3}], "testing_criteria.0.metrics"),
        ([{"type": "python", "name": "p", "source": "x" + "+x" * 60000}], "testing_criteria.0.source"),
    ]
    for criteria, field in cases:
        answer = native.post("/evals", json={"name": "bad", "testing_criteria": criteria})
        assert answer.status_code == 422 and answer.json()["error"]["field"] == field, (criteria, answer.text)
    # a pairwise run needs its baseline; OpenAI's face answers 400 with the param
    no_baseline = native.post(
        f"/v1/evals/{evaluated.eval.id}/runs",
        json={"data_source": {"type": "completions", "model": HUB_ID, "source": {"id": evaluated.questions.id}}},
    )
    assert no_baseline.status_code == 400, no_baseline.text
    assert no_baseline.json()["error"]["param"] == "data_source.baseline"
    # another tenant's model as the baseline names the field too
    other = native.post(
        f"/evals/{evaluated.eval.id}/runs",
        json={"data_source": {"model": HUB_ID, "source": {"id": evaluated.questions.id}, "baseline": "job_nothere"}},
    )
    assert other.status_code == 422 and other.json()["error"]["field"] == "data_source.baseline", other.text
    runs = native.get(f"/evals/{evaluated.eval.id}/runs").json()["data"]
    cursor = native.get(f"/evals/{evaluated.eval.id}/runs/{runs[0]['id']}/output_items", params={"after": "x-1"})
    assert cursor.status_code == 422 and cursor.json()["error"]["field"] == "after", cursor.text


def test_an_evaluation_without_a_value_of_the_best_metric_is_no_improvement():
    """A judge that did not answer leaves `eval_win_rate` None for that evaluation: neither the best nor a crash."""
    from training.best import Best

    best = Best("eval_win_rate", "max", patience=2)
    assert best.update(0, {"eval_win_rate": 0.5}) == (True, False)
    assert best.update(10, {"eval_win_rate": None}) == (False, False)
    assert best.update(20, {"eval_win_rate": 0.6}) == (True, False) and best.value == 0.6


def test_preference_accuracy_of_a_dpo_model_against_its_reference(micro_model, toy_dpo, tmp_path):
    """On held-out pairs, the share whose chosen answer the DPO model raises more than its reference does: DPO's
    held-out reward accuracy, computed by an evaluation run (here without the queue) from the two models."""
    from tests.conftest import dpo_spec, of_type, run_training

    rc, trained = run_training(dpo_spec(micro_model, toy_dpo, max_steps=20, eval_fraction=0), tmp_path / "dpo")
    assert rc == 0
    held_out = tmp_path / "pairs.jsonl"
    write_toy_data(held_out, "dpo", rows=30, seed=11)
    spec = {
        "method": "eval",
        "model": str(tmp_path / "dpo" / "final"),
        "train_file": str(held_out),
        "max_length": 64,
        "evaluation": {"baseline": str(micro_model), "metrics": ["reward_accuracy", "exact_match"], "max_tokens": 8},
    }
    rc, events = run_training(spec, tmp_path / "eval")
    assert rc == 0, events[-1]
    metrics = of_type(events, "eval")[-1]["metrics"]
    assert metrics["eval_reward_accuracy"] >= 0.9 and metrics["eval_reward_margin"] > 0, metrics
    assert "eval_baseline/reward_accuracy" not in metrics  # the baseline is the reference, not a second policy
    rows = [json.loads(line) for line in (tmp_path / "eval" / "final" / "eval_items.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and sum(r["reward_margin"] > 0 for r in rows) / 30 == metrics["eval_reward_accuracy"]


def test_an_eval_run_is_cancelled_and_retried_as_a_job(stack, evaluated):
    """Cancelled while it answers, the run ends `canceled` (its rows stop at once); retried, it runs again whole."""
    run = _run(evaluated, evaluated.job["id"], HUB_ID, name="cancelled", tokens=48)  # 80 answers: seconds
    stack.wait_for_event(run.id, "started")
    cancel = evaluated.native.post(f"/evals/{evaluated.eval.id}/runs/{run.id}/cancel")
    assert cancel.status_code == 200, cancel.text
    assert stack.wait_for(run.id, {"succeeded", "failed", "cancelled"})["status"] == "cancelled"
    assert evaluated.client.evals.runs.retrieve(run.id, eval_id=evaluated.eval.id).status == "canceled"
    retried = evaluated.native.post(f"/jobs/{run.id}/retry")
    assert retried.status_code == 202, retried.text
    assert stack.wait_for(run.id, {"succeeded", "failed", "cancelled"})["status"] == "succeeded"
    found = evaluated.native.get(f"/evals/{evaluated.eval.id}/runs/{run.id}").json()
    assert found["status"] == "completed" and found["result_counts"]["total"] == 40


def test_the_judges_of_a_multi_grader_are_found_however_its_graders_are_given():
    """Given as a list or as one grader, a `multi` grader's judges are still the ones checked for the tenant."""
    judged = {"type": "score_model", "name": "s", "model": "judge-1", "input": [], "range": [0, 1]}
    for graders in ([judged], {"s": judged}, judged):
        grader = {"type": "multi", "name": "m", "graders": graders, "calculate_output": "s"}
        assert [model for _, model in judges.models_of(grader)] == ["judge-1"], graders
