"""Where a tenant's files live in storage (keys relative to the storage root): everything under
`tenants/<tenant>/`, so that a tenant's references can be confined to its prefix (`jobs.perimeter`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from jobs.perimeter import tenant_prefix

SAMPLES_ARTIFACT = "samples.json"


def dataset_key(tenant: str, dataset_id: str) -> str:
    return f"{tenant_prefix(tenant)}datasets/{dataset_id}.jsonl"


def checkpoints_prefix(tenant: str, job_id: str) -> str:
    return f"{tenant_prefix(tenant)}jobs/{job_id}/checkpoints/"


def checkpoint_prefix(tenant: str, job_id: str, step: int) -> str:
    return f"{checkpoints_prefix(tenant, job_id)}step-{step:08d}/"


def model_prefix(tenant: str, job_id: str) -> str:
    return f"{tenant_prefix(tenant)}jobs/{job_id}/model/"


def artifacts_prefix(tenant: str, job_id: str) -> str:
    """What a job keeps besides checkpoints and its model: its sample generations (`samples.json`), an offline
    W&B run (`wandb/`); `GET /jobs/{id}/artifacts` lists them."""
    return f"{tenant_prefix(tenant)}jobs/{job_id}/artifacts/"


class Listing(Protocol):
    """What `list_checkpoints` needs of a storage (`storage.Storage` is one)."""

    def list(self, prefix: str = "") -> list[str]: ...


@dataclass(frozen=True)
class StoredCheckpoint:
    step: int
    prefix: str  # its folder's key, ending in `/`
    keys: list[str]  # every key in it, the manifest included


def list_checkpoints(
    storage: Listing, tenant: str, job_id: str, manifest: str, step: int | None = None
) -> dict[int, StoredCheckpoint]:
    """The job's complete checkpoints in storage (those whose manifest, uploaded last, is there), by step, oldest
    first; with `step`, that step's alone (one listing of its folder). `manifest`: `training.spec.MANIFEST_NAME`."""
    base = checkpoints_prefix(tenant, job_id)
    keys = storage.list(base if step is None else checkpoint_prefix(tenant, job_id, step))
    pattern = re.compile(re.escape(base) + r"step-(\d+)/" + re.escape(manifest) + "$")
    steps = sorted(int(m.group(1)) for m in map(pattern.match, keys) if m)
    prefixes = {n: checkpoint_prefix(tenant, job_id, n) for n in steps}
    return {n: StoredCheckpoint(n, prefixes[n], [k for k in keys if k.startswith(prefixes[n])]) for n in steps}


def refcache_prefix(tenant: str, group: str) -> str:
    """Reference log-prob files (`training.refcache`) shared by the tenant's jobs on the same model and data."""
    return f"{tenant_prefix(tenant)}refcache/{group}/"
