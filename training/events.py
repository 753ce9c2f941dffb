"""The run's events: one JSON object per line on stdout; logs go to stderr.

Every event has `event` (its type) and `time` (Unix seconds). The types and their fields:

| event | fields |
| --- | --- |
| `lengths` | `split` (`train`, `eval`), `rows`, `truncated` (rows cut to `max_length`), `dropped` (rows left with nothing to train on), `max_length`, `p50`, `p95`, `max` (the rows' tokens after the chat template); once per split, before `started` (`training.lengths`) |
| `started` | `total_steps`, `examples` (training rows), `eval_examples`, `epochs`, `resumed_from_step`, `trainer`, `precision` (`bf16` or `fp32`, `auto` resolved), `parallelism`, `padding_free` (batches packed into one row) |
| `progress` | `step`, `total_steps`, `epoch`, `loss`, `learning_rate`, `metrics` (TRL's names: DPO `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`, `beta`; SFT `mean_token_accuracy`) |
| `ref_logprobs` | `split` (`train`, `eval`), `key` (the cache key, see `training.refcache`), `cached` (true: read from `ref_cache_dir`), `forward_passes` (reference forward passes, batches, this process ran for the split: 0 when cached), `rows`, `path` (the cache file), `seconds`; once per split when `ref_cache_dir` is set, before `started` |
| `eval` | `step`, `metrics` (TRL's names with the `eval_` prefix, e.g. `eval_rewards/accuracies`, `eval_loss`) |
| `samples` | `step`, `model` (`policy`, or `reference`: once, at the first evaluation), `samples` (a list of `index`, `prompt`, `completion`, `tokens` (completion length), `reward` (DPO: the policy's implicit reward of the completion, beta times its log-prob under the policy minus under the reference; GRPO: its grader's score; null for SFT and the reference), and with `sample_grader` its `grade`), `seconds`; at each evaluation when `sample_prompts` > 0 (the mean grade is the evaluation's `eval_sample_grade`) |
| `best` | `metric`, `mode` (`min`, `max`), `value`, `step`: an evaluation improved `best_metric` (`training.best`); a checkpoint at that step follows (none at step 0, the model before training) |
| `early_stopping` | `step`, `patience`, `best` (as the `best` event): that many evaluations in a row did not improve `best_metric`; the run ends as any run does (a final model, `done`) |
| `grader_error` | `step`, `flag` (OpenAI's error flag, e.g. `python_grader_runtime_error`, `model_grader_server_error`), `grader` (its name), `details`: the first answer of a GRPO run whose grading failed so, of each kind (it scored 0; `progress` counts them as `graders/errors/<flag>`) |
| `checkpoint` | `step`, `path` (a complete checkpoint folder: its manifest is written) |
| `stopped` | `step`, `checkpoint` (path or null): SIGTERM was handled; the exit code is 75 |
| `memory` | `device` (`cuda`, `cpu`), `estimated_gib` (the estimate of peak memory per device, `training.memory`), `parts_gib` (its weights, gradients, optimizer, reference, activations, head), `available_gib` (free on the device when the run began), `peak_gib` (measured on rank 0 from before the model loaded to the end of training: the CUDA allocator's peak, or the process's resident high-water mark on CPU); once, after training |
| `placing` | `nodes`, `bundle` (the devices each node brings: `GPU` or `CPU`), `timeout_s`, `name` (the placement group, after the job and the attempt): a run of several nodes asks the Ray cluster for them, before `started` (`training.cluster`) |
| `placed` | `nodes`, `name`: every node was placed at once |
| `unplaced` | `message`: not placed within `timeout_s`; nothing started, the exit code is 75 and the job is queued again with `message` as its `queued_reason` |
| `done` | `final_path`, `metrics` (`train` and `eval`, as in metrics.json; with `best_metric` also `best`: the best evaluation and `path`, its checkpoint, the final model, or null for the model before training) |
| `error` | `code`, `message`, `user_error` (true for bad data, a bad spec, a model that cannot load or does not fit) |

In a run of several processes only the first (rank 0) prints events. The typed dicts below are the same
protocol in code; `read_event` reads a line back and `metrics_of` / `metrics_by_step` are the one reading of
metrics out of events (the worker, tracking, the API and the dashboard use them).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable
from typing import Literal, NotRequired, TypedDict

EventType = Literal[
    "lengths",
    "started",
    "progress",
    "ref_logprobs",
    "eval",
    "samples",
    "best",
    "early_stopping",
    "grader_error",
    "checkpoint",
    "stopped",
    "placing",
    "placed",
    "unplaced",
    "memory",
    "done",
    "error",
]


class Lengths(TypedDict):
    split: str
    rows: int
    truncated: int
    dropped: int
    max_length: int
    p50: NotRequired[int]
    p95: NotRequired[int]
    max: NotRequired[int]


class Started(TypedDict):
    total_steps: int
    examples: int
    eval_examples: int
    epochs: float | None
    resumed_from_step: int
    trainer: str
    precision: str
    parallelism: str
    padding_free: bool


class Progress(TypedDict):
    step: int
    total_steps: int
    epoch: float
    loss: float | None
    learning_rate: float | None
    metrics: dict[str, float | None]


class RefLogprobs(TypedDict):
    split: str
    key: str
    cached: bool
    forward_passes: int
    rows: int
    path: str
    seconds: float


class Eval(TypedDict):
    step: int
    metrics: dict[str, float | None]


class Samples(TypedDict):
    step: int
    model: str
    samples: list[dict]
    prompts: int
    seconds: float


class Best(TypedDict):
    metric: str
    mode: str
    value: float
    step: int


class EarlyStopping(TypedDict):
    step: int
    patience: int
    best: Best


class GraderError(TypedDict):
    step: int
    flag: str
    grader: str
    details: str | None


class Checkpoint(TypedDict):
    step: int
    path: str


class Stopped(TypedDict):
    step: int
    checkpoint: str | None


class Memory(TypedDict):
    device: str
    estimated_gib: float
    parts_gib: dict[str, float]
    available_gib: float
    peak_gib: float


class Done(TypedDict):
    final_path: str
    metrics: dict  # step, train, eval (as in metrics.json)


class Error(TypedDict):
    code: str
    message: str
    user_error: bool
    errors: NotRequired[list[dict]]  # invalid_data: the data report's line-level errors


_IS_MAIN = os.environ.get("RANK", "0") == "0"
_stream = sys.stdout


def claim_stdout() -> None:
    """Keep stdout for events alone: anything else printed to file descriptor 1 goes to stderr."""
    global _stream
    sys.stdout.flush()
    _stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or infinity
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def event_stream():
    """The file events go to: a child that prints events (the distributed launcher) writes here too."""
    return _stream


def emit(event: EventType, **fields) -> None:
    """Print one event line (rank 0 only)."""
    if not _IS_MAIN:
        return
    line = json.dumps({"event": event, "time": round(time.time(), 3), **_clean(fields)})
    _stream.write(line + "\n")
    _stream.flush()


def read_event(line: str) -> tuple[str, dict]:
    """(type, fields) of one event line (`time` is among the fields); ValueError for a line that is no event."""
    event = json.loads(line)
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        raise ValueError("not an event: a JSON object with an `event` string")
    return event["event"], {k: v for k, v in event.items() if k != "event"}


def metrics_of(kind: str, data: dict) -> tuple[int, dict[str, float]] | None:
    """(step, metrics) of a `progress` event (`loss`, `learning_rate`, `epoch` and TRL's metrics) or an `eval` event
    (TRL's `eval_` metrics); None for other events. Values that are not numbers (null: a NaN) are left out."""
    if kind == "progress":
        values = {
            "loss": data.get("loss"),
            "learning_rate": data.get("learning_rate"),
            "epoch": data.get("epoch"),
            **(data.get("metrics") or {}),
        }
    elif kind == "eval":
        values = data.get("metrics") or {}
    else:
        return None
    if data.get("step") is None:
        return None
    return int(data["step"]), {k: float(v) for k, v in values.items() if isinstance(v, int | float)}


def metrics_by_step(events: Iterable[tuple[str, dict]]) -> dict[int, dict[str, float]]:
    """{step: metrics} from `(type, fields)` pairs of events (a run's lines, or the job table's rows): each step's
    `progress` and `eval` metrics (`metrics_of`) merged."""
    rows: dict[int, dict[str, float]] = {}
    for kind, data in events:
        if found := metrics_of(kind, data):
            step, values = found
            rows.setdefault(step, {}).update(values)
    return rows
