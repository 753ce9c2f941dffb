"""An evaluation run (method 'eval'): what a model (and a baseline) does on a dataset, measured without training.

For each row, up to `evaluation.max_samples` from the start and within `max_seconds` of generation, the model
answers the row's prompt (greedy, or sampled with the run's seed), and so does the baseline when there is one. Then,
as the evaluation asks (`training.spec.EvaluationSpec`):
- reference metrics of each model's answers against the rows' references (`training.evalmetrics`), and the
  perplexity of the references under each model;
- `reward_accuracy` on pairs: the share of pairs whose chosen answer gets the higher implicit reward, the model's
  log-probability minus the baseline's (DPO's reward with beta 1), and the mean margin;
- graders (OpenAI's) on each answer against its row, with the share of rows that pass each;
- a pairwise judge of the model's answer against the baseline's, asked in both orders, with the win rate and its
  bootstrap interval.

Python graders and judges are asked of the worker on the run's grading socket, as in a GRPO run. A judge that does
not answer (after the worker's retries) fails the run (`judge_unavailable`): a win rate with holes in it would be
wrong, not smaller. Everything lands in the run's output folder: `eval_results.json` (the summary, also the `eval`
event's metrics) and `eval_items.jsonl` (each row's answers, scores and verdicts); the worker keeps them as the job's
artifacts.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from training import evalmetrics
from training.events import emit
from training.formats import read_examples
from training.samples import completion_logp, generation_kwargs, prompt_text
from training.spec import EXIT_OK, EXIT_STOPPED, SpecError, TrainingSpec

log = logging.getLogger("training")
RESULTS, ITEMS = "eval_results.json", "eval_items.jsonl"
PROGRESS_EVERY = 10  # rows between progress events


class EvalError(Exception):
    """The run cannot give an answer: `code` for the job's error, `user_error` as for any run."""

    def __init__(self, code: str, message: str, user_error: bool):
        super().__init__(message)
        self.code, self.user_error = code, user_error


def _text(value) -> str:
    """An answer as text: a string, or the contents of a list of messages."""
    if isinstance(value, str):
        return value
    return "".join(m.get("content") or "" for m in value if isinstance(m, dict) and isinstance(m.get("content"), str))


def _item_reference(item: str) -> str | None:
    try:
        found = json.loads(item)
    except ValueError:
        return None
    if isinstance(found, dict):
        for key in ("reference", "answer", "ideal"):
            if isinstance(found.get(key), str):
                return found[key]
    return None


def cases(rows: list[dict]) -> list[dict]:
    """Each usable row as `prompt` (a string or messages), `reference` (or None), `item` (the row, JSON, for
    graders) and for pairs `chosen` and `rejected` (texts)."""
    out = []
    for row in rows:
        item = row["item"] if "item" in row else json.dumps(dict(row), ensure_ascii=False, default=str)
        case = {"item": item, "reference": None}
        if "chosen" in row:
            case.update(prompt=row["prompt"], reference=_text(row["chosen"]))
            case.update(chosen=row["chosen"], rejected=row["rejected"])
        elif "completion" in row:
            case.update(prompt=row["prompt"], reference=_text(row["completion"]))
        elif row.get("messages"):
            messages = row["messages"]
            cut = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
            if cut == 0:
                continue
            case["prompt"] = messages[:cut]
            if cut < len(messages):
                case["reference"] = _text(messages[cut:])
        elif "prompt" in row:
            case.update(prompt=row["prompt"], reference=_item_reference(item))
        else:
            continue  # plain text: no prompt to answer
        out.append(case)
    return out


class _Model:
    """One model of the run, its tokenizer, and what it answers."""

    def __init__(self, folder: str, spec: TrainingSpec, device: torch.device):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        except (OSError, ValueError) as exc:
            raise EvalError("invalid_model", f"cannot load the model at {folder}: {exc}", True) from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.spec, self.device = spec, device
        self.autocast = (
            (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
            if spec.precision == "bf16"
            else (lambda: torch.autocast(device.type, enabled=False))
        )

    def prompt_ids(self, prompt) -> torch.Tensor:
        text = prompt_text(prompt, self.tokenizer)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] or [self.tokenizer.eos_token_id]
        keep = max(1, self.spec.max_length - self.spec.evaluation.max_tokens)
        return torch.tensor(ids[-keep:], device=self.device)

    def answer(self, prompt) -> str:
        ev, tok = self.spec.evaluation, self.tokenizer
        ids = self.prompt_ids(prompt)
        kwargs = generation_kwargs(tok, ev.max_tokens, ev.temperature)
        with torch.no_grad(), self.autocast():
            out = self.model.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], **kwargs)
        return tok.decode(out[0, ids.numel() :], skip_special_tokens=True)

    def logp(self, prompt, completion: str) -> tuple[float, int]:
        """log p(completion | prompt), summed, and its number of tokens."""
        ids = self.prompt_ids(prompt)
        completion_ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
        tokens = torch.tensor(completion_ids, dtype=torch.long, device=self.device)
        return completion_logp(self.model, ids, tokens, self.autocast), len(completion_ids)


def _perplexity(model: _Model, done: list[dict]) -> float | None:
    total, tokens = 0.0, 0
    for case in done:
        if case["reference"]:
            lp, n = model.logp(case["prompt"], case["reference"])
            total, tokens = total + lp, tokens + n
    return math.exp(-total / tokens) if tokens else None


def _reward_accuracy(model: _Model, baseline: _Model, done: list[dict]) -> dict:
    pairs = [c for c in done if "chosen" in c]
    if not pairs:
        raise EvalError(
            "invalid_spec", "evaluation.metrics: reward_accuracy needs preference pairs; the data has none", True
        )
    margins = []
    for case in pairs:
        prompt = case["prompt"]
        rewards = []
        for answer in (_text(case["chosen"]), _text(case["rejected"])):
            rewards.append(model.logp(prompt, answer)[0] - baseline.logp(prompt, answer)[0])
        case["reward_margin"] = rewards[0] - rewards[1]
        margins.append(case["reward_margin"])
    return {
        "reward_accuracy": sum(m > 0 for m in margins) / len(margins),
        "reward_margin": sum(margins) / len(margins),
    }


class _Judge:
    """The pairwise judge, asked of the worker (`training.grpo.socket_judge`)."""

    def __init__(self, spec: TrainingSpec):
        from training.grpo import socket_judge

        pairwise = spec.evaluation.pairwise
        if spec.grading.socket is None:
            raise EvalError("judge_unavailable", "evaluation.pairwise: a judge is asked through the worker", False)
        self.ask, self.pairwise = socket_judge(spec.grading.socket), pairwise
        self.template = pairwise.template or evalmetrics.JUDGE_TEMPLATE

    def verdicts(self, prompt: str, mine: str, theirs: str) -> list[dict]:
        out = []
        for first, second in ((mine, theirs), (theirs, mine)):
            question = self.template.format(prompt=prompt, first=first, second=second)
            messages = [{"role": "user", "content": question}]
            try:
                reply = self.ask(self.pairwise.judge, messages, {"max_completions_tokens": self.pairwise.max_tokens})
            except (OSError, ValueError, RuntimeError) as exc:
                raise EvalError(
                    "judge_unavailable",
                    f"evaluation.pairwise.judge {self.pairwise.judge!r} did not answer: {exc}",
                    False,
                ) from None
            out.append({"reply": reply[:500], "verdict": evalmetrics.verdict(reply)})
        return out


def _grade(spec: TrainingSpec, answers: list[str], done: list[dict], which: str) -> dict:
    """Each grader's mean score and pass rate over the answers; the rows keep their grades."""
    from training.grpo import Scorer

    ev, out = spec.evaluation, {}
    for name, grader in ev.graders.items():
        scorer = Scorer(spec, grader)
        graded = scorer.grade(answers, [c["item"] for c in done])
        scorer.pool.shutdown()
        for flag, code, what in (
            ("model_grader_server_error", "judge_unavailable", "the judge did not answer"),
            ("python_grader_server_error", "grader_unavailable", "the worker did not run the python grader"),
        ):
            down = [g for g in graded if g.errors.get(flag)]
            if down:  # a score of 0 for an answer nobody graded would be wrong, not lower
                details = down[0].errors.get(f"{flag}_details") or "no answer"
                raise EvalError(code, f"evaluation.graders.{name}: {what}: {details}", False)
        threshold = ev.pass_thresholds.get(name, 0.5)
        for case, g in zip(done, graded, strict=True):
            grade = {"score": g.reward, "passed": g.reward >= threshold, "error": g.failed}
            case.setdefault("grades", {}).setdefault(which, {})[name] = grade
        scores = [g.reward for g in graded]
        out[f"{name}/mean"] = sum(scores) / len(scores)
        out[f"{name}/pass_rate"] = sum(s >= threshold for s in scores) / len(scores)
        out[f"{name}/errors"] = sum(g.failed for g in graded)
    return out


def evaluate(spec: TrainingSpec, out_dir: Path, stop) -> int:
    """Run the evaluation; the results in `out_dir/final`. Returns the exit code."""
    from transformers import set_seed

    ev = spec.evaluation
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        rows = read_examples(spec.train_file, spec.data_kinds, source=f"train_file {spec.train_file}")
    except OSError as exc:
        raise SpecError(f"train_file: cannot read {spec.train_file}: {exc.strerror or exc}") from None
    todo = cases(rows)[: ev.max_samples]
    if not todo:
        raise EvalError("invalid_data", "train_file: no row has a prompt to answer", True)
    needs_reference = {"exact_match", "f1", "rouge_l", "bleu", "perplexity"} & set(ev.metrics)
    if needs_reference and not any(c["reference"] for c in todo):
        raise EvalError(
            "invalid_data",
            f"evaluation.metrics: {', '.join(sorted(needs_reference))} need reference answers (a completion, a "
            "pair's chosen answer, or an item's `reference` or `answer`); the data has none",
            True,
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_seed(spec.seed)
    models = {"model": _Model(spec.model, spec, device)}
    if ev.baseline:
        models["baseline"] = _Model(ev.baseline, spec, device)
    judge = _Judge(spec) if ev.pairwise else None
    emit(
        "started",
        total_steps=len(todo),
        examples=len(todo),
        eval_examples=0,
        epochs=None,
        resumed_from_step=0,
        trainer="eval",
        precision=spec.precision,
        parallelism="none",
        padding_free=False,
    )
    stop.training = True  # from here a SIGTERM ends the loop at the next row
    deadline = time.monotonic() + ev.max_seconds  # of generation
    done: list[dict] = []
    for index, case in enumerate(todo):
        if stop.requested:
            emit("stopped", step=len(done), checkpoint=None)
            return EXIT_STOPPED
        if time.monotonic() > deadline:
            log.info("evaluation: %d of %d rows done within max_seconds", len(done), len(todo))
            break
        case["index"] = index
        case["answers"] = {which: m.answer(case["prompt"]) for which, m in models.items()}
        done.append(case)
        if len(done) % PROGRESS_EVERY == 0:
            _progress(len(done), len(todo), started)
    if not done:
        raise EvalError("time_budget", f"evaluation.max_seconds: {ev.max_seconds:g} s answered no row; raise it", True)
    summary: dict = {"rows": len(done), "rows_skipped": len(todo) - len(done)}
    for which, model in models.items():
        if stop.requested:
            emit("stopped", step=len(done), checkpoint=None)
            return EXIT_STOPPED
        answers = [c["answers"][which] for c in done]
        scored = {}
        if needs_reference:
            with_ref = [c for c in done if c["reference"]]
            found = evalmetrics.reference_metrics(
                [c["answers"][which] for c in with_ref], [c["reference"] for c in with_ref]
            )
            scored.update({k: v for k, v in found.items() if k in ev.metrics})
            if "perplexity" in ev.metrics:
                scored["perplexity"] = _perplexity(model, done)
        if ev.graders:
            scored.update(_grade(spec, answers, done, which))
        summary[which] = scored
    if ev.graders:  # OpenAI's counts, of the model's rows: passed every grader, failed one, or a grader failed
        grades = [c["grades"]["model"] for c in done]
        summary["criteria"] = {
            name: {
                "passed": sum(g[name]["passed"] for g in grades),
                "failed": sum(not g[name]["passed"] for g in grades),
                "errored": sum(g[name]["error"] for g in grades),
            }
            for name in ev.graders
        }
        errored = [any(x["error"] for x in g.values()) for g in grades]
        passed = [all(x["passed"] for x in g.values()) for g in grades]
        summary["result_counts"] = {
            "passed": sum(p and not e for p, e in zip(passed, errored, strict=True)),
            "failed": sum(not p and not e for p, e in zip(passed, errored, strict=True)),
            "errored": sum(errored),
        }
    if "reward_accuracy" in ev.metrics:
        summary["model"].update(_reward_accuracy(models["model"], models["baseline"], done))
    if judge is not None:
        scores = []
        for case in done:
            if stop.requested:
                emit("stopped", step=len(done), checkpoint=None)
                return EXIT_STOPPED
            text = prompt_text(case["prompt"], models["model"].tokenizer)
            case["judge"] = judge.verdicts(text, case["answers"]["model"], case["answers"]["baseline"])
            case["pair_score"] = evalmetrics.pair_score(*(v["verdict"] for v in case["judge"]))
            scores.append(case["pair_score"])
        pairwise = evalmetrics.win_rate(scores, ev.bootstrap, spec.seed)
        pairwise["unparsed"] = sum(v["verdict"] is None for c in done for v in c["judge"])
        pairwise["judge"] = ev.pairwise.judge
        summary["pairwise"] = pairwise
    summary["seconds"] = round(time.monotonic() - started, 3)
    final = out_dir / "final"
    final.mkdir(exist_ok=True)
    with (final / ITEMS).open("w", encoding="utf-8") as fh:
        for case in done:
            prompt = (
                case["prompt"]
                if isinstance(case["prompt"], str)
                else prompt_text(case["prompt"], models["model"].tokenizer)
            )
            row = {
                k: case.get(k)
                for k in ("index", "reference", "answers", "grades", "judge", "pair_score", "reward_margin")
            }
            fh.write(json.dumps({"prompt": prompt, **{k: v for k, v in row.items() if v is not None}}) + "\n")
    (final / RESULTS).write_text(json.dumps(summary, indent=1))
    metrics = flat_metrics(summary)
    _progress(len(done), len(todo), started)
    emit("eval", step=len(done), metrics=metrics)
    emit(
        "done", final_path=str(final), metrics={"step": len(done), "train": {}, "eval": metrics, "evaluation": summary}
    )
    return EXIT_OK


def _progress(step: int, total: int, started: float) -> None:
    emit(
        "progress",
        step=step,
        total_steps=total,
        epoch=0.0,
        loss=None,
        learning_rate=None,
        metrics={"rows_per_second": round(step / max(1e-9, time.monotonic() - started), 3)},
    )


def flat_metrics(summary: dict) -> dict[str, float | None]:
    """The summary as the `eval` event's metrics: `eval_<metric>` for the model, `eval_baseline/<metric>` for the
    baseline, `eval_win_rate` and its interval's ends."""
    out: dict[str, float | None] = {}
    for which, prefix in (("model", "eval_"), ("baseline", "eval_baseline/")):
        for name, value in (summary.get(which) or {}).items():
            out[prefix + name] = value
    if pairwise := summary.get("pairwise"):
        out["eval_win_rate"] = pairwise["win_rate"]
        if pairwise["interval"]:
            out["eval_win_rate/low"], out["eval_win_rate/high"] = pairwise["interval"]
    return out
