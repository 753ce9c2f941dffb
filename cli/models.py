"""`prefq models ...`: the model registry through the API (`/models`), and `prefq samples JOB`."""

from __future__ import annotations

import json
import time

import typer
from rich.table import Table

from cli.client import ClientError
from cli.config import client
from cli.console import console, fail

models_app = typer.Typer(help="The model registry: promote a job's model, list versions, set aliases.",
                         no_args_is_help=True)  # fmt: skip


def _call(method: str, path: str, **kwargs) -> dict:
    try:
        return client().request(method, path, **kwargs)
    except ClientError as exc:
        fail(str(exc))


def _metric(metrics: dict, name: str) -> str:
    value = (metrics.get("eval") or {}).get(name)
    return f"{value:.4g}" if isinstance(value, int | float) else "-"


@models_app.command("promote")
def promote(job_id: str, name: str = typer.Option(..., "--name", help="The registered model's name"),
            alias: list[str] = typer.Option([], "--alias", help="Point this alias at the new version (repeatable)"),
            description: str = typer.Option(None, help="What this version is")) -> None:  # fmt: skip
    """Register a succeeded job's model as the next version of NAME."""
    body = {"job_id": job_id, "aliases": alias, "description": description}
    v = _call("POST", f"/models/{name}/versions", json=body)
    aliases = f" ({', '.join(v['aliases'])})" if v["aliases"] else ""
    console.print(f"{v['name']} version {v['version']}{aliases}: {v['model']} from {v['job_id']}")


@models_app.command("list")
def list_models() -> None:
    """The tenant's registered models."""
    table = Table("name", "latest", "aliases", "updated")
    for m in _call("GET", "/models")["data"]:
        aliases = ", ".join(f"{a}→{n}" for a, n in sorted(m["aliases"].items()))
        table.add_row(m["name"], str(m["latest_version"] or "-"), aliases,
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(m["updated_at"])))  # fmt: skip
    console.print(table)


@models_app.command("show")
def show(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """A registered model's versions with their metrics and aliases."""
    m = _call("GET", f"/models/{name}")
    if as_json:
        print(json.dumps(m, indent=1))
        return
    table = Table("version", "aliases", "job", "method", "base", "eval loss", "eval reward acc.", "model")
    for v in m["versions"]:
        table.add_row(str(v["version"]), ", ".join(v["aliases"]), v["job_id"], v["method"], v["base_model"],
                      _metric(v["metrics"], "eval_loss"), _metric(v["metrics"], "eval_rewards/accuracies"),
                      v["model"])  # fmt: skip
    console.print(table)


@models_app.command("alias")
def set_alias(name: str, alias: str, version: int) -> None:
    """Point ALIAS (e.g. production) of NAME at VERSION."""
    m = _call("PUT", f"/models/{name}/aliases/{alias}", json={"version": version})
    console.print(f"{m['name']}@{alias} → version {m['aliases'][alias]}")


@models_app.command("unalias")
def delete_alias(name: str, alias: str) -> None:
    """Remove ALIAS from NAME."""
    _call("DELETE", f"/models/{name}/aliases/{alias}", expected=(204,))
    console.print(f"{name}@{alias} removed")


def samples(job_id: str, step: int = typer.Option(None, help="Only this evaluation step"),
            as_json: bool = typer.Option(False, "--json")) -> None:
    """A job's sample generations at each evaluation: the policy's, and the reference's once."""
    data = _call("GET", f"/jobs/{job_id}/samples")["data"]
    if step is not None:
        data = [d for d in data if d["step"] == step]
    if as_json:
        print(json.dumps(data, indent=1))
        return
    table = Table("step", "model", "#", "tokens", "reward", "completion")
    for at in data:
        for s in at["samples"]:
            reward = f"{s['reward']:.3f}" if s["reward"] is not None else "-"
            table.add_row(str(at["step"]), at["model"], str(s["index"]), str(s["tokens"]), reward,
                          s["completion"].replace("\n", "⏎")[:120])  # fmt: skip
    console.print(table)
