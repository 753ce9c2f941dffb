"""Sample generations at each evaluation: what the policy writes for a few held-out prompts, and once what the
reference writes, so that a person can read what training changed (a falling loss does not say it).

`sample_prompts` prompts are taken from the start of the eval split (the same ones every time), rendered as the
trainer renders them (the tokenizer's chat template for message lists), and completed greedily, or sampled with
the run's seed when `sample_temperature` > 0, up to `sample_max_tokens` new tokens. For DPO each completion of
the policy gets its implicit reward, beta * (log p_policy(completion | prompt) - log p_ref(completion | prompt)),
the quantity DPO raises for chosen answers. A budget of `sample_max_seconds` per evaluation bounds the time:
prompts left when it runs out are skipped (the event says how many were done).

The reference is `trainer.ref_model` when the trainer keeps one, the policy with its adapter switched off under
LoRA, and otherwise (the reference log-probs were precomputed, so the trainer keeps no reference model) the base
model, loaded at the first evaluation and kept in host memory between evaluations (on the accelerator only while
one runs).

Only single-process runs (`basic`) sample: under FSDP or tensor parallelism every rank would have to run
`generate` in lockstep on a sharded model.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time

import torch

from training.chat import clean
from training.events import emit
from training.spec import TrainingSpec

log = logging.getLogger("training")
PROMPT_CHARS = 2000  # a sample keeps the end of a longer prompt: the question sits next to the answer


def held_out_prompts(rows, n: int, with_items: bool = False):
    """The prompts of the first `n` usable rows of a split (strings or message lists), each once (KTO's rows of an
    unrolled pair share theirs). `with_items`: also each one's row as JSON, the item its grader reads (a
    reinforcement row's own `item`)."""
    prompts, items = [], []
    for row in rows:
        if len(prompts) >= n:
            break
        prompt = None
        if "prompt" in row and row["prompt"]:
            if row["prompt"] not in prompts:
                prompt = row["prompt"]
        elif row.get("messages"):
            messages = clean(row["messages"])
            cut = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
            if cut > 0:
                prompt = messages[:cut]
        elif row.get("text"):  # plain text: its first words are the prompt
            words = row["text"].split()
            prompt = " ".join(words[: max(1, min(16, len(words) // 3))])
        if prompt is not None:
            prompts.append(prompt)
            items.append(row["item"] if "item" in row else json.dumps(dict(row), ensure_ascii=False, default=str))
    return (prompts, items) if with_items else prompts


def generation_kwargs(tokenizer, max_new_tokens: int, temperature: float) -> dict:
    """`generate`'s arguments: greedy at temperature 0, else sampled at `temperature` with no top-p or top-k cut."""
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    if tokenizer.eos_token_id is not None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def prompt_text(prompt, tokenizer) -> str:
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return prompt


def completion_logp(model, prompt_ids: torch.Tensor, completion_ids: torch.Tensor, autocast) -> float:
    """Sum of log p(completion token | everything before it)."""
    if completion_ids.numel() == 0:
        return 0.0
    ids = torch.cat([prompt_ids, completion_ids])[None]
    with torch.no_grad(), autocast():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0]
    start = prompt_ids.numel()
    logps = torch.log_softmax(logits[start - 1 : -1].float(), dim=-1)
    return logps.gather(1, completion_ids[:, None]).sum().item()


class Sampler:
    """Generates and emits the samples of one evaluation; the reference's only the first time."""

    def __init__(self, spec: TrainingSpec, prompts: list, tokenizer, items: list[str] | None = None):
        self.spec, self.prompts, self.tokenizer = spec, prompts, tokenizer
        self.items = items  # each prompt's item, for GRPO's grader or `sample_grader` (`training.grpo.Scorer`)
        self.scorer = None
        self.reference_done = False
        self.reference_texts: dict[int, str] | None = None  # the reference's answers by prompt, for `sample_judge`
        self.loaded_reference = None  # the base model, loaded once where the trainer keeps no reference model

    @property
    def enabled(self) -> bool:
        return bool(self.prompts) and self.spec.sample_prompts > 0

    def _generate(self, model, ids: torch.Tensor, autocast) -> torch.Tensor:
        kwargs = generation_kwargs(self.tokenizer, self.spec.sample_max_tokens, self.spec.sample_temperature)
        with torch.no_grad(), autocast():
            out = model.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], **kwargs)
        return out[0, ids.numel() :]

    def _complete(self, model, autocast, device, deadline: float) -> list[tuple]:
        """(index, prompt text, prompt ids, completion ids) of the prompts done before `deadline`."""
        done = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.spec.seed)
            for index, prompt in enumerate(self.prompts):
                if time.monotonic() > deadline:
                    break
                text = prompt_text(prompt, self.tokenizer)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] or [self.tokenizer.eos_token_id]
                ids = torch.tensor(ids, device=device)[-max(1, self.spec.max_length - self.spec.sample_max_tokens) :]
                done.append((index, text, ids, self._generate(model, ids, autocast)))
        return done

    def _rows(self, done: list[tuple], rewards: list[float | None]) -> list[dict]:
        return [
            {
                "index": index,
                "prompt": text if len(text) <= PROMPT_CHARS else "…" + text[-PROMPT_CHARS:],
                "completion": self.tokenizer.decode(completion, skip_special_tokens=True),
                "tokens": int(completion.numel()),
                "reward": None if r is None else round(r, 6),
            }
            for (index, text, _, completion), r in zip(done, rewards, strict=True)
        ]

    def _emit(self, step: int, which: str, samples: list[dict], started: float) -> None:
        emit(
            "samples",
            step=step,
            model=which,
            samples=samples,
            prompts=len(self.prompts),
            seconds=round(time.monotonic() - started, 3),
        )

    def run(self, trainer, step: int) -> dict[str, float]:
        """Generate, score and emit this evaluation's samples; their metrics: the mean grade of `sample_grader`
        (`eval_sample_grade`) and the win rate of `sample_judge` (`eval_win_rate`), where the spec asks."""
        if not self.enabled:
            return {}
        if trainer.accelerator.num_processes > 1:
            if not self.reference_done:
                log.info("samples: skipped, a run of several processes does not generate")
                self.reference_done = True
            return {}
        started = time.monotonic()
        budget = self.spec.sample_max_seconds
        model = trainer.accelerator.unwrap_model(trainer.model)
        device = next(model.parameters()).device
        autocast = trainer.accelerator.autocast  # a factory: each context is single-use
        was_training = model.training
        model.eval()
        try:
            # an implicit reward: DPO's, KTO's, ORPO's and SimPO's (no reference); GRPO's is its grader's score
            dpo = self.spec.method not in ("sft", "grpo")
            policy = self._complete(model, autocast, device, started + budget)
            rewards: list[float | None] = [None] * len(policy)
            grades = None
            if self.items is not None:
                texts = [self.tokenizer.decode(c, skip_special_tokens=True) for *_, c in policy]
                grades = [g.reward for g in self._scorer(trainer).grade(texts, [self.items[i] for i, *_ in policy])]
                if self.spec.method == "grpo":  # its samples' reward is its grader's score
                    rewards, grades = grades, None
            if dpo:
                beta = float(trainer.beta)
                mine = [completion_logp(model, ids, c, autocast) for _, _, ids, c in policy]
                rewards = [beta * lp for lp in mine]
            with self._reference(trainer, model, device) as reference:
                if dpo and reference is not None:
                    rewards = [
                        beta * (lp - completion_logp(reference, ids, c, autocast))
                        for lp, (_, _, ids, c) in zip(mine, policy, strict=True)
                    ]
                rows = self._rows(policy, rewards)
                for row, grade in zip(rows, grades or [], strict=False):
                    row["grade"] = grade
                self._emit(step, "policy", rows, started)
                if not self.reference_done and reference is not None:  # SFT: the policy's step-0 samples are it
                    ref_started = time.monotonic()
                    done = self._complete(reference, autocast, device, ref_started + budget)
                    ref_rows = self._rows(done, [None] * len(done))
                    self._emit(step, "reference", ref_rows, ref_started)
                    self.reference_texts = {r["index"]: r["completion"] for r in ref_rows}
            if self.reference_texts is None and step == 0:  # no reference model: step 0's answers are the reference
                self.reference_texts = {r["index"]: r["completion"] for r in rows}
            self.reference_done = True
        finally:
            model.train(was_training)
        metrics = {}
        if grades:
            metrics["eval_sample_grade"] = sum(grades) / len(grades)
        if self.spec.sample_judge is not None:
            metrics["eval_win_rate"] = self._win_rate(rows)
        return metrics

    def _win_rate(self, rows: list[dict]) -> float | None:
        """`sample_judge`'s win rate of these samples against the reference's answers, both orders each."""
        from training import evalmetrics
        from training.grpo import socket_judge

        if self.spec.grading.socket is None or self.reference_texts is None:  # (a resumed run without a reference
            # model has lost the answers of step 0)
            log.warning("sample_judge: no judge (asked through the worker) or no reference answers; no win rate")
            return None
        judge, scores = socket_judge(self.spec.grading.socket), []
        for row in rows:
            theirs = self.reference_texts.get(row["index"])
            if theirs is None:
                continue
            verdicts = []
            for first, second in ((row["completion"], theirs), (theirs, row["completion"])):
                question = evalmetrics.JUDGE_TEMPLATE.format(prompt=row["prompt"], first=first, second=second)
                try:
                    reply = judge(self.spec.sample_judge, [{"role": "user", "content": question}], {})
                except (OSError, ValueError, RuntimeError) as exc:
                    log.warning("sample_judge: no verdict (%s); this evaluation has no win rate", exc)
                    return None
                verdicts.append(evalmetrics.verdict(reply))
            row["judge"] = verdicts
            scores.append(evalmetrics.pair_score(*verdicts))
        return sum(scores) / len(scores) if scores else None

    def _scorer(self, trainer):
        """GRPO's own, or one for `sample_grader`."""
        if self.scorer is None:
            from training.grpo import Scorer

            self.scorer = getattr(trainer, "scorer", None) or Scorer(self.spec, self.spec.sample_grader)
        return self.scorer

    @contextlib.contextmanager
    def _reference(self, trainer, model, device):
        """The reference model for this evaluation (None for SFT and reference-free DPO)."""
        if not self.spec.has_reference:
            yield None
            return
        if getattr(trainer, "ref_model", None) is not None:
            yield trainer.ref_model
            return
        from peft import PeftModel

        if isinstance(model, PeftModel):
            with model.disable_adapter():
                yield model
            return
        if self.loaded_reference is None:
            from transformers import AutoModelForCausalLM

            self.loaded_reference = AutoModelForCausalLM.from_pretrained(self.spec.model, dtype=torch.float32).eval()
        reference = self.loaded_reference.to(device)
        try:
            yield reference
        finally:
            if device.type != "cpu":  # kept in host memory between evaluations, not on the accelerator
                self.loaded_reference = reference.to("cpu")
                gc.collect()
                torch.cuda.empty_cache()
