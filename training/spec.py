"""The training spec: everything one run needs, validated before anything heavy is imported.

Torch-free: the API and the worker import this module to check a job before it is queued.
Field names are the ones the HTTP API and `prefq submit --set key=value` use.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The DPO loss types of the pinned TRL (1.16), `DPOConfig.loss_type`. A test checks this list against TRL.
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)

Method = Literal["dpo", "sft", "orpo", "simpo", "kto", "reward", "grpo", "eval"]
TrainerName = Literal["basic", "fsdp", "deepspeed-tp"]

# What data each method trains on: preference pairs ('dpo' data), demonstrations ('sft'), or single answers marked
# desirable or not ('kto'). Datasets are validated and stored by this data kind (`training.formats`), so one
# uploaded pair file serves every pair method, and KTO also takes pairs (each unrolled into a desirable and an
# undesirable row). The first kind is the method's own.
DATA_KINDS = {
    "dpo": ("dpo",),
    "orpo": ("dpo",),
    "simpo": ("dpo",),
    "sft": ("sft",),
    "kto": ("kto", "dpo"),
    "reward": ("dpo",),
    "grpo": ("rft",),  # prompts, with the fields its grader reads (OpenAI's reinforcement data)
    "eval": ("sft", "dpo", "rft"),  # an evaluation run: prompts with references, pairs, or items for graders
}
# The methods of the DPO trainer (`training.dpo`), on pairs.
PAIR_METHODS = ("dpo", "orpo", "simpo")
# The pair methods that train without a reference model: ORPO (Hong et al. 2024) and SimPO (Meng et al. 2024).
REFERENCE_FREE_METHODS = ("orpo", "simpo")

# DPO paper; TRL's SFTConfig; TRL's ORPOConfig and CPOConfig (SimPO); TRL's KTOConfig; TRL's RewardConfig and GRPOConfig
DEFAULT_LEARNING_RATE = {
    "dpo": 1e-6,
    "sft": 2e-5,
    "orpo": 1e-6,
    "simpo": 1e-6,
    "kto": 1e-6,
    "reward": 1e-4,
    "grpo": 1e-6,
    "eval": 1e-6,  # trains nothing
}
# The fields of method 'grpo' alone, with their defaults (a value other than these on another method is refused).
GRPO_FIELDS = {
    "grader": None,
    "num_generations": 4,
    "max_completion_length": 64,
    "temperature": 1.0,
    "kl_coef": 0.04,
    "generation_engine": "transformers",
}


class SpecError(ValueError):
    """A spec that cannot run; the message names the field and the fix."""


class LoraSpec(BaseModel):
    """LoRA adapters (PEFT). With LoRA, DPO needs no separate reference model: the adapter is switched off."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1, description="Rank of the adapter matrices.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' for every linear layer but the LM head."
    )
    quantize: Literal["4bit"] | None = Field(
        None,
        description="QLoRA: '4bit' loads the frozen base in NF4 with double quantisation and bf16 compute "
        "(bitsandbytes); the adapters train in full precision.",
    )


class RiskBetaSpec(BaseModel):
    """Parameters of `beta_schedule: "risk"` (see `training.dpo.RiskBetaSchedule`)."""

    model_config = ConfigDict(extra="forbid")

    warmup_steps: int = Field(10, ge=1, description="Steps that only collect margins to estimate the quantile tau.")
    quantile: float = Field(0.8, gt=0, lt=1, description="Quantile of the per-pair margin that tau estimates.")
    target: float = Field(0.2, gt=0, lt=1, description="Target share of pairs whose margin exceeds tau.")
    alpha: float = Field(0.05, gt=0, le=1, description="Largest log-change of beta in one step.")
    gamma: float = Field(5.0, gt=0, description="Slope of tanh on the share error u.")
    tau_ema: float = Field(0.9, ge=0, lt=1, description="EMA decay that tracks tau after the warm-up.")


class BatchBetaSpec(BaseModel):
    """Parameters of `beta_schedule: "batch"`, beta-DPO (Wu et al. 2024)."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.6, ge=0, description="Sensitivity of beta to the batch's mean margin (paper's alpha).")
    momentum: float = Field(0.9, ge=0, lt=1, description="EMA momentum of the baseline margin M0.")
    min_beta: float = Field(1e-3, gt=0, description="Floor that keeps beta positive.")


def _parse_grader(grader: dict, field: str) -> None:
    """A grader field checked as OpenAI's graders are (`training.graders`); the error names the field within it."""
    from training import graders

    try:
        graders.parse(grader)
    except graders.GraderError as exc:
        raise ValueError(f"{field}{exc.param.removeprefix('grader')}: {exc}") from None


class GradingSpec(BaseModel):
    """How a GRPO run's grader runs, set by the worker from its settings (a job cannot set it): the python grader's
    limits, and the local socket on which the worker runs python graders and asks judges (`worker.grading`)."""

    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(10.0, gt=0, description="Wall and CPU seconds of one python grader call.")
    memory_mb: int = Field(512, ge=16, description="Address space of one python grader call, MiB.")
    workers: int = Field(4, ge=1, le=64, description="Samples graded at once.")
    socket: str | None = Field(
        None, description="The worker's grading socket; unset: python graders run here, model graders score 0."
    )


EVAL_METRICS = ("exact_match", "f1", "rouge_l", "bleu", "perplexity", "reward_accuracy")


class PairwiseSpec(BaseModel):
    """A pairwise judge: which of two answers to a prompt is better (`training.evalmetrics`)."""

    model_config = ConfigDict(extra="forbid")

    judge: str = Field(
        min_length=1, description="The judge model: one of the operator's judge models or a served model of yours."
    )
    template: str | None = Field(
        None,
        description="The judge's question, with {prompt}, {first} and {second}; its reply names A, B or tie. "
        "Default: `training.evalmetrics.JUDGE_TEMPLATE`.",
    )
    max_tokens: int = Field(8, ge=1, le=512, description="Tokens of the judge's reply.")

    @field_validator("template")
    @classmethod
    def _fields(cls, value: str | None) -> str | None:
        if value is not None:
            missing = [f for f in ("{prompt}", "{first}", "{second}") if f not in value]
            if missing:
                raise ValueError(f"the template lacks {', '.join(missing)}")
        return value


class EvaluationSpec(BaseModel):
    """What an evaluation run (method 'eval') computes: the model (and a baseline) on every row of its data, up to
    `max_samples` rows within `max_seconds` (`training.evaluate`)."""

    model_config = ConfigDict(extra="forbid")

    eval_id: str | None = Field(None, description="The evaluation this run belongs to (`/evals`).")
    baseline: str | None = Field(
        None,
        description="A second model, scored the same way and judged against the model: a base, a job's model, a "
        "checkpoint, a registered version.",
    )
    metrics: list[Literal[EVAL_METRICS]] = Field(  # type: ignore[valid-type]
        default_factory=list,
        description="Against the rows' references (an SFT completion, a pair's chosen answer): exact_match, f1, "
        "rouge_l, bleu, perplexity; on pairs: reward_accuracy (and margins) against the baseline as reference.",
    )
    graders: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Graders by name (as OpenAI's), each scoring every answer against its row."
    )
    pass_thresholds: dict[str, float] = Field(
        default_factory=dict, description="A grader's score at which a row passes it (default 0.5)."
    )
    pairwise: PairwiseSpec | None = Field(None, description="A judge of the model's answers against the baseline's.")
    max_samples: int = Field(200, ge=1, le=10000, description="Rows evaluated at most (from the start).")
    max_seconds: float = Field(
        1800.0, gt=0, le=86400, description="Time budget of generation; rows left when it runs out are skipped."
    )
    max_tokens: int = Field(48, ge=1, le=4096, description="New tokens of each answer.")
    temperature: float = Field(0.0, ge=0, le=2, description="0: greedy answers; above 0: sampled with the seed.")
    bootstrap: int = Field(1000, ge=100, le=100000, description="Resamples of the win rate's 95% interval.")

    @model_validator(mode="after")
    def _check(self) -> EvaluationSpec:
        if not (self.metrics or self.graders or self.pairwise):
            raise ValueError("evaluation: give metrics, graders or a pairwise judge")
        for name, grader in self.graders.items():
            _parse_grader(grader, f"evaluation.graders.{name}")
        for name in self.pass_thresholds:
            if name not in self.graders:
                raise ValueError(f"evaluation.pass_thresholds.{name}: no grader of that name")
        if self.pairwise is not None and self.baseline is None:
            raise ValueError("evaluation.pairwise: judges the model against a baseline; set evaluation.baseline")
        if "reward_accuracy" in self.metrics and self.baseline is None:
            raise ValueError("evaluation.metrics: reward_accuracy compares with a reference; set evaluation.baseline")
        return self


class ClusterSpec(BaseModel):
    """Where a run of several nodes places its ranks, set by the worker from its settings (a job cannot set it): the
    Ray cluster's address, the placement group's name (the job's and the attempt's) and how long placement may take
    (`training.cluster`)."""

    model_config = ConfigDict(extra="forbid")

    address: str = Field(min_length=1, description="The Ray cluster's address (PREFQ_RAY_ADDRESS).")
    name: str = Field(min_length=1, description="The placement group's name: prefq-<job>-<attempt>.")
    placement_timeout_s: float = Field(300.0, gt=0, description="Seconds to wait for every node to be placed.")


class TrainingSpec(BaseModel):
    """One training run. Paths are local to the process that runs it."""

    model_config = ConfigDict(extra="forbid")

    # what
    method: Method = Field(
        description="'dpo', 'orpo' or 'simpo' (preference pairs; ORPO and SimPO need no reference model), 'kto' "
        "(answers labelled desirable or not, or pairs), 'reward' (a model that scores answers, trained on pairs), "
        "'sft' (demonstrations) or 'grpo' (reinforcement: answers sampled for prompts and scored by a grader)."
    )
    model: str = Field(min_length=1, description="Base model: a Hugging Face format folder.")
    train_file: str = Field(min_length=1, description="Training data, JSONL (see `python -m training validate`).")
    eval_file: str | None = Field(None, description="Held-out data, JSONL. Without it, `eval_fraction` is split off.")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of train_file held out when eval_file is unset.")
    trainer: TrainerName = Field("basic", description="'basic' (one device), 'fsdp' or 'deepspeed-tp'.")
    gpus: int = Field(
        1, ge=1, le=512, description="Devices of the run, all nodes together; processes for fsdp and deepspeed-tp."
    )
    nodes: int = Field(
        1, ge=1, le=64, description="Nodes the run spans (`gpus` / `nodes` devices on each), placed by Ray."
    )
    cluster: ClusterSpec | None = Field(None, description="Where a run of several nodes runs (set by the worker).")

    # optimisation
    learning_rate: float | None = Field(None, gt=0, description="Peak learning rate; default 1e-6 DPO, 2e-5 SFT.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps of the learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides `epochs`.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data when `max_steps` is unset.")
    batch_size: int = Field(8, ge=1, description="Examples (pairs for DPO) per device per micro-step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    max_length: int = Field(1024, ge=8, description="Longest prompt+completion in tokens; longer ones are cut.")
    max_prompt_length: int | None = Field(
        None, ge=1, description="DPO: longest prompt in tokens, cut from the left; None keeps it whole."
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="bf16 autocast with fp32 weights, or fp32; auto: bf16 where the device computes it natively (a "
        "CUDA device, a CPU with AVX512-BF16 or AMX), else fp32 (a CPU without them runs bf16 matmuls hundreds of "
        "times slower). The `started` event says which.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations: less memory, ~20% slower.")
    use_liger_kernel: bool = Field(
        False, description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU): less memory; CUDA workers only."
    )
    seed: int = Field(42, description="Seed of initialisation, shuffling and dropout.")

    # bookkeeping
    save_steps: int = Field(100, ge=1, description="Steps between resumable checkpoints.")
    eval_steps: int | None = Field(None, ge=1, description="Steps between evaluations; always at start and end.")
    logging_steps: int = Field(1, ge=1, description="Steps between progress events.")
    best_metric: str | None = Field(
        None,
        description="An evaluation metric (a key of the `eval` events: eval_loss, eval_rewards/accuracies, ...) that "
        "picks the best checkpoint: each evaluation that improves it saves a checkpoint there, and the `best` events "
        "and `done` name it. Default: eval_loss when early_stopping_patience is set.",
    )
    best_mode: Literal["min", "max"] | None = Field(
        None, description="Whether lower or higher best_metric is better; default: min for a loss, max otherwise."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations in a row without best_metric improving."
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0, description="The least change of best_metric that counts as an improvement."
    )
    sample_prompts: int = Field(
        4,
        ge=0,
        le=64,
        description="Held-out prompts completed by the policy at each evaluation (and once by the "
        "reference), kept as the job's samples; 0 turns samples off. Single-process runs only (`basic`).",
    )
    sample_max_tokens: int = Field(48, ge=1, le=1024, description="New tokens per sample completion.")
    sample_temperature: float = Field(
        0.0, ge=0, le=2, description="0: greedy samples; above 0: sampled at this temperature with the run's seed."
    )
    sample_max_seconds: float = Field(
        60.0, gt=0, le=3600, description="Time budget of one evaluation's samples; prompts left over are skipped."
    )
    sample_grader: dict[str, Any] | None = Field(
        None,
        description="A grader (as `grader`) that scores each sample at every evaluation against its held-out row "
        "({{item.chosen}}, {{item.completion}}, ...); the mean is the evaluation's `eval_sample_grade`, which "
        "best_metric and early stopping may use. GRPO grades its samples with its own `grader`.",
    )
    sample_judge: str | None = Field(
        None,
        min_length=1,
        description="A judge model (one of the operator's judge models or a served model of yours) that compares "
        "each evaluation's samples with the reference's answers to the same prompts (the model before training), "
        "in both orders: the win rate is the evaluation's `eval_win_rate`.",
    )

    # DPO, ORPO, SimPO
    beta: float = Field(
        0.1,
        gt=0,
        description="DPO: strength of the pull towards the reference model; SimPO: scale of the length-normalised "
        "reward; ORPO: weight lambda of the odds-ratio term beside the chosen answers' NLL.",
    )
    simpo_gamma: float = Field(
        0.5, ge=0, description="SimPO: target reward margin gamma between chosen and rejected (TRL's default)."
    )
    center_rewards_coefficient: float | None = Field(
        None,
        ge=0,
        description="reward: weight of the penalty on the squared sum of the pair's scores, which keeps them "
        "centred on 0 (Eisenstein et al. 2023 use 0.01); unset: none.",
    )
    desirable_weight: float = Field(
        1.0, gt=0, description="KTO: weight of the desirable rows' loss (raise it when they are the fewer)."
    )
    undesirable_weight: float = Field(
        1.0, gt=0, description="KTO: weight of the undesirable rows' loss (raise it when they are the fewer)."
    )
    loss_type: str | list[str] = Field("sigmoid", description="One DPO loss type or several (see DPO_LOSS_TYPES).")
    loss_weights: list[float] | None = Field(None, description="Weights of several loss types; default all 1.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Robust DPO flip rate / EXO epsilon.")
    reference_free: bool = Field(False, description="Reference log-probs taken as 0 (no reference model).")
    precompute_ref_log_probs: bool = Field(
        False, description="One reference pass over the data before training instead of one per step."
    )
    ref_cache_dir: str | None = Field(
        None,
        description="DPO: local folder of cached reference log-probs, keyed by reference model, token ids, "
        "max_length, truncation and precision (`training.refcache`): a hit skips the reference pass, a miss writes "
        "it there. Setting it turns precompute_ref_log_probs on; ignored without a reference (sft, reference_free).",
    )
    padding_free: bool = Field(
        True,
        description="DPO, ORPO, SimPO and SFT: run each batch's sequences packed into one row without padding (same "
        "numbers as padded batches, faster on data of mixed lengths).",
    )
    beta_schedule: Literal["constant", "risk", "batch"] = Field("constant", description="How beta moves.")
    risk: RiskBetaSpec = Field(default_factory=RiskBetaSpec, description="Parameters of beta_schedule 'risk'.")
    batch_beta: BatchBetaSpec = Field(default_factory=BatchBetaSpec, description="Parameters of 'batch'.")

    # GRPO (OpenAI's reinforcement method)
    grader: dict[str, Any] | None = Field(
        None,
        description="GRPO: the grader that scores each sampled answer, as OpenAI defines graders (string_check, "
        "text_similarity, python, score_model, label_model, multi; `training.graders`).",
    )
    num_generations: int = Field(
        4, ge=2, le=64, description="GRPO: answers sampled per prompt; their scores are compared within the group."
    )
    max_completion_length: int = Field(64, ge=1, le=8192, description="GRPO: longest sampled answer, in tokens.")
    temperature: float = Field(1.0, gt=0, le=2, description="GRPO: sampling temperature of the answers.")
    kl_coef: float = Field(0.04, ge=0, description="GRPO: weight of the KL penalty to the starting model (0: none).")
    generation_engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="GRPO: who samples the answers: transformers, or vLLM beside the trainer (CUDA)."
    )
    grading: GradingSpec = Field(
        default_factory=GradingSpec, description="GRPO: the grader's limits and judge socket (set by the worker)."
    )

    # LoRA
    lora: LoraSpec | None = Field(None, description="LoRA adapters; off when unset.")

    # an evaluation run
    evaluation: EvaluationSpec | None = Field(
        None, description="Method 'eval': what the run measures of `model` (and a baseline) on `train_file`."
    )

    @field_validator("loss_type")
    @classmethod
    def _known_loss_types(cls, value: str | list[str]) -> str | list[str]:
        names = [value] if isinstance(value, str) else value
        if not names:
            raise ValueError("give at least one loss type")
        unknown = [n for n in names if n not in DPO_LOSS_TYPES]
        if unknown:
            raise ValueError(
                f"unknown loss type {', '.join(map(repr, unknown))}; choose from {', '.join(DPO_LOSS_TYPES)}"
            )
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainingSpec:
        loss_types = self.loss_types
        if len(set(loss_types)) != len(loss_types):
            raise ValueError(f"loss_type: {loss_types} repeats a type; list each loss type once")
        if self.loss_weights is not None and len(self.loss_weights) != len(loss_types):
            raise ValueError(
                f"loss_weights: {len(self.loss_weights)} weights for {len(loss_types)} loss types; give one per type"
            )
        if "exo_pair" in loss_types and self.label_smoothing == 0:
            raise ValueError("label_smoothing: the 'exo_pair' loss needs label_smoothing > 0 (the EXO paper uses 1e-3)")
        if self.method != "dpo":
            dpo_only = {
                "beta_schedule": self.beta_schedule != "constant",
                "reference_free": self.reference_free,
                "precompute_ref_log_probs": self.precompute_ref_log_probs,
                "loss_type": self.loss_types != ["sigmoid"],
                "loss_weights": self.loss_weights is not None,
                "label_smoothing": self.label_smoothing != 0,
            }
            for name, used in dpo_only.items():
                if used:
                    raise ValueError(f"{name}: only applies to method 'dpo'; remove it for '{self.method}'")
        if self.method != "simpo" and self.simpo_gamma != 0.5:
            raise ValueError(f"simpo_gamma: only applies to method 'simpo'; remove it for '{self.method}'")
        if self.method != "reward" and self.center_rewards_coefficient is not None:
            raise ValueError(
                f"center_rewards_coefficient: only applies to method 'reward'; remove it for '{self.method}'"
            )
        for name in ("desirable_weight", "undesirable_weight"):
            if self.method != "kto" and getattr(self, name) != 1.0:
                raise ValueError(f"{name}: only applies to method 'kto'; remove it for '{self.method}'")
        if self.sample_grader is not None:
            if self.method in ("grpo", "reward"):
                why = "GRPO grades its samples with `grader`" if self.method == "grpo" else "a reward model writes none"
                raise ValueError(f"sample_grader: {why}; remove it")
            if self.sample_prompts == 0:
                raise ValueError("sample_grader: grades the samples; set sample_prompts above 0")
            _parse_grader(self.sample_grader, "sample_grader")
        if (self.method == "eval") != (self.evaluation is not None):
            raise ValueError(
                "evaluation: method 'eval' needs one" if self.method == "eval" else "evaluation: only for method 'eval'"
            )
        if self.method == "eval" and self.trainer != "basic":
            raise ValueError("trainer: an evaluation runs on the 'basic' trainer (one device)")
        if self.sample_judge is not None:
            if self.method in ("reward", "eval"):
                raise ValueError(f"sample_judge: method '{self.method}' writes no samples; remove it")
            if self.sample_prompts == 0:
                raise ValueError("sample_judge: judges the samples; set sample_prompts above 0")
        if self.method != "grpo":
            for name, default in GRPO_FIELDS.items():
                if getattr(self, name) != default:
                    raise ValueError(f"{name}: only applies to method 'grpo'; remove it for '{self.method}'")
        else:
            self._check_grpo()
        if self.method in ("kto", "reward") and self.trainer != "basic":
            raise ValueError(f"trainer: method '{self.method}' runs on the 'basic' trainer (one device) for now")
        if self.method == "reward" and self.max_prompt_length is not None:
            raise ValueError("max_prompt_length: a reward model reads prompt and answer whole; use max_length")
        if self.method == "kto" and self.batch_size < 2:
            raise ValueError(
                "batch_size: KTO estimates its KL term from the other rows of a batch; give 2 or more (TRL)"
            )
        if self.reference_free and self.precompute_ref_log_probs:
            raise ValueError("precompute_ref_log_probs: has no use with reference_free; set one of them")
        if self.data_kinds != ("dpo",) and self.max_prompt_length is not None:
            raise ValueError(
                "max_prompt_length: only applies to pair methods (dpo, orpo, simpo); use max_length for 'sft'"
            )
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length: {self.max_prompt_length} leaves no room for the completion within "
                f"max_length {self.max_length}; make it smaller than max_length"
            )
        if self.nodes > 1:
            if self.trainer == "basic":
                raise ValueError("nodes: a run across nodes shards the model; use 'fsdp' or 'deepspeed-tp'")
            if self.gpus % self.nodes:
                raise ValueError(f"gpus: {self.gpus} devices do not split evenly over {self.nodes} nodes")
            from training.graders import run_by_worker

            if found := run_by_worker(self.graders):
                raise ValueError(
                    f"{found[0]}: python graders and judges are run by the worker over a local socket, which ranks "
                    f"on other nodes cannot reach; a job of {self.nodes} nodes grades with string_check and "
                    "text_similarity graders, or runs on one node"
                )
        if self.trainer == "basic" and self.gpus != 1:
            raise ValueError(f"gpus: the 'basic' trainer runs on one device, not {self.gpus}; use 'fsdp' or 1")
        if self.trainer != "basic" and self.gpus < 2:
            raise ValueError(
                f"gpus: '{self.trainer}' splits the model over several devices; give 2 or more, or use "
                "the 'basic' trainer for one"
            )
        if self.trainer == "deepspeed-tp" and self.lora is not None:
            raise ValueError(
                "lora: not supported with 'deepspeed-tp' (DeepSpeed's optimizer cannot map the "
                "adapters); use 'fsdp' or 'basic'"
            )
        if self.early_stopping_patience is not None or self.best_metric is not None:
            name = "early_stopping_patience" if self.early_stopping_patience is not None else "best_metric"
            if not self.eval_steps:
                raise ValueError(f"{name}: needs evaluations during training; set eval_steps")
            if self.eval_file is None and self.eval_fraction == 0:
                raise ValueError(f"{name}: needs held-out data; set eval_file or eval_fraction above 0")
        if self.early_stopping_min_delta and self.early_stopping_patience is None:
            raise ValueError("early_stopping_min_delta: only applies with early_stopping_patience; set both or neither")
        if self.best_mode is not None and self.best_metric is None:
            raise ValueError("best_mode: only applies with best_metric; set both or neither")
        if self.lora is not None and self.lora.quantize is not None and self.trainer != "basic":
            raise ValueError(
                f"lora.quantize: QLoRA runs on the 'basic' trainer (one device); '{self.trainer}' would shard "
                "bitsandbytes' packed 4-bit weights, which FSDP2 does not handle; use 'basic' or drop quantize"
            )
        return self

    def _check_grpo(self) -> None:
        if self.grader is None:
            raise ValueError("grader: method 'grpo' needs a grader that scores the sampled answers")
        _parse_grader(self.grader, "grader")
        if self.trainer == "deepspeed-tp":
            raise ValueError("trainer: method 'grpo' runs on 'basic' or 'fsdp'")
        if self.max_prompt_length is not None:
            raise ValueError("max_prompt_length: GRPO cuts prompts to max_length - max_completion_length")
        if self.max_completion_length >= self.max_length:
            raise ValueError(
                f"max_completion_length: {self.max_completion_length} leaves no room for the prompt within "
                f"max_length {self.max_length}; make it smaller than max_length"
            )
        processes = self.gpus if self.trainer != "basic" else 1
        batch = self.batch_size * self.gradient_accumulation_steps * processes
        if batch % self.num_generations or (self.batch_size * processes) % self.num_generations:
            raise ValueError(
                f"batch_size: GRPO's batches hold whole groups of answers to one prompt, so batch_size x devices "
                f"({self.batch_size} x {processes}) must be a multiple of num_generations ({self.num_generations})"
            )

    @property
    def selection(self) -> tuple[str, str] | None:
        """The metric that picks the best checkpoint and whether lower ("min") or higher ("max") is better."""
        metric = self.best_metric or ("eval_loss" if self.early_stopping_patience is not None else None)
        if metric is None:
            return None
        metric = metric if metric.startswith("eval_") else f"eval_{metric}"
        return metric, self.best_mode or ("min" if "loss" in metric else "max")

    @property
    def graders(self) -> dict[str, dict]:
        """The spec's graders by field, whose python graders and judges the worker runs for the run: GRPO's `grader`,
        `sample_grader`, an evaluation's graders, and each judge (`sample_judge`, an evaluation's pairwise judge) as
        the label_model grader that asks it."""
        found = {root: g for root in ("grader", "sample_grader") if (g := getattr(self, root)) is not None}
        if self.sample_judge is not None:
            found["sample_judge"] = {"type": "label_model", "model": self.sample_judge}
        if (ev := self.evaluation) is not None:
            found |= {f"evaluation.graders.{name}": g for name, g in ev.graders.items()}
            if ev.pairwise is not None:
                found["evaluation.pairwise"] = {"type": "label_model", "model": ev.pairwise.judge}
        return found

    @property
    def data_kinds(self) -> tuple[str, ...]:
        """What the method's data may hold: 'dpo' (pairs), 'sft' (demonstrations), 'kto' (labelled answers)."""
        return DATA_KINDS[self.method]

    @property
    def pairs(self) -> bool:
        """Whether the method trains on pairs, with the DPO trainer (`training.dpo`): dpo, orpo, simpo."""
        return self.method in PAIR_METHODS

    @property
    def has_reference(self) -> bool:
        """Whether the method compares the policy with a frozen reference model: KTO, and DPO without
        `reference_free`."""
        return (
            self.method == "kto"
            or (self.method == "dpo" and not self.reference_free)
            or (self.method == "grpo" and self.kl_coef > 0)
        )

    @property
    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def precomputes_reference(self) -> bool:
        """Whether the reference log-probs are computed once before training: asked for, or a cache is given."""
        return (
            self.method == "dpo"
            and self.has_reference
            and (self.precompute_ref_log_probs or self.ref_cache_dir is not None)
        )

    @property
    def resolved_learning_rate(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATE[self.method]

    def resolved(self) -> TrainingSpec:
        """The spec with method-dependent defaults filled in, as written next to the run's outputs."""
        return self.model_copy(update={"learning_rate": self.resolved_learning_rate})


def describe_errors(exc: ValidationError) -> list[dict[str, str]]:
    """Pydantic errors as `{"field", "reason"}` pairs, with the field path dotted."""
    out = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "spec"
        reason = err["msg"].removeprefix("Value error, ")
        # A model-level check names its field at the start of the message ("loss_weights: ...")
        if ": " in reason and (field == "spec" or reason.split(": ", 1)[0].startswith(field)):
            field, reason = reason.split(": ", 1)
        if err["type"] == "extra_forbidden":
            reason = "unknown field; see `python -m training schema` for the accepted ones"
        out.append({"field": field, "reason": reason})
    return out


def native_bf16(cuda: bool, cpuinfo: str | None = None) -> bool:
    """Whether this machine's training device computes bf16 natively: CUDA devices do (those without bf16 fail
    loudly in torch); a CPU does with AVX512-BF16 or AMX (from /proc/cpuinfo's flags, or `cpuinfo`). Torch-free."""
    if cuda:
        return True
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


def cuda_here() -> bool:
    """Whether a run here trains on CUDA devices, torch-free (the launcher of the ranks imports no torch): an NVIDIA
    driver is loaded and CUDA_VISIBLE_DEVICES hides not every device (a CPU worker's runs get it empty)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES") != "" and Path("/proc/driver/nvidia/version").exists()


def resolve_precision(spec: TrainingSpec) -> TrainingSpec:
    """`spec` with `precision: auto` made bf16 or fp32 for this machine (`native_bf16`)."""
    if spec.precision != "auto":
        return spec
    return spec.model_copy(update={"precision": "bf16" if native_bf16(cuda_here()) else "fp32"})


def parse_spec(data: dict) -> TrainingSpec:
    """Validate a spec; a `SpecError` names each bad field and the fix."""
    try:
        return TrainingSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError("; ".join(f"{e['field']}: {e['reason']}" for e in describe_errors(exc))) from None


def load_spec(path: str | Path) -> TrainingSpec:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"spec file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"spec file {path}: expected a JSON object, got {type(data).__name__}")
    return parse_spec(data)


def spec_json_schema() -> dict:
    return TrainingSpec.model_json_schema()


# The run's exit codes, part of its contract with whoever launched it (the worker).
EXIT_OK = 0  # `done` was printed; final/ is complete
EXIT_INFRA_ERROR = 1  # an unexpected failure; an `error` event says what, with user_error false
EXIT_USER_ERROR = 2  # bad spec, bad data, a model that cannot load or does not fit; `error` says which
EXIT_STOPPED = 75  # stopped by SIGTERM after saving a checkpoint (EX_TEMPFAIL: resume it)

# Written last into every checkpoint folder: a checkpoint without it is incomplete and never used.
MANIFEST_NAME = "prefq-manifest.json"
# A LoRA job's adapter alone, beside its merged model in the final folder (served on the base, exported as it is)
ADAPTER = "adapter"
# An `fsdp` or `deepspeed-tp` checkpoint's shards gathered into a folder that `from_pretrained` loads
CONSOLIDATED = "hf"
