"""Where a job's files live in storage (keys relative to the storage root)."""

from __future__ import annotations

import re


def dataset_key(dataset_id: str) -> str:
    return f"datasets/{dataset_id}.jsonl"


def checkpoints_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/checkpoints/"


def checkpoint_prefix(job_id: str, step: int) -> str:
    return f"{checkpoints_prefix(job_id)}step-{step:08d}/"


def model_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/model/"


def complete_checkpoints(job_id: str, keys: list[str], manifest: str) -> dict[int, str]:
    """{step: prefix} of the checkpoints whose manifest (uploaded last) is present."""
    pattern = re.compile(re.escape(checkpoints_prefix(job_id)) + r"step-(\d+)/" + re.escape(manifest) + "$")
    found = (pattern.match(k) for k in keys)
    return {int(m.group(1)): checkpoint_prefix(job_id, int(m.group(1))) for m in found if m}
