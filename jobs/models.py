"""Tables (jobs, job events, datasets, workers), the job states, and the public shapes of rows.

Times are Unix seconds (floats), the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

import secrets
import time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from sqlalchemy import JSON, Column, ForeignKeyConstraint, UniqueConstraint
from sqlmodel import Field, SQLModel


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled}
ACTIVE = {JobStatus.running, JobStatus.cancelling}
# Upper bounds (seconds) of the run-time histogram; rows for them are created by migration 0002.
DURATION_BUCKETS_S = (10, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600, 72 * 3600)
INF_BUCKET = 1e300  # the +Inf bucket's `le`: a float both SQLite and PostgreSQL store as is


def new_id(prefix: str) -> str:
    """Time-ordered id: newer ids sort after older ones, which cursor pagination relies on."""
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(5)}"


def now() -> float:
    return time.time()


def _json(default=None) -> Any:
    return Field(
        default_factory=(lambda: default.copy()) if default is not None else lambda: None,
        sa_column=Column(JSON, nullable=default is None),
    )


class Job(SQLModel, table=True):
    __tablename__ = "jobs"

    id: str = Field(primary_key=True)
    tenant: str = Field(default="default", index=True)  # the tenant of the key that created it
    created_at: float = Field(default_factory=now, index=True)
    updated_at: float = Field(default_factory=now)
    started_at: float | None = None
    finished_at: float | None = None
    status: JobStatus = Field(default=JobStatus.queued, index=True)

    method: str
    trainer: str
    gpus: int
    model: str  # a local folder, a storage URI, a hub id or a fine-tuned model name (`jobs.modelref`)
    dataset_id: str
    eval_dataset_id: str | None = None
    hyperparameters: dict = _json({})
    callback_url: str | None = None
    user_metadata: dict = _json({})
    idempotency_key: str | None = Field(default=None, unique=True)
    suffix: str | None = None  # the user's part of its fine-tuned model name
    integrations: list = _json([])  # as sent (OpenAI's `integrations`)
    paused_at: float | None = None  # set by pause (a cancel that keeps the job resumable), cleared by its retry
    eval_id: str | None = Field(default=None, index=True)  # an evaluation run's evaluation (`Eval`)
    nodes: int = 1  # nodes the job spans; `gpus` devices on each (`training.cluster`)
    queued_reason: str | None = None  # why a queued job waits (its nodes could not be placed); cleared when taken

    attempt: int = 1
    max_attempts: int = 3
    lease_owner: str | None = None
    lease_expires_at: float | None = None

    step: int = 0
    total_steps: int | None = None
    metrics: dict = _json({})  # the latest progress metrics (TRL names)
    eval_metrics: dict = _json({})  # the latest evaluation
    # per split ("train", "eval"), the latest run's `lengths` event: rows, truncated, dropped, max_length, p50, p95, max
    lengths: dict = _json({})
    error_code: str | None = None
    error_message: str | None = None
    error_is_user: bool | None = None  # True: the user's to fix (data, spec, model); False: infrastructure
    result_uri: str | None = None  # the final model's folder in storage
    callback_status: str | None = None  # pending | delivered | failed (its outbox row, `Callback`, decides)
    enqueued_at: float | None = None  # when its task was last sent (or is due): the reconciler re-sends a lost one


class JobEvent(SQLModel, table=True):
    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True, foreign_key="jobs.id")
    seq: int  # 1, 2, ... per job, in the order written
    attempt: int
    created_at: float = Field(default_factory=now)
    type: str
    data: dict = _json({})


class Callback(SQLModel, table=True):
    """The outbox: one row per terminal transition of a job with a callback URL, committed with the transition.
    The service worker delivers it; the reconciler sends again what is pending and overdue."""

    __tablename__ = "callbacks"

    id: str = Field(primary_key=True)  # the delivery id, sent as `X-Prefq-Delivery`: receivers drop duplicates
    job_id: str = Field(index=True, foreign_key="jobs.id")
    attempt: int
    event: str  # job.succeeded | job.failed | job.cancelled
    url: str
    payload: dict = _json({})  # the job as it was at the transition
    status: str = Field(default="pending", index=True)  # pending | delivered | failed
    tries: int = 0
    next_try_at: float = Field(default_factory=now)  # a try is due (or overdue) from then
    last_error: str | None = None
    created_at: float = Field(default_factory=now)
    delivered_at: float | None = None


class ServiceLease(SQLModel, table=True):
    """A named lease that one service process holds at a time (`reconciler`: one pass at a time across service
    workers; `exporter`: the one process that exports database-wide metrics), and what its last run did."""

    __tablename__ = "service_leases"

    name: str = Field(primary_key=True)
    holder: str | None = None
    expires_at: float = 0.0
    last_run_at: float | None = None
    last_result: dict = _json({})


class DurationBucket(SQLModel, table=True):
    """Cumulative counts of run times (first start to finish) per terminal status, incremented in the transaction
    of each terminal transition: a Prometheus histogram that never decreases. `le` of +Inf is `INF_BUCKET`."""

    __tablename__ = "job_duration_buckets"

    status: str = Field(primary_key=True)
    le: float = Field(primary_key=True)
    count: int = 0
    sum_s: float = 0.0  # only on the +Inf row: the sum of every observed run time


class ApiKey(SQLModel, table=True):
    """An API key (`jobs.keys`): only its SHA-256 is stored; `id` is the public part that indexes it."""

    __tablename__ = "api_keys"

    id: str = Field(primary_key=True)
    tenant: str = Field(index=True)
    admin: bool = False  # sees and manages every tenant
    label: str = ""
    sha256: str
    created_at: float = Field(default_factory=now)
    last_used_at: float | None = None
    revoked_at: float | None = None


class Dataset(SQLModel, table=True):
    __tablename__ = "datasets"

    id: str = Field(primary_key=True)
    tenant: str = Field(default="default", index=True)
    created_at: float = Field(default_factory=now)
    filename: str
    uri: str
    bytes: int
    sha256: str
    rows: int
    format: str
    method: str
    warnings: list = _json([])
    warning_count: int = 0
    tool_examples: int = 0  # conversations with tools or tool calls
    untrained_messages: int = 0  # assistant messages of weight 0: context, not trained
    status: str = "processed"  # processed | error (a file uploaded through /v1 that did not validate)
    errors: list = _json([])  # status error: the line-level report (line, field, reason)


class Worker(SQLModel, table=True):
    __tablename__ = "workers"

    name: str = Field(primary_key=True)
    hostname: str
    pid: int
    queues: list = _json([])
    devices: int = 0  # GPUs, or CPU devices on a worker that runs GPU jobs on its CPU
    inventory: dict = _json({})
    current_job_id: str | None = None
    started_at: float = Field(default_factory=now)
    last_heartbeat: float = Field(default_factory=now)


class JobPublic(BaseModel):
    """A job as the API returns it and callbacks send it."""

    id: str
    object: str = "training.job"
    tenant: str
    status: JobStatus
    created_at: float
    started_at: float | None
    finished_at: float | None
    method: str
    trainer: str
    gpus: int
    nodes: int = 1  # nodes the job spans, `gpus` devices on each
    queued_reason: str | None = None  # why a queued job waits: its nodes could not be placed yet
    model: str
    dataset_id: str
    eval_dataset_id: str | None
    eval_id: str | None = None  # an evaluation run's evaluation (method 'eval')
    hyperparameters: dict
    callback_url: str | None
    metadata: dict
    attempt: int
    step: int
    total_steps: int | None
    progress: float | None
    metrics: dict
    eval_metrics: dict
    lengths: dict  # per split: rows, truncated (cut to max_length), dropped (nothing left to train), token percentiles
    error: dict | None
    result_uri: str | None
    callback_status: str | None  # pending | delivered | failed, once the job has ended with a callback_url
    warnings: list[str] = []  # POST /jobs only: why the job may wait

    @classmethod
    def of(cls, job: Job) -> JobPublic:
        error = None
        if job.error_code:
            error = {"code": job.error_code, "message": job.error_message, "user_error": job.error_is_user}
        progress = None
        if job.total_steps:
            progress = round(min(1.0, job.step / job.total_steps), 4)
        fields = job.model_dump(exclude={"user_metadata", "error_code", "error_message", "error_is_user"})
        return cls(**fields, metadata=job.user_metadata, progress=progress, error=error)


class Eval(SQLModel, table=True):
    """An evaluation (`/evals`, OpenAI's Evals shape): what to measure on a dataset; its runs are jobs of method
    'eval' (`Job.eval_id`), each scoring a model (and a baseline)."""

    __tablename__ = "evals"

    id: str = Field(primary_key=True)
    tenant: str = Field(index=True)
    created_at: float = Field(default_factory=now)
    name: str
    data_source_config: dict = _json({})
    testing_criteria: list = _json([])
    user_metadata: dict = _json({})


class RegisteredModel(SQLModel, table=True):
    """A tenant's named model (`prefq models promote`): its versions are succeeded jobs' models."""

    __tablename__ = "registered_models"

    tenant: str = Field(primary_key=True)
    name: str = Field(primary_key=True)
    description: str | None = None
    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)


class ModelVersion(SQLModel, table=True):
    """Version N of a registered model: a succeeded job's final model, with the job's metrics when it was promoted."""

    __tablename__ = "model_versions"
    __table_args__ = (ForeignKeyConstraint(["tenant", "name"], ["registered_models.tenant", "registered_models.name"]),)

    tenant: str = Field(primary_key=True)
    name: str = Field(primary_key=True)
    version: int = Field(primary_key=True)
    job_id: str = Field(index=True)
    fine_tuned_model: str  # the job's `ft:` name: what a job or a chat request trained on this version reads
    source_uri: str  # the model's folder in storage
    base_model: str
    method: str
    metrics: dict = _json({})  # {"train": the job's last training metrics, "eval": its last evaluation}
    description: str | None = None
    created_at: float = Field(default_factory=now)


class ModelAlias(SQLModel, table=True):
    """`production`, `staging`, ...: a name for one version of a registered model, moved by setting it again."""

    __tablename__ = "model_aliases"
    __table_args__ = (ForeignKeyConstraint(["tenant", "name"], ["registered_models.tenant", "registered_models.name"]),)

    tenant: str = Field(primary_key=True)
    name: str = Field(primary_key=True)
    alias: str = Field(primary_key=True)
    version: int
    updated_at: float = Field(default_factory=now)
