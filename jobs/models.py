"""Tables (jobs, job events, datasets, workers), the job states, and the public shapes of rows.

Times are Unix seconds (floats), the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

import secrets
import time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from sqlalchemy import JSON, Column, UniqueConstraint
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


def new_id(prefix: str) -> str:
    """Time-ordered id: newer ids sort after older ones, which cursor pagination relies on."""
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(5)}"


def now() -> float:
    return time.time()


def _json(default=None) -> Any:
    return Field(default_factory=(lambda: default.copy()) if default is not None else lambda: None,
                 sa_column=Column(JSON, nullable=default is None))  # fmt: skip


class Job(SQLModel, table=True):
    __tablename__ = "jobs"

    id: str = Field(primary_key=True)
    created_at: float = Field(default_factory=now, index=True)
    updated_at: float = Field(default_factory=now)
    started_at: float | None = None
    finished_at: float | None = None
    status: JobStatus = Field(default=JobStatus.queued, index=True)

    method: str
    trainer: str
    gpus: int
    model: str  # a local folder or a storage URI
    dataset_id: str
    eval_dataset_id: str | None = None
    hyperparameters: dict = _json({})
    callback_url: str | None = None
    user_metadata: dict = _json({})
    idempotency_key: str | None = Field(default=None, unique=True)

    attempt: int = 1
    max_attempts: int = 3
    lease_owner: str | None = None
    lease_expires_at: float | None = None

    step: int = 0
    total_steps: int | None = None
    metrics: dict = _json({})  # the latest progress metrics (TRL names)
    eval_metrics: dict = _json({})  # the latest evaluation
    error_code: str | None = None
    error_message: str | None = None
    error_is_user: bool | None = None  # True: the user's to fix (data, spec, model); False: infrastructure
    result_uri: str | None = None  # the final model's folder in storage
    callback_status: str | None = None  # pending | delivered | failed


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


class Dataset(SQLModel, table=True):
    __tablename__ = "datasets"

    id: str = Field(primary_key=True)
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
    status: JobStatus
    created_at: float
    started_at: float | None
    finished_at: float | None
    method: str
    trainer: str
    gpus: int
    model: str
    dataset_id: str
    eval_dataset_id: str | None
    hyperparameters: dict
    callback_url: str | None
    metadata: dict
    attempt: int
    step: int
    total_steps: int | None
    progress: float | None
    metrics: dict
    eval_metrics: dict
    error: dict | None
    result_uri: str | None
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
