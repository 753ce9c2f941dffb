"""The one settings object: every `PREFQ_*` environment variable, read once and validated.

Nothing else in prefq reads the environment. The API, the workers, `prefq serve` and the CLI build `Settings()`
once and pass what each part needs (database URL, storage URL, ...) to `jobs/` and `storage/`, which take plain
arguments. This module imports no Celery (`queue_config` derives Celery's options from it), so that the CLI starts
without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREFQ_", extra="ignore", populate_by_name=True)

    data_dir: Path = Path(".prefq")  # SQLite file, local storage and work folders live here by default
    database_url: str = ""  # default sqlite:///<data_dir>/prefq.db; PostgreSQL: postgresql+psycopg://...
    broker_url: str = "redis://127.0.0.1:6379/0"
    storage_url: str = ""  # default file://<data_dir>/storage; S3: s3://bucket/prefix
    s3_endpoint_url: str | None = None  # MinIO, SeaweedFS, ...; None is AWS
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None

    api_url: str = "http://127.0.0.1:8000"  # where the CLI finds the API
    api_key: SecretStr | None = None  # the key the CLI sends (else the one in its config file)
    auth: Literal["on", "off"] = "on"  # "off": every request is the admin of tenant `default` (a private laptop)
    admin_key: SecretStr | None = None  # an admin key (of tenant `default`) the API creates at start if missing
    # What a job may name (`jobs.perimeter`): shared storage prefixes of vetted models, local model folders
    shared_models: Annotated[list[str], NoDecode] = []  # comma-separated URI prefixes, e.g. s3://models/vetted
    model_roots: Annotated[list[str], NoDecode] = []  # comma-separated local folders; `prefq dev` lists its data
    allowed_hub_models: Annotated[list[str], NoDecode] = ["*"]  # fnmatch patterns of hub ids jobs may name
    base_models: Annotated[list[str], NoDecode] = []  # what GET /v1/models lists as base models (besides ft ones)
    # The hub, as huggingface_hub reads it: the API asks it whether a hub id exists (unless offline or unreachable)
    hf_endpoint: str = Field("https://huggingface.co", validation_alias="HF_ENDPOINT")
    hf_hub_offline: bool = Field(False, validation_alias="HF_HUB_OFFLINE")
    hf_token: SecretStr | None = Field(None, validation_alias="HF_TOKEN")
    callback_secret: SecretStr | None = None  # HMAC-SHA256 key for callback signatures; callbacks need it
    callback_allow_private: bool = False  # allow callbacks to loopback and private addresses (tests, a lab)
    callback_max_retries: int = 8
    callback_timeout_s: float = 10.0

    gpus: str = ""  # this worker's GPUs, e.g. "0,1" (`prefq worker --gpus 0,1`); empty: none
    cpu_devices: int = 0  # without GPUs: serve jobs of up to this many devices as CPU processes (dev, CI)
    work_dir: Path | None = None  # default <data_dir>/work: datasets, models and runs being trained
    lease_ttl_s: float = 60.0  # a worker that stops heartbeating loses its job after this
    heartbeat_s: float = 10.0
    cancel_grace_s: float = 30.0  # SIGTERM, then SIGKILL after this
    warm_start: bool = True  # fork runs from a process that has imported the trainers (training.warm): ~5 s sooner
    max_attempts: int = 3  # attempts the reconciler may start for a job whose worker died
    reconcile_interval_s: float = 30.0
    resend_after_s: float | None = None  # default 3 x reconcile_interval_s: a queued job unclaimed this long
    # whose task is in no queue (broker wiped, API killed between commit and send, a worker that died holding
    # it) gets its task sent again
    model_cache_gb: float = 100.0  # models fetched by URI stay on the worker's disk up to this size (LRU)
    metrics_port: int = 9464  # the service worker's Prometheus exporter of database-wide metrics; 0: off
    # The playground (`/v1/chat/completions`): the API forwards to `prefq serve`, which runs the models
    serve_url: str = "http://127.0.0.1:8001"  # where the API finds `prefq serve`
    serve_token: SecretStr | None = None  # a secret the API sends and `prefq serve` requires; unset: none
    serve_max_models: int = Field(2, ge=1)  # base models `prefq serve` keeps loaded, one process each (LRU)
    serve_max_tokens: int = Field(512, ge=1)  # max_tokens of one request at most
    serve_timeout_s: float = Field(60.0, gt=0)  # one generation's time limit; the request is stopped there
    serve_max_batch: int = Field(8, ge=1, le=256)  # requests for one model answered together (dynamic batching)
    serve_max_waiting: int = Field(64, ge=1)  # requests one model holds (answered or waiting); beyond: 503
    serve_adapter_mb: float = Field(2048.0, gt=0)  # LoRA adapters a model's process keeps loaded on it (LRU)
    serve_engine: Literal["transformers", "vllm"] = "transformers"  # vllm: vLLM's engine (CUDA), LoRA enabled
    # A python grader's sandbox (`training.graders.run_python`): wall and CPU seconds, address space
    grader_timeout_s: float = Field(10.0, gt=0, le=600)
    grader_memory_mb: int = Field(512, ge=64)
    # Model graders' judges: a tenant's models served by `prefq serve`, and these models of an OpenAI-compatible
    # endpoint that the operator configures (its key stays with the API and the worker, never reaches a run)
    judge_url: str | None = None  # e.g. https://api.openai.com/v1 (its /chat/completions)
    judge_api_key: SecretStr | None = None
    judge_models: Annotated[list[str], NoDecode] = []  # the names graders may give it, e.g. gpt-4o-mini
    judge_timeout_s: float = Field(120.0, gt=0)  # one judge's answer
    ray_address: str | None = None  # a Ray cluster (`ray://`, or host:port of its GCS) for jobs of several nodes
    ray_placement_timeout_s: float = Field(300.0, gt=0)  # every node of such a job placed within this, or queued again
    ray_placement_retry_s: float = Field(30.0, ge=0)  # ... and tried again after this, its worker free meanwhile
    judge_retries: int = Field(3, ge=0, le=10)  # a judge that fails to answer (no connection, 429, 5xx) is asked again
    judge_requests_per_s: float = Field(0.0, ge=0)  # per judge endpoint and process; 0: no limit
    # Limits: a request beyond one is refused with 413 or 422 naming it
    max_upload_bytes: int = 1 << 30  # a dataset upload
    max_json_bytes: int = 1 << 20  # any other request's body (a job, a chat): JSON in kilobytes
    max_rows: int = 10_000_000  # rows of a dataset
    max_line_bytes: int = 8 << 20  # one JSONL line
    max_json_depth: int = 32  # nesting of one line's JSON
    max_job_steps: int = 1_000_000  # hyperparameters.max_steps
    max_job_length: int = 131_072  # hyperparameters.max_length (tokens)
    max_job_epochs: float = 100.0  # hyperparameters.epochs
    max_job_batch_size: int = 4096  # hyperparameters.batch_size
    tenant_max_active_jobs: int = 100  # unfinished jobs per tenant; beyond: 429 with Retry-After
    visibility_timeout_s: int = 7 * 24 * 3600  # above the longest job: Redis re-sends unacked tasks after it
    worker_live_s: float = 120.0  # a worker whose last heartbeat is older is not counted as live
    # Experiment tracking by the workers (`worker.tracking`); each is off when unset. Credentials of MLflow's own
    # (MLFLOW_TRACKING_TOKEN, ...) stay in the worker's environment: the training process never sees them.
    mlflow_tracking_uri: SecretStr | None = None  # an MLflow tracking server: a run per job, the registry mirror
    mlflow_experiment: str = "prefq/{tenant}"  # the experiment of a tenant's runs
    wandb_mode: Literal["off", "offline"] = "off"  # offline: a W&B offline run per attempt, kept with the job

    @field_validator("shared_models", "model_roots", "allowed_hub_models", "base_models", "judge_models", mode="before")
    @classmethod
    def _comma_list(cls, value):
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        self.data_dir = data_dir = self.data_dir.resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{data_dir / 'prefq.db'}"
        if not self.storage_url:
            self.storage_url = f"file://{data_dir / 'storage'}"
        self.work_dir = (self.work_dir or data_dir / "work").resolve()
        if self.resend_after_s is None:
            self.resend_after_s = 3 * self.reconcile_interval_s
        return self

    @property
    def gpu_ids(self) -> list[str]:
        return [g.strip() for g in self.gpus.split(",") if g.strip()]

    @property
    def devices(self) -> int:
        """Devices this worker serves jobs for: its GPUs, or emulated CPU devices."""
        return len(self.gpu_ids) or self.cpu_devices

    def storage_options(self) -> dict:
        """Keyword arguments of `storage.open_storage` besides the URL."""
        secret = self.s3_secret_access_key
        return {
            "endpoint_url": self.s3_endpoint_url,
            "region": self.s3_region,
            "access_key_id": self.s3_access_key_id,
            "secret_access_key": secret.get_secret_value() if secret else None,
        }
