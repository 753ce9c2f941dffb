"""The deployment files stay true to the code: they parse, reference what exists, run real commands, and pass
`deploy/check` (kustomize renders, strict schemas, compose, images), which CI runs through this file."""

import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from cli.app import app
from tests.conftest import ROOT

MANIFESTS = sorted((ROOT / "deploy" / "k8s").rglob("*.yaml")) + [ROOT / "compose.yaml"]


def commands() -> list[tuple[str, list[str]]]:
    """Every `prefq ...` command line in the manifests and compose file, health checks included."""
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("command", "value", "test") and isinstance(value, list):
                    line = value[1:] if value[:1] == ["CMD"] else value
                    if line[:1] == ["prefq"]:
                        found.append((where, line[1:]))
                walk(value, where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)
        elif isinstance(node, str) and node.lstrip().startswith("- op:"):
            walk(yaml.safe_load(node), where)

    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            walk(doc, path.name)
    return found


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_manifests_parse(path):
    assert list(yaml.safe_load_all(path.read_text()))


def test_kustomizations_name_existing_files():
    for kustomization in (ROOT / "deploy" / "k8s").rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        for resource in spec.get("resources", []) + spec.get("components", []):
            assert (kustomization.parent / resource).exists(), f"{kustomization}: {resource}"


def test_every_prefq_command_line_is_accepted_by_the_cli():
    found = commands()
    assert len(found) >= 10
    runner = CliRunner()
    for where, args in found:
        result = runner.invoke(app, [("pod-1" if a.startswith("$(") else a) for a in args] + ["--help"])
        assert result.exit_code == 0, f"{where}: prefq {' '.join(args)}: {result.output}"


def test_dockerfiles_copy_every_package():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"}
    for dockerfile in (ROOT / "deploy").glob("Dockerfile.*"):
        text = dockerfile.read_text()
        assert all(f"COPY {p} {p}" in text for p in packages), dockerfile.name
        assert "queue_config.py" in text and "settings.py" in text
    assert packages == {"api", "cli", "jobs", "serve", "storage", "training", "worker"}


def test_deploy_check_passes_on_the_repository():
    out = subprocess.run([str(ROOT / "deploy" / "check")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "deploy/check: ok: base, cpu-dev, gpu-4 rendered" in out.stdout
