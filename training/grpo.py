"""GRPO, OpenAI's reinforcement method: for each prompt the policy samples `num_generations` answers, the job's
grader (`training.graders`) scores each one, and each answer's advantage is its score against its group's mean and
spread (TRL's `GRPOTrainer`, with a KL penalty of `kl_coef` to the starting model).

String and similarity checks run in this process. Under the worker, a run asks the worker on its grading socket
(`spec.grading.socket`, `worker.grading`) for the rest: the python grader's sandboxed child, which the worker can
start as nobody where the run, confined without capabilities, cannot; and the judges of model graders
(`score_model`, `label_model`), whose credentials only the worker holds and which it checked the job may name. Run
alone (`python -m training run`), the python grader's child is this process's and model graders score 0. A grader that fails or times out scores 0 and is counted (`graders/errors`); it never ends the run.

Each step's events carry TRL's metrics under its names: `reward` and `reward_std` (the mean and spread of the
scores), `frac_reward_zero_std` (the share of prompts whose answers all scored the same: no learning signal),
`completions/mean_length`, `kl`; and prefq's: `graders/<name>` (each sub-grader of a `multi` grader) and
`graders/errors` (the share of answers whose grading failed). Evaluations report the same with `eval_`, and their
samples carry their grades as `reward`.
"""

from __future__ import annotations

import json
import socket
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from training import graders
from training.events import emit
from training.spec import TrainingSpec

FLAGS = [  # (grader types, error flag of `training.graders`)
    ({"python"}, "python_grader_runtime_error"),
    ({"python"}, "python_grader_server_error"),
    ({"score_model", "label_model"}, "model_grader_server_error"),
    ({"score_model", "label_model"}, "model_grader_parse_error"),
    ({"multi"}, "formula_parse_error"),
]
SOCKET_TIMEOUT_S = 600.0  # one answer of the worker's (which bounds the judges' and the graders' own time)


def _ask(path: str, request: dict) -> dict:
    """One question to the worker's grading socket: a JSON line each way."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(SOCKET_TIMEOUT_S)
        conn.connect(path)
        conn.sendall(json.dumps(request).encode() + b"\n")
        with conn.makefile("rb") as fh:
            line = fh.readline()
    if not line:
        raise RuntimeError("the worker's grading socket closed the connection")
    return json.loads(line)


def socket_judge(path: str) -> graders.Judge:
    """A model grader's judge, asked by the worker."""

    def judge(model: str, messages: list[dict], params: dict) -> str:
        answer = _ask(path, {"judge": {"model": model, "messages": messages, "params": params}})
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer["text"]

    return judge


def socket_python(path: str) -> graders.PythonRunner:
    """The python grader, run by the worker: it keeps the right to start the sandbox as nobody, which a confined run
    gave up (`training.parent.confine_child`); the limits are the worker's."""

    def python(source: str, sample: dict, item, limits: graders.Limits) -> graders.PythonResult:
        try:
            answer = _ask(path, {"python": {"source": source, "sample": sample, "item": item}})
        except (OSError, ValueError, RuntimeError) as exc:
            return graders.PythonResult(None, f"the worker did not answer: {exc}", "python_grader_server_error")
        if "result" not in answer:
            return graders.PythonResult(None, answer.get("error", "no result"), "python_grader_server_error")
        return graders.PythonResult(**answer["result"])

    return python


def completion_text(completion) -> str:
    """A sampled answer as text: TRL gives a string, or for message prompts a list with the assistant's message."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))


class Scorer:
    """Grades answers with the spec's grader, several at a time; remembers what went wrong for the step's metrics."""

    def __init__(self, spec: TrainingSpec, grader: dict):
        g = spec.grading
        self.grader = graders.parse(grader)
        self.limits = graders.Limits(seconds=g.timeout_s, memory_bytes=g.memory_mb << 20)
        self.judge = socket_judge(g.socket) if g.socket else None
        self.python = socket_python(g.socket) if g.socket else graders.run_python
        self.pool = ThreadPoolExecutor(g.workers, thread_name_prefix="grader")
        # the failures each step counts by kind: those the grader's types can have
        subs = self.grader.graders.values() if self.grader.type == "multi" else []
        types = {self.grader.type} | {x.type for x in subs}
        self.flags = [f for kinds, f in FLAGS if kinds & types]
        self.told: set[str] = set()  # the error flags a `grader_error` event has shown

    def grade(self, texts: list[str], items: list[str]) -> list[graders.Graded]:
        def one(text: str, item: str) -> graders.Graded:
            return graders.grade(
                self.grader, text, json.loads(item), judge=self.judge, limits=self.limits, python=self.python
            )

        return list(self.pool.map(one, texts, items))

    def reward_function(self):
        """TRL's reward function: the score of each answer; the sub-graders' means and the failures as metrics."""

        def grader(prompts, completions, item, log_metric=None, trainer_state=None, **_) -> list[float]:
            graded = self.grade([completion_text(c) for c in completions], item)
            if log_metric is not None:
                subs: dict[str, list[float]] = defaultdict(list)
                for g in graded:
                    for name, value in g.sub_rewards.items():
                        subs[name].append(value)
                for name, values in subs.items():
                    log_metric(f"graders/{name}", sum(values) / len(values))
                n = max(1, len(graded))
                log_metric("graders/errors", sum(g.failed for g in graded) / n)
                for flag in self.flags:
                    log_metric(f"graders/errors/{flag}", sum(bool(g.errors.get(flag)) for g in graded) / n)
            self._tell(graded, trainer_state.global_step if trainer_state is not None else 0)
            return [g.reward for g in graded]

        grader.__name__ = self.grader.name or self.grader.type  # TRL names `rewards/<name>/mean` after it
        return grader

    def _tell(self, graded: list[graders.Graded], step: int) -> None:
        """A `grader_error` event for the first failure of each kind in the run, with what went wrong."""
        for g in graded:
            for flag in graders.ERROR_FLAGS:
                if g.errors.get(flag) and flag not in self.told:
                    self.told.add(flag)
                    details = g.errors.get(graders.DETAILS.get(flag, flag + "_details")) or g.errors.get(
                        "other_error_details"
                    )
                    emit("grader_error", step=step, flag=flag, grader=self.grader.name, details=details)


def build(spec: TrainingSpec, common: dict, inputs: dict):
    """TRL's GRPO trainer for the spec: generation by transformers in the trainer, or by vLLM beside it on CUDA."""
    from trl import GRPOConfig, GRPOTrainer

    vllm = spec.generation_engine == "vllm"
    if vllm:
        _check_vllm()
    args = GRPOConfig(
        **{k: v for k, v in common.items() if k != "max_length"},
        num_generations=spec.num_generations,
        max_completion_length=spec.max_completion_length,
        temperature=spec.temperature,
        top_p=1.0,
        top_k=0,
        beta=spec.kl_coef,
        use_vllm=vllm,
        vllm_mode="colocate",
        log_completions=False,
        mask_truncated_completions=False,
    )
    scorer = Scorer(spec, spec.grader)

    from training.distributed import DistributedTrainerMixin

    class PrefqGRPOTrainer(DistributedTrainerMixin, GRPOTrainer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.scorer = scorer

    trainer = PrefqGRPOTrainer(args=args, reward_funcs=[scorer.reward_function()], **inputs)
    return trainer


def _check_vllm() -> None:
    import importlib.util

    import torch

    from training.spec import SpecError

    if not torch.cuda.is_available():
        raise SpecError("generation_engine: vLLM samples on CUDA GPUs; this worker has none (use 'transformers')")
    if importlib.util.find_spec("vllm") is None:
        raise SpecError("generation_engine: the vllm package is not installed on this worker (use 'transformers')")
