"""prefq's rows in the shapes of the OpenAI SDK's types: `FileObject`, `FineTuningJob`, `FineTuningJobEvent`,
`FineTuningJobCheckpoint`, and the metrics CSV of a job's `result_files`.

States (prefq → OpenAI): queued → `queued`; running → `running`; cancelling → `cancelled` (the run is stopping: it
saves a checkpoint and becomes cancelled); succeeded, failed, cancelled as they are; a paused job (cancelling or
cancelled after `pause`) → `paused`, until `resume` queues it again. Files are validated at upload, so no job is
ever `validating_files`. The native status is in `prefq.status`.

Hyperparameters: `n_epochs` is `epochs`, `batch_size` is `batch_size` (per device), `learning_rate_multiplier`
scales the method's default learning rate (DPO 1e-6, SFT 2e-5), `beta` is DPO's beta; "auto" is the training spec's
default (1 epoch, batch size 8, multiplier 1, beta 0.1).
"""

from __future__ import annotations

import csv
import io
import time

from api.service.jobs import paused
from jobs import modelref
from jobs.models import Dataset, Job, JobEvent, JobStatus
from training.events import metrics_by_step
from training.spec import DATA_KINDS, DEFAULT_LEARNING_RATE, GRPO_FIELDS, TrainingSpec

# OpenAI's method types, and prefq's own beside them (a reward job is listed; it is created through the native API)
METHOD_TYPE = {
    "sft": "supervised",
    "dpo": "dpo",
    "grpo": "reinforcement",
    "orpo": "orpo",
    "simpo": "simpo",
    "kto": "kto",
    "reward": "reward",
    "eval": "eval",  # an evaluation run (`/evals`): on the queue like any job
}
RESULTS_PREFIX = "file-results-"  # the id of a job's metrics CSV: this prefix and the job id
DEFAULTS = {"epochs": 1, "batch_size": 8, "beta": 0.1}
LOCAL = {"path", "final_path", "pid"}  # event fields about the worker's own disk and processes: not for SDK users


def file_object(d: Dataset) -> dict:
    details = None
    if d.status == "error":
        details = "; ".join(f"line {e['line']}, {e['field']}: {e['reason']}" for e in d.errors)
    return {
        "id": d.id,
        "object": "file",
        "bytes": d.bytes,
        "created_at": int(d.created_at),
        "filename": d.filename,
        "purpose": "fine-tune",
        "status": d.status,
        "status_details": details,
        "expires_at": None,
    }


def results_file(job: Job, size: int) -> dict:
    return {
        "id": RESULTS_PREFIX + job.id,
        "object": "file",
        "bytes": size,
        "created_at": int(job.finished_at or 0),
        "filename": f"{job.id}-results.csv",
        "purpose": "fine-tune-results",
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def status(job: Job) -> str:
    if paused(job):
        return "paused"
    return "cancelled" if job.status == JobStatus.cancelling else job.status.value


def hyperparameters(job: Job) -> dict:
    hp = job.hyperparameters
    base = DEFAULT_LEARNING_RATE[job.method]
    out = {
        "n_epochs": hp.get("epochs", DEFAULTS["epochs"]),
        "batch_size": hp.get("batch_size", DEFAULTS["batch_size"]),
        "learning_rate_multiplier": round(hp.get("learning_rate", base) / base, 6),
    }
    if job.method == "grpo":  # batches of prompts, each with its answers (`api.openai.jobs._reinforcement`)
        generations = hp.get("num_generations", GRPO_FIELDS["num_generations"])
        out["batch_size"] //= generations
        out |= {
            "compute_multiplier": generations / GRPO_FIELDS["num_generations"],
            "eval_interval": hp.get("eval_steps"),
            "eval_samples": hp.get("sample_prompts", TrainingSpec.model_fields["sample_prompts"].default),
            "reasoning_effort": "default",
        }
    elif job.method not in ("sft", "reward"):
        out["beta"] = hp.get("beta", DEFAULTS["beta"])
    return out


def method(job: Job, hp: dict) -> dict:
    """OpenAI's `method`: its type, and under it the hyperparameters (and a reinforcement job's grader)."""
    kind = METHOD_TYPE[job.method]
    given = {"hyperparameters": hp} | ({"grader": job.hyperparameters.get("grader")} if job.method == "grpo" else {})
    return {"type": kind, kind: given}


def fine_tuned_model(job: Job) -> str | None:
    if job.status != JobStatus.succeeded or job.method == "eval":
        return None
    return modelref.fine_tuned_name(job.model, job.tenant, job.suffix, job.id)


def _estimated_finish(job: Job) -> int | None:
    if job.status != JobStatus.running or not job.step or not job.total_steps or job.started_at is None:
        return None
    elapsed = time.time() - job.started_at
    return int(job.started_at + elapsed * job.total_steps / job.step)


def fine_tuning_job(job: Job) -> dict:
    hp = hyperparameters(job)
    error = None
    if job.status == JobStatus.failed and job.error_code:
        param = "model" if job.error_code == "model_not_found" else None
        error = {"code": job.error_code, "message": job.error_message or "", "param": param}
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": int(job.created_at),
        "finished_at": int(job.finished_at) if job.finished_at and job.status.finished else None,
        "model": job.model,
        "fine_tuned_model": fine_tuned_model(job),
        "organization_id": job.tenant,
        "status": status(job),
        "training_file": job.dataset_id,
        "validation_file": job.eval_dataset_id,
        "hyperparameters": {k: v for k, v in hp.items() if k in ("n_epochs", "batch_size", "learning_rate_multiplier")},
        "method": method(job, hp),
        "result_files": [RESULTS_PREFIX + job.id] if job.status.finished and job.started_at else [],
        "trained_tokens": int(job.metrics["num_tokens"])
        if job.status.finished and "num_tokens" in job.metrics
        else None,
        "estimated_finish": _estimated_finish(job),
        "seed": job.hyperparameters.get("seed", 42),
        "suffix": job.suffix,
        "metadata": job.user_metadata or None,
        "integrations": job.integrations or None,
        "error": error,
        "prefq": {
            "status": job.status.value,
            "trainer": job.trainer,
            "gpus": job.gpus,
            "attempt": job.attempt,
            "step": job.step,
            "total_steps": job.total_steps,
            "hyperparameters": job.hyperparameters,
        },
    }


def event_id(job_id: str, seq: int) -> str:
    return f"ftevent-{job_id}-{seq}"


def event_seq(event: str) -> int | None:
    """The sequence number in an event id of `event_id`'s, or None for anything else."""
    tail = event.rsplit("-", 1)[-1]
    return int(tail) if event.startswith("ftevent-") and tail.isdigit() and len(tail) < 10 else None


def _message(e: JobEvent) -> tuple[str, str, str]:
    """(level, type, message) of an event."""
    d = e.data
    if e.type == "progress":
        return "info", "metrics", f"Step {d.get('step')}/{d.get('total_steps')}: training loss={d.get('loss')}"
    if e.type == "eval":
        return "info", "metrics", f"Step {d.get('step')}: validation {d.get('metrics')}"
    if e.type == "checkpoint":
        return "info", "message", f"Checkpoint saved at step {d.get('step')}"
    if e.type == "failed":
        return "error", "message", f"Fine-tuning job failed: {d.get('error', {}).get('message', '')}"
    if e.type in ("error", "unschedulable"):
        return "warn" if e.type == "unschedulable" else "error", "message", str(d.get("message", e.type))
    text = {
        "queued": "Fine-tuning job queued",
        "claimed": "Fine-tuning job started",
        "succeeded": "The job has successfully completed",
        "cancelled": "Fine-tuning job cancelled",
    }.get(e.type)
    return "info", "message", text or e.type.replace("_", " ").capitalize()


def fine_tuning_event(job_id: str, e: JobEvent) -> dict:
    level, kind, message = _message(e)
    data = (
        {"step": e.data.get("step"), "train_loss": e.data.get("loss"), **e.data.get("metrics", {})}
        if (e.type == "progress")
        else {"prefq_type": e.type, **{k: v for k, v in e.data.items() if k not in LOCAL}}
    )
    return {
        "id": event_id(job_id, e.seq),
        "object": "fine_tuning.job.event",
        "created_at": int(e.created_at),
        "level": level,
        "message": message,
        "type": kind,
        "data": data,
    }


def checkpoint(job: Job, step: int, created_at: float, metrics: dict) -> dict:
    return {
        "id": f"ftckpt-{job.id}-{step}",
        "object": "fine_tuning.job.checkpoint",
        "created_at": int(created_at),
        "fine_tuned_model_checkpoint": modelref.fine_tuned_name(job.model, job.tenant, job.suffix, job.id, step),
        "fine_tuning_job_id": job.id,
        "step_number": step,
        "metrics": metrics,
    }


COLUMNS = {
    "sft": [
        ("train_loss", "loss"),
        ("train_accuracy", "mean_token_accuracy"),
        ("valid_loss", "eval_loss"),
        ("valid_mean_token_accuracy", "eval_mean_token_accuracy"),
    ],
    "reward": [
        ("train_loss", "loss"),
        ("train_accuracy", "accuracy"),
        ("train_margin", "margin"),
        ("valid_loss", "eval_loss"),
        ("valid_accuracy", "eval_accuracy"),
    ],
    "kto": [
        ("train_loss", "loss"),
        ("train_rewards_margin", "rewards/margins"),
        ("train_kl", "kl"),
        ("valid_loss", "eval_loss"),
        ("valid_rewards_margin", "eval_rewards/margins"),
    ],
    "dpo": [
        ("train_loss", "loss"),
        ("train_rewards_accuracy", "rewards/accuracies"),
        ("train_rewards_margin", "rewards/margins"),
        ("valid_loss", "eval_loss"),
        ("valid_rewards_accuracy", "eval_rewards/accuracies"),
    ],
}


def metrics_csv(method: str, events: list[JobEvent]) -> bytes:
    """The job's metrics, one row per logged step: step, then OpenAI's column names for the method."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = COLUMNS.get(method) or COLUMNS[DATA_KINDS[method][0]]  # orpo and simpo log DPO's (`training.dpo`)
    writer.writerow(["step", *(name for name, _ in columns)])
    for step, m in sorted(metrics_by_step((e.type, e.data) for e in events).items()):
        writer.writerow([step, *("" if m.get(key) is None else m[key] for _, key in columns)])
    return out.getvalue().encode()
