"""The requests of OpenAI's fine-tuning face, field for field the SDK's `JobCreateParams` (with `method`, the
deprecated `hyperparameters`, `integrations`), and prefq's extension field `prefq`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from api.schemas import Text


def _auto_or(kind: type, positive: bool = True):
    def check(value):
        if value is None or value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise ValueError(f"expected {'a number' if kind is float else 'an integer'} or 'auto', got {value!r}")
        if positive and value <= 0:
            raise ValueError(f"must be above 0, got {value!r}")
        return value

    return Annotated[Any, AfterValidator(check)]


class SupervisedHyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: _auto_or(int) = None
    batch_size: _auto_or(int) = None
    learning_rate_multiplier: _auto_or(float) = None


class DpoHyperparameters(SupervisedHyperparameters):
    beta: _auto_or(float) = None


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: SupervisedHyperparameters | None = None


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters | None = None


class ReinforcementHyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: _auto_or(int) = None
    batch_size: _auto_or(int) = Field(None, description="Prompts per batch; each gets compute_multiplier x 4 answers.")
    learning_rate_multiplier: _auto_or(float) = None
    compute_multiplier: _auto_or(float) = Field(
        None, description="Answers sampled per prompt, as a multiple of 4 (at least 2 answers)."
    )
    eval_interval: _auto_or(int) = Field(None, description="Steps between evaluations on the validation file.")
    eval_samples: _auto_or(int) = Field(None, description="Held-out prompts sampled and graded at each evaluation.")
    reasoning_effort: Literal["default", "low", "medium", "high"] | None = Field(
        None, description="Only 'default': the models trained here have no reasoning-effort setting."
    )


class ReinforcementMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict[str, Any] = Field(description="The grader that scores each sampled answer (`/graders/validate`).")
    hyperparameters: ReinforcementHyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "reinforcement", "orpo", "simpo", "kto"] = Field(
        description="OpenAI's 'supervised' and 'dpo', and prefq's extensions: 'orpo' and 'simpo', reference-free "
        "preference methods on the same pair files as 'dpo', and 'kto', on answers labelled desirable or not "
        "(`prompt`, `completion`, `label`) or on pair files; all with DPO's hyperparameters (`beta` is ORPO's lambda). "
        "'reinforcement' is GRPO, scored by `reinforcement.grader`."
    )
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: ReinforcementMethod | None = None
    orpo: DpoMethod | None = None
    simpo: DpoMethod | None = None
    kto: DpoMethod | None = None


class PrefqExtension(BaseModel):
    """What OpenAI's API has no field for: the trainer, the devices, and any training spec field."""

    model_config = ConfigDict(extra="forbid")
    trainer: Literal["basic", "fsdp", "deepspeed-tp"] = "basic"
    gpus: int = Field(1, ge=0, le=64)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)


class WandbOptions(BaseModel):
    """The W&B run of the job (OpenAI's `integrations[].wandb`): the worker's offline run takes these."""

    model_config = ConfigDict(extra="forbid")
    project: Text = Field(min_length=1, max_length=128)
    name: Text | None = Field(None, max_length=128)
    entity: Text | None = Field(None, max_length=128)
    tags: list[Annotated[Text, Field(min_length=1, max_length=64)]] | None = Field(None, max_length=50)


class Integration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["wandb"]
    wandb: WandbOptions


class FineTuningJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Text = Field(min_length=1, max_length=2048, description="A hub id, a fine-tuned model name, a job id, ...")
    training_file: Text = Field(min_length=1, max_length=200)
    validation_file: Text | None = Field(None, min_length=1, max_length=200)
    method: Method | None = None
    hyperparameters: SupervisedHyperparameters | None = Field(None, description="Deprecated: `method`.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9._-]*$")
    metadata: dict[Annotated[Text, Field(max_length=64)], Annotated[Text, Field(max_length=512)]] | None = Field(
        None, max_length=16
    )
    integrations: list[Integration] | None = Field(
        None, max_length=5, description="W&B runs, where the server reports to W&B (`PREFQ_WANDB_MODE`)."
    )
    prefq: PrefqExtension | None = Field(None, description="prefq's own fields (the SDK's `extra_body`).")
