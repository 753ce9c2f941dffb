"""`python -m tests.family_runs PLAN`: training runs one after another in one process, so that the family matrix
pays the start of Python, torch and TRL once instead of once per run. PLAN is a JSON list of [spec_path, out_dir];
each run's events go to OUT/events.jsonl and its exit code to OUT/rc, as `python -m training run` would give them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import training.events
from training.run import main


def run_plan(plan: Path) -> None:
    for spec_path, out in json.loads(plan.read_text()):
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "events.jsonl", "w", buffering=1) as stream:
            training.events._stream = stream
            code = main(spec_path, str(out), False)
        (out / "rc").write_text(str(code))


if __name__ == "__main__":
    run_plan(Path(sys.argv[1]))
