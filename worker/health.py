"""A health file per worker process, rewritten by its heartbeat thread, which `prefq check` reads (what a
Kubernetes exec probe calls): a worker whose heartbeat thread, beat or reconciler died is not healthy, even if
its process still answers."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from settings import Settings

KINDS = ("worker", "service")


def default_name(kind: str) -> str:
    """The name `prefq worker` gives a worker of this kind on this host (`prefq-worker@<host>`)."""
    return f"prefq-{kind}@{socket.gethostname()}"


def path(settings: Settings, name: str) -> Path:
    return settings.work_dir / "health" / f"{name}.json"


def write(settings: Settings, name: str, kind: str, problems: list[str]) -> None:
    target = path(settings, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(
        json.dumps({"name": name, "kind": kind, "pid": os.getpid(), "time": time.time(), "problems": problems})
    )
    os.replace(tmp, target)


def remove(settings: Settings, name: str) -> None:
    path(settings, name).unlink(missing_ok=True)


def check(settings: Settings, kind: str, name: str | None = None) -> list[str]:
    """What is wrong with the worker `name` (default: this host's worker of `kind`); empty when healthy."""
    name = name or default_name(kind)
    try:
        report = json.loads(path(settings, name).read_text())
    except (OSError, ValueError):
        return [f"no health file for {name} at {path(settings, name)}: not started, or stopped"]
    problems = list(report.get("problems", []))
    age, limit = time.time() - report.get("time", 0), max(30.0, 3 * settings.heartbeat_s)
    if age > limit:
        problems.append(f"the heartbeat of {name} is {age:.0f}s old (limit {limit:.0f}s)")
    if report.get("kind") != kind:
        problems.append(f"{name} is a {report.get('kind')}, not a {kind}")
    return problems
