"""What the deployment files are compared with, read from the code: settings, queues and the `prefq` commands.

Nothing here is a copy of a list kept elsewhere: a setting added to `settings.Settings` or an option added
to the CLI is known to deploy/check at once.
"""

from __future__ import annotations

import re

import typer
from pydantic import ValidationError

import queue_config
from cli.app import app
from queue_config import SERVICE_QUEUE, gpu_queue
from settings import Settings

SETTINGS = {f"PREFQ_{name.upper()}": name for name in Settings.model_fields}
# Queue name -> devices of its jobs, as queue_config names them.
QUEUE_DEVICES = {gpu_queue(n): n for n in range(0, 257)}
KNOWN_QUEUES = set(QUEUE_DEVICES) | {SERVICE_QUEUE}


class Problems:
    """Every problem found, each naming the file or object and what is wrong."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")


def check_settings(env: dict[str, str], where: str, problems: Problems) -> None:
    """Every PREFQ_* variable is a field of Settings, and its value is one that Settings accepts."""
    values = {}
    for name, value in env.items():
        if not name.startswith("PREFQ_"):
            continue
        if name not in SETTINGS:
            problems.add(where, f"{name} is not a setting: settings.Settings has no field {name[6:].lower()!r}")
            continue
        values[SETTINGS[name]] = re.sub(r"\$\(\w+\)", "x", value)  # $(VAR) is expanded by Kubernetes
    try:
        Settings.model_validate(values)
    except ValidationError as exc:
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            problems.add(where, f"PREFQ_{field.upper()}={values.get(field)!r} is not valid: {error['msg']}")


class CommandRefused(ValueError):
    """The CLI would refuse this command line."""


def parse_command(argv: list[str]) -> tuple[str, dict]:
    """`prefq ARGV` as the CLI parses it: ("worker", {"gpus": "0", "service": False, ...}), defaults included."""
    argv = ["pod-1" if a.startswith("$(") else a for a in argv]  # $(VAR) is expanded by Kubernetes
    command = typer.main.get_command(app)
    ctx = typer.Context(command, info_name="prefq")
    names: list[str] = []
    while isinstance(command, typer.core.TyperGroup):
        if not argv or argv[0].startswith("-"):
            raise CommandRefused(f"expected a command of `prefq {' '.join(names)}`, got {argv[:1]}")
        name, *argv = argv
        sub = command.get_command(ctx, name)
        if sub is None:
            raise CommandRefused(f"no such command: prefq {' '.join([*names, name])}")
        names.append(name)
        command, ctx = sub, typer.Context(sub, info_name=name, parent=ctx)
    try:
        leaf = command.make_context(names[-1], argv, parent=ctx.parent)
    except Exception as exc:  # the CLI's own usage errors, as the CLI words them
        raise CommandRefused(exc.format_message() if hasattr(exc, "format_message") else str(exc)) from exc
    return " ".join(names), leaf.params


def worker_queues(params: dict, env: dict[str, str]) -> list[str]:
    """The queues of a `prefq worker` with these options and this environment (what `prefq worker` computes)."""
    if params["service"]:
        return [SERVICE_QUEUE]
    gpus = params["gpus"] if params["gpus"] is not None else env.get("PREFQ_GPUS", "")
    cpu_devices = params["cpu_devices"] if params["cpu_devices"] is not None else env.get("PREFQ_CPU_DEVICES", 0)
    return queue_config.worker_queues(Settings.model_validate({"gpus": gpus, "cpu_devices": cpu_devices}))


def data_dir(env: dict[str, str]) -> str:
    return str(Settings.model_validate({"data_dir": env.get("PREFQ_DATA_DIR", ".prefq")}).data_dir)
