"""`deploy/check` rejects broken deployment files, each with a message that names the problem.

Each case breaks one thing in a copy of the deployment files. Cases that cannot hide each other share a copy
(deploy/check reports every problem, not the first), and the copies are checked side by side, one
`deploy/check --root COPY` process each, against this checkout's code.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

FILES = [
    "deploy",
    "compose.yaml",
    "README.md",
    "pyproject.toml",
    ".dockerignore",
    "queue_config.py",
    "settings.py",
    "api",
    "cli",
    "jobs",
    "serve",
    "storage",
    "training",
    "worker",
]


def edit(path: str, old: str, new: str):
    def apply(root: Path) -> None:
        file = root / path
        text = file.read_text()
        assert old in text, f"{path} no longer holds {old!r}: update this case"
        file.write_text(text.replace(old, new, 1))

    return apply


# name: (the copy it breaks, how, what the output must say)
CASES = {
    "missing Secret key": (
        "references",
        edit("deploy/k8s/secret.example.yaml", "  callback-secret: replace-me", ""),
        "Deployment/prefq-api: container api: env PREFQ_CALLBACK_SECRET: Secret prefq-secrets has no key 'callback-secret'",
    ),
    "wrong queue name": (
        "references",
        edit("deploy/k8s/overlays/gpu-4/kustomization.yaml", "listName: gpu4,", "listName: gpu-4,"),
        "ScaledObject/prefq-worker: trigger gpu4 watches 'gpu-4', which is not a queue that queue_config makes",
    ),
    "queue the worker does not serve": (
        "references",
        edit("deploy/k8s/overlays/cpu-dev/kustomization.yaml", "listName: cpu,", "listName: gpu3,"),
        "ScaledObject/prefq-worker: does not watch queue 'cpu' that prefq-worker serves",
    ),
    "unknown field": (
        "schemas",
        edit("deploy/k8s/base/api.yaml", "  replicas: 2\n", "  replicas: 2\n  replica: 2\n"),
        "Deployment/prefq-api: spec: Additional properties are not allowed ('replica' was unexpected)",
    ),
    "unknown KEDA field": (
        "schemas",
        edit(
            "deploy/k8s/components/autoscaling/scaledobject.yaml",
            "  pollingInterval: 15\n",
            "  pollingInterval: 15\n  maxReplicas: 4\n",
        ),
        "ScaledObject/prefq-worker: spec: Additional properties are not allowed ('maxReplicas' was unexpected)",
    ),
    "unknown KubeRay field": (
        "schemas",
        edit("deploy/k8s/components/ray-cluster/raycluster.yaml", "      maxReplicas: 8\n", "      maxReplica: 8\n"),
        "RayCluster/prefq-ray: spec.workerGroupSpecs.0: Additional properties are not allowed ('maxReplica' was "
        "unexpected)",
    ),
    "bad pod template in a RayCluster": (
        "schemas",
        edit(
            "deploy/k8s/components/ray-cluster/raycluster.yaml",
            "                - {name: shm, mountPath: /dev/shm}",
            "                - {name: shm, mountpath: /dev/shm}",
        ),
        "RayCluster/prefq-ray: spec.workerGroupSpecs.0.template.",
    ),
    "broken compose file": (
        "compose",
        edit("compose.yaml", "    redis: {condition: service_healthy}\n", "    cache: {condition: service_healthy}\n"),
        'depends on undefined service "cache": invalid compose project',
    ),
    "unknown setting": (
        "files",
        edit("compose.yaml", "  PREFQ_DATA_DIR: /data\n", "  PREFQ_DATADIR: /data\n"),
        "PREFQ_DATADIR is not a setting: settings.Settings has no field 'datadir'",
    ),
    "setting with a bad value": (
        "references",
        edit("deploy/k8s/base/config.yaml", 'PREFQ_LEASE_TTL_S: "120"', "PREFQ_LEASE_TTL_S: two-minutes"),
        "PREFQ_LEASE_TTL_S='two-minutes' is not valid",
    ),
    "port mismatch": (
        "references",
        edit("deploy/k8s/base/flower.yaml", "containerPort: 5555", "containerPort: 5556"),
        "Deployment/flower: container flower: listens on 5555 (its command) but declares ports [5556]",
    ),
    "Secret in the base": (
        "references",
        edit(
            "deploy/k8s/base/config.yaml",
            '  PREFQ_HEARTBEAT_S: "15"\n',
            '  PREFQ_HEARTBEAT_S: "15"\n---\napiVersion: v1\n'
            "kind: Secret\nmetadata: {name: prefq-secrets}\nstringData: {admin-key: replace-me}\n",
        ),
        "Secret/prefq-secrets is defined in the manifests: `kubectl apply -k` would reset the real one",
    ),
    "torch in the API image": (
        "files",
        edit("deploy/requirements-api.txt", "alembic==", "torch==2.13.0\nalembic=="),
        "deploy/requirements-api.txt: torch==2.13.0 would put the training stack (torch) into the API image",
    ),
    "root worker image": (
        "files",
        edit("deploy/Dockerfile.worker", "USER 10001\n", ""),
        "deploy/Dockerfile.worker: runs as root",
    ),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """deploy/check on a faithful copy ("unbroken") and on each broken copy, run side by side."""
    copies: dict[str, list] = {"unbroken": []}
    for group, apply, _ in CASES.values():
        copies.setdefault(group, []).append(apply)
    procs = {}
    for group, edits in copies.items():
        root = tmp_path_factory.mktemp(f"deploy-check-{group}")
        for item in FILES:
            source = ROOT / item
            if source.is_dir():
                shutil.copytree(source, root / item, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(source, root / item)
        for apply in edits:
            apply(root)
        procs[group] = subprocess.Popen(
            [str(ROOT / "deploy" / "check"), "--root", str(root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    return {
        group: subprocess.CompletedProcess(p.args, p.wait(timeout=300), p.stdout.read()) for group, p in procs.items()
    }


def test_a_faithful_copy_passes(results):
    assert results["unbroken"].returncode == 0, results["unbroken"].stdout


@pytest.mark.parametrize("case", CASES)
def test_a_broken_copy_is_rejected_with_the_problem_named(results, case):
    group, _, message = CASES[case]
    out = results[group]
    assert out.returncode == 1, out.stdout
    assert message in out.stdout, out.stdout
