"""The run's events: one JSON object per line on stdout; logs go to stderr.

Every event has `event` (its type) and `time` (Unix seconds). The types and their fields:

| event | fields |
| --- | --- |
| `started` | `total_steps`, `examples` (training rows), `eval_examples`, `epochs`, `resumed_from_step` |
| `progress` | `step`, `total_steps`, `epoch`, `loss`, `learning_rate`, `metrics` (TRL's names: DPO `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`, `beta`; SFT `mean_token_accuracy`) |
| `ref_logprobs` | `split` (`train`, `eval`), `key` (the cache key, see `training.refcache`), `cached` (true: read from `ref_cache_dir`), `forward_passes` (reference forward passes, batches, this process ran for the split: 0 when cached), `rows`, `path` (the cache file), `seconds`; once per split when `ref_cache_dir` is set, before `started` |
| `eval` | `step`, `metrics` (TRL's names with the `eval_` prefix, e.g. `eval_rewards/accuracies`, `eval_loss`) |
| `samples` | `step`, `model` (`policy`, or `reference`: once, at the first evaluation), `samples` (a list of `index`, `prompt`, `completion`, `tokens` (completion length), `reward` (DPO: the policy's implicit reward of the completion, beta times its log-prob under the policy minus under the reference; null for SFT and the reference)), `seconds`; at each evaluation when `sample_prompts` > 0 |
| `checkpoint` | `step`, `path` (a complete checkpoint folder: its manifest is written) |
| `stopped` | `step`, `checkpoint` (path or null): SIGTERM was handled; the exit code is 75 |
| `done` | `final_path`, `metrics` (`train` and `eval`, as in metrics.json) |
| `error` | `code`, `message`, `user_error` (true for bad data, a bad spec, a model that cannot load or does not fit) |

In a run of several processes only the first (rank 0) prints events.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

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


def emit(event: str, **fields) -> None:
    """Print one event line (rank 0 only)."""
    if not _IS_MAIN:
        return
    line = json.dumps({"event": event, "time": round(time.time(), 3), **_clean(fields)})
    _stream.write(line + "\n")
    _stream.flush()
