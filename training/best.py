"""The best checkpoint and early stopping (`best_metric`, `best_mode`, `early_stopping_patience`,
`early_stopping_min_delta`): what each evaluation's metric says, torch-free.

An evaluation whose metric improves on the best so far (by more than `min_delta`) becomes the best; the run saves a
checkpoint at its step (a `best` event names it; the one at step 0, the model before training, has none), so the best
model is always kept. With a patience, `patience` evaluations in a row without an improvement stop the run, with an
`early_stopping` event that says why; it then ends as any run does (a final model, `done`). The state is saved with
each checkpoint (`STATE`), so a resumed run keeps counting where it was.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

STATE = "best.json"


class MetricMissing(ValueError):
    """The evaluation has no such metric: the user's to fix (best_metric names one of those listed)."""


@dataclass
class Best:
    metric: str
    mode: str  # "min" or "max"
    patience: int | None = None
    min_delta: float = 0.0
    value: float | None = None
    step: int | None = None
    stale: int = 0  # evaluations in a row without an improvement

    def update(self, step: int, metrics: dict) -> tuple[bool, bool]:
        """Take one evaluation's metrics: (it is the new best, the run should stop)."""
        if self.metric not in metrics:
            names = ", ".join(sorted(k for k in metrics if k.startswith("eval_")))
            raise MetricMissing(f"best_metric: the evaluations report no {self.metric!r}; they report {names}")
        value = metrics[self.metric]  # None: this evaluation could not measure it (a judge that did not answer)
        value = math.nan if value is None else float(value)
        if not math.isfinite(value):
            improved = False
        elif self.value is None:
            improved = True
        else:
            gain = self.value - value if self.mode == "min" else value - self.value
            improved = gain > self.min_delta
        if improved:
            self.value, self.step, self.stale = value, step, 0
        elif step != self.step:
            self.stale += 1
        return improved, self.patience is not None and self.stale >= self.patience

    def event(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "value": self.value, "step": self.step}

    def save(self, folder: Path) -> None:
        (folder / STATE).write_text(json.dumps(asdict(self)))

    def load(self, folder: Path) -> None:
        """Continue from the state saved in a checkpoint `folder` (if it has one)."""
        path = folder / STATE
        if path.is_file():
            saved = json.loads(path.read_text())
            self.value, self.step, self.stale = saved["value"], saved["step"], saved["stale"]
