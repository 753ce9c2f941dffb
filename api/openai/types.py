"""The objects of OpenAI's face as pydantic models, field for field those of the `openai` SDK's types
(`openai.types.fine_tuning.FineTuningJob`, `FineTuningJobEvent`, `jobs.FineTuningJobCheckpoint`, `FileObject`,
`FileDeleted`, `Model`, `chat.ChatCompletion`, `Completion`), so that the OpenAPI document describes every answer.
`api.openai.shapes` fills them from prefq's rows; `prefq` carries what OpenAI's objects have no field for."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """A list of OpenAI's (`SyncPage`, `SyncCursorPage`): `data`, and whether more follow."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool


class CursorPage(Page[T], Generic[T]):
    first_id: str | None
    last_id: str | None


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None = None
    expires_at: int | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class JobError(BaseModel):
    code: str
    message: str
    param: str | None


class Method(BaseModel):
    """`type`, and under the type's name (`supervised`, `dpo`) its `hyperparameters`."""

    model_config = ConfigDict(extra="allow")
    type: str


class PrefqJob(BaseModel):
    """prefq's own view of the job: native status, trainer, devices, attempt, progress, the whole spec."""

    status: str
    trainer: str
    gpus: int
    attempt: int
    step: int
    total_steps: int | None
    hyperparameters: dict[str, Any]


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: str
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]
    method: Method
    result_files: list[str]
    trained_tokens: int | None
    estimated_finish: int | None
    seed: int
    suffix: str | None
    metadata: dict[str, str] | None
    integrations: list[dict[str, Any]] | None
    error: JobError | None
    prefq: PrefqJob


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any]


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class Choice(BaseModel):
    index: int
    logprobs: None = None
    finish_reason: str


class ChatChoice(Choice):
    message: ChatMessageOut


class CompletionChoice(Choice):
    text: str


C = TypeVar("C", bound=Choice)


class Answer(BaseModel, Generic[C]):
    id: str
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[C]
    usage: Usage


class ChatCompletion(Answer[ChatChoice]):
    """Without `stream`; with it, Server-Sent Events of `chat.completion.chunk` objects, then `[DONE]`."""

    object: Literal["chat.completion"] = "chat.completion"


class Completion(Answer[CompletionChoice]):
    """Without `stream`; with it, Server-Sent Events of `text_completion` chunks, then `[DONE]`."""

    object: Literal["text_completion"] = "text_completion"


FileList = CursorPage[FileObject]
FineTuningJobList = Page[FineTuningJob]
FineTuningJobEventList = Page[FineTuningJobEvent]
FineTuningJobCheckpointList = CursorPage[FineTuningJobCheckpoint]
