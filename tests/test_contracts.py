"""The layout's rules (DESIGN.md) as checks: the import contracts (`lint-imports`, pyproject's
`[tool.importlinter]`), no private name imported across modules, and settings without Celery."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = ("api", "worker", "jobs", "training", "storage", "cli", "serve", "settings", "queue_config")


def _python_files() -> list[Path]:
    files = [ROOT / "settings.py", ROOT / "queue_config.py"]
    for package in OURS[:7]:
        files += sorted((ROOT / package).rglob("*.py"))
    return [f for f in files if "migrations" not in f.parts]


def test_the_import_contracts_hold():
    out = subprocess.run(
        [Path(sys.executable).parent / "lint-imports", "--no-cache", "--no-logo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_no_private_name_is_imported_from_another_module():
    """`from api.routes.jobs import _enqueue` is where a function of the service layer is missing."""
    found = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in OURS:
                found += [
                    f"{path.relative_to(ROOT)}: from {node.module} import {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not found, "\n".join(found)


def test_settings_import_no_celery():
    """The one module that every process reads first; the CLI's own start is `test_cli`'s, torch's `test_api`'s."""
    code = "import sys, settings; bad = {'celery', 'kombu'} & set(sys.modules); assert not bad, bad"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
