"""Request and response models of the HTTP API (jobs are `jobs.models.JobPublic`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Query
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, HttpUrl, ValidationInfo, field_validator

from api.text import checked
from jobs import modelref
from jobs.models import JobPublic, ModelVersion
from jobs.registry import ALIAS
from training.spec import Method

Text = Annotated[str, AfterValidator(checked)]  # no NUL, nothing UTF-8 cannot encode (`api.text`)
Timestamp = Annotated[float, Query(ge=0, le=1e11, description="Unix seconds")]


class JobCreate(BaseModel):
    """A training job. `hyperparameters` takes the training spec's field names (`python -m training schema`)."""

    model_config = ConfigDict(extra="forbid")

    model: Text = Field(
        min_length=1,
        max_length=2048,
        description="Base model: a folder the workers can read, a storage URI, a hub id (`org/name` or "
        "`org/name@revision`), or a succeeded job's id or fine-tuned model name.",
    )
    dataset: Text = Field(
        min_length=1, max_length=2048, description="Training data: a dataset id from POST /datasets, or a URI."
    )
    eval_dataset: Text | None = Field(
        None, min_length=1, max_length=2048, description="Held-out data; without it a share of `dataset` is held out."
    )
    method: Method = Field(
        description="'dpo', 'orpo', 'simpo' or 'reward' (a dataset of preference pairs), 'kto' (answers labelled "
        "desirable or not, or pairs) or 'sft' (demonstrations)."
    )
    trainer: Literal["basic", "fsdp", "deepspeed-tp"] = "basic"
    gpus: int = Field(1, ge=0, le=64, description="Devices of the job (of each node); 0 runs it on a CPU worker.")
    nodes: int = Field(
        1, ge=1, le=64, description="Nodes the job spans, `gpus` devices on each, placed on the operator's Ray cluster."
    )
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    callback_url: HttpUrl | None = Field(None, description="POSTed the job, HMAC-signed, when it finishes.")
    metadata: dict[Annotated[Text, Field(max_length=64)], Annotated[Text, Field(max_length=512)]] = Field(
        default_factory=dict, max_length=16, description="Up to 16 key/value strings, kept with the job."
    )


class JobsPublic(BaseModel):
    object: str = "list"
    data: list[JobPublic]
    has_more: bool
    next_cursor: str | None


class DatasetPublic(BaseModel):
    id: str
    object: str = "dataset"
    tenant: str
    created_at: float
    filename: str
    bytes: int
    sha256: str
    rows: int
    format: str
    method: str
    warnings: list[dict]
    warning_count: int
    tool_examples: int = Field(0, description="Conversations with tools or tool calls.")
    untrained_messages: int = Field(0, description="Assistant messages of weight 0: context, not trained.")

    @classmethod
    def of(cls, dataset) -> DatasetPublic:
        return cls(**dataset.model_dump())


class DatasetsPublic(BaseModel):
    object: str = "list"
    data: list[DatasetPublic]
    has_more: bool
    next_cursor: str | None


class EventPublic(BaseModel):
    seq: int
    attempt: int
    created_at: float
    type: str
    data: dict


class EventsPublic(BaseModel):
    object: str = "list"
    data: list[EventPublic]
    last_seq: int


class FilePublic(BaseModel):
    name: str
    url: str


class ArtifactsPublic(BaseModel):
    object: str = "list"
    data: list[FilePublic]


class SamplePublic(BaseModel):
    index: int
    prompt: str
    completion: str
    tokens: int
    reward: float | None = None


class SamplesAtStep(BaseModel):
    step: int
    attempt: int
    model: str  # policy | reference
    seconds: float | None = None
    samples: list[SamplePublic]


class SamplesPublic(BaseModel):
    object: str = "list"
    data: list[SamplesAtStep]


class CheckpointPublic(BaseModel):
    step: int
    uri: str
    files: list[FilePublic]


class ModelFilesPublic(BaseModel):
    uri: str
    files: list[FilePublic]


class MergePublic(BaseModel):
    """The base to merge an exported adapter into: a hub id (and revision), or its files."""

    hub: str | None = None
    revision: str | None = None
    files: list[FilePublic] | None = None


class ExportPublic(BaseModel):
    object: str = "model.export"
    job_id: str
    format: str  # merged | adapter | hf
    checkpoint: int | None  # the checkpoint's step; None: the final model
    fine_tuned_model: str
    base_model: str
    lora: bool
    files: list[FilePublic]  # the exported folder's files (with `merge`: the adapter's, to merge into the base)
    merge: MergePublic | None  # set when the client merges (a LoRA checkpoint exported as merged)
    model_card: str  # README.md of the exported folder


class CheckpointsPublic(BaseModel):
    object: str = "list"
    data: list[CheckpointPublic]


class WorkerPublic(BaseModel):
    name: str
    hostname: str
    queues: list[str]
    devices: int
    inventory: dict
    current_job_id: str | None
    started_at: float
    last_heartbeat: float
    live: bool


class WorkersPublic(BaseModel):
    object: str = "list"
    data: list[WorkerPublic]


# -- the model registry (`jobs.registry`) ---------------------------------------------------------------------


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(
        pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="A succeeded job of this tenant's: its final model"
    )
    aliases: list[Annotated[str, Field(pattern=f"^{ALIAS.pattern}$")]] = Field(
        [], max_length=16, description="Aliases to point at the new version, e.g. ['staging']"
    )
    description: Text | None = Field(None, max_length=2000)
    checkpoint: int | None = Field(
        None, ge=1, description="The job's complete checkpoint at this step instead of its final model"
    )
    best: bool = Field(
        False,
        description="The model of the job's best evaluation (its `best_metric`): a checkpoint, or the final model",
    )
    require: dict[Annotated[str, Field(max_length=128)], float] = Field(
        {},
        max_length=16,
        description="Minimums of metrics of the model's newest evaluation run (`/evals`), e.g. "
        "{'eval_win_rate': 0.55}; a 409 names the one below its minimum",
    )

    @field_validator("best")
    @classmethod
    def _one_source(cls, best: bool, info: ValidationInfo) -> bool:
        if best and info.data.get("checkpoint") is not None:
            raise ValueError("give a checkpoint or best, not both")
        return best


class AliasRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=999_999_999)


class ModelVersionPublic(BaseModel):
    object: str = "model.version"
    name: str
    version: int
    model: str  # what a job's `model` or a chat request names this version by: models:/NAME/VERSION
    fine_tuned_model: str
    job_id: str
    source_uri: str
    base_model: str
    method: str
    metrics: dict
    description: str | None
    aliases: list[str]
    created_at: float

    @classmethod
    def of(cls, v: ModelVersion, aliases: dict[str, int]) -> ModelVersionPublic:
        return cls(
            name=v.name,
            version=v.version,
            model=modelref.registered_name(v.name, v.version),
            fine_tuned_model=v.fine_tuned_model,
            job_id=v.job_id,
            source_uri=v.source_uri,
            base_model=v.base_model,
            method=v.method,
            metrics=v.metrics or {},
            description=v.description,
            aliases=sorted(a for a, n in aliases.items() if n == v.version),
            created_at=v.created_at,
        )


class RegisteredModelPublic(BaseModel):
    object: str = "registered_model"
    name: str
    tenant: str
    description: str | None
    created_at: float
    updated_at: float
    latest_version: int | None
    aliases: dict[str, int]
    versions: list[ModelVersionPublic] | None = None  # GET /models/{name} only


class RegisteredModelsPublic(BaseModel):
    object: str = "list"
    data: list[RegisteredModelPublic]


class GraderRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: dict[str, Any] = Field(
        description="The grader: string_check, text_similarity, python, score_model, "
        "label_model or multi, as OpenAI defines them."
    )
    model_sample: str = Field(max_length=1_000_000, description="The model's answer ({{sample.output_text}}).")
    item: Any = Field(None, description="The dataset row ({{item.*}}).")


class GraderValidate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: dict[str, Any]


Metadata = dict[Annotated[Text, Field(max_length=64)], Annotated[Text, Field(max_length=512)]]


class EvalCreate(BaseModel):
    """An evaluation, as OpenAI's Evals API shapes one: a name, what its data holds, and its testing criteria."""

    model_config = ConfigDict(extra="forbid")

    name: Text = Field(min_length=1, max_length=256)
    data_source_config: dict[str, Any] = Field(
        default_factory=lambda: {"type": "custom"},
        description="What the rows hold (OpenAI's `custom` item schema is kept as given); rows are prefq's data: "
        "prompts with completions, pairs, or prompts with the fields graders read.",
    )
    testing_criteria: list[dict[str, Any]] = Field(
        min_length=1,
        max_length=32,
        description="OpenAI's graders (string_check, text_similarity, python, score_model, label_model, multi), "
        "and prefq's: {type: reference_metrics, metrics: [exact_match, f1, rouge_l, bleu, perplexity]}, "
        "{type: preference} (reward accuracy against the baseline), {type: pairwise, judge: MODEL} (win rate).",
    )
    metadata: Metadata = Field(default_factory=dict, max_length=16)


class EvalSourceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["file_id"] = "file_id"
    id: Text = Field(min_length=1, max_length=2048, description="A dataset id (a file id of `/v1/files`), or a URI.")


class EvalSamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_completions_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    seed: int | None = None
    top_p: float | None = Field(None, gt=0, le=1)

    @field_validator("top_p")
    @classmethod
    def _whole(cls, value: float | None) -> float | None:
        if value is not None and value != 1:
            raise ValueError("only 1 (no nucleus cut) is supported")
        return value


class EvalRunSource(BaseModel):
    """OpenAI's `completions` data source: the model answers each row's prompt; `baseline`, `max_samples`,
    `max_seconds` and `gpus` are prefq's."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["completions"] = "completions"
    model: Text = Field(min_length=1, max_length=2048, description="The model evaluated, as a job's `model` names it.")
    source: EvalSourceFile
    baseline: Text | None = Field(
        None, min_length=1, max_length=2048, description="A second model, scored alike and judged against `model`."
    )
    sampling_params: EvalSamplingParams = Field(default_factory=EvalSamplingParams)
    max_samples: int | None = Field(None, ge=1, le=10000, description="Rows evaluated at most (default 200).")
    max_seconds: float | None = Field(None, gt=0, le=86400, description="Generation's time budget (default 1800).")
    max_length: int | None = Field(None, ge=8, le=1 << 20, description="Longest prompt and answer, in tokens.")
    gpus: int = Field(1, ge=0, le=8, description="Devices of the run; 0 runs it on a CPU worker.")


class EvalRunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text | None = Field(None, max_length=256)
    data_source: EvalRunSource
    metadata: Metadata = Field(default_factory=dict, max_length=16)
