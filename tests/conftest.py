"""Shared fixtures: a tiny model and toy data built once per session, and a helper to run training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory) -> Path:
    from training.tiny import make_tiny_model

    path = tmp_path_factory.mktemp("models") / "micro"
    make_tiny_model(path, "micro")
    return path


@pytest.fixture(scope="session")
def toy_dpo(tmp_path_factory) -> Path:
    from training.toy_data import write_toy_data

    path = tmp_path_factory.mktemp("data") / "dpo.jsonl"
    write_toy_data(path, "dpo", rows=400, seed=1)
    return path


@pytest.fixture(scope="session")
def toy_sft(tmp_path_factory) -> Path:
    from training.toy_data import write_toy_data

    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    write_toy_data(path, "sft", rows=400, seed=1)
    return path


def dpo_spec(model: Path, data: Path, **overrides) -> dict:
    """A DPO spec that learns the toy data on the micro model in a few seconds."""
    spec = {
        "method": "dpo", "model": str(model), "train_file": str(data), "eval_fraction": 0.15,
        "max_steps": 20, "batch_size": 16, "learning_rate": 3e-3, "lr_scheduler": "constant",
        "max_length": 64, "save_steps": 100,
    }  # fmt: skip
    spec.update(overrides)
    return spec


def python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_training(spec: dict, out: Path, *extra: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out.parent / f"{out.name}-spec.json"
    spec_path.write_text(json.dumps(spec))
    return subprocess.Popen(
        [sys.executable, "-m", "training", "run", str(spec_path), "--out", str(out), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=python_env(), cwd=ROOT,
    )  # fmt: skip


def run_training(spec: dict, out: Path, *extra: str) -> tuple[int, list[dict]]:
    """Run `python -m training run` to the end; returns the exit code and the parsed events."""
    proc = start_training(spec, out, *extra)
    stdout, _ = proc.communicate(timeout=600)
    return proc.returncode, [json.loads(line) for line in stdout.splitlines()]


def of_type(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["event"] == kind]
