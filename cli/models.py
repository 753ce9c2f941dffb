"""`prefq models ...`: the model registry through the API (`/models`), and `prefq samples JOB`."""

from __future__ import annotations

import time

import typer

from cli.client import ClientError
from cli.config import client
from cli.console import JSON_OPTION, console, fail, print_json, print_table

models_app = typer.Typer(
    help="The model registry: promote a job's model, list versions, set aliases.", no_args_is_help=True
)


def _call(method: str, path: str, **kwargs) -> dict:
    try:
        return client().request(method, path, **kwargs)
    except ClientError as exc:
        fail(str(exc))


def _metric(metrics: dict, name: str) -> str:
    value = (metrics.get("eval") or {}).get(name)
    return f"{value:.4g}" if isinstance(value, int | float) else "-"


@models_app.command("promote")
def promote(
    job_id: str,
    name: str = typer.Option(..., "--name", help="The registered model's name"),
    alias: list[str] = typer.Option([], "--alias", help="Point this alias at the new version (repeatable)"),
    description: str = typer.Option(None, help="What this version is"),
    checkpoint: int = typer.Option(None, "--checkpoint", help="The job's checkpoint at this step, not its final model"),
    best: bool = typer.Option(False, "--best", help="The model of the job's best evaluation (its best_metric)"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Register a succeeded job's model (final, --checkpoint N, or --best) as the next version of NAME."""
    body = {"job_id": job_id, "aliases": alias, "description": description, "checkpoint": checkpoint, "best": best}
    try:
        v = client().create(f"/models/{name}/versions", body=lambda: {"json": body})
    except ClientError as exc:
        fail(str(exc))
    if as_json:
        print_json(v)
        return
    aliases = f" ({', '.join(v['aliases'])})" if v["aliases"] else ""
    console.print(f"{v['name']} version {v['version']}{aliases}: {v['model']} from {v['job_id']}")


@models_app.command("list")
def list_models(as_json: bool = JSON_OPTION) -> None:
    """The tenant's registered models (--json: the API's array)."""
    data = _call("GET", "/models")["data"]
    if as_json:
        print_json(data)
        return
    rows = [
        (
            m["name"],
            str(m["latest_version"] or "-"),
            ", ".join(f"{a}→{n}" for a, n in sorted(m["aliases"].items())),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(m["updated_at"])),
        )
        for m in data
    ]
    print_table(("name", "latest", "aliases", "updated"), rows, ids=("name",))


@models_app.command("show")
def show(name: str, as_json: bool = JSON_OPTION) -> None:
    """A registered model's versions with their metrics and aliases (--json: the API's object)."""
    m = _call("GET", f"/models/{name}")
    if as_json:
        print_json(m)
        return
    rows = [
        (
            str(v["version"]),
            ", ".join(v["aliases"]),
            v["job_id"],
            v["method"],
            v["base_model"],
            _metric(v["metrics"], "eval_loss"),
            _metric(v["metrics"], "eval_rewards/accuracies"),
            v["model"],
        )
        for v in m["versions"]
    ]
    print_table(
        ("version", "aliases", "job", "method", "base", "eval loss", "eval reward acc.", "model"), rows, ids=("job",)
    )


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


def samples(
    job_id: str, step: int = typer.Option(None, help="Only this evaluation step"), as_json: bool = JSON_OPTION
) -> None:
    """A job's sample generations at each evaluation: the policy's, and the reference's once (--json: the API's
    array, one object per evaluation)."""
    data = _call("GET", f"/jobs/{job_id}/samples")["data"]
    if step is not None:
        data = [d for d in data if d["step"] == step]
    if as_json:
        print_json(data)
        return
    rows = [
        (
            str(at["step"]),
            at["model"],
            str(s["index"]),
            str(s["tokens"]),
            f"{s['reward']:.3f}" if s["reward"] is not None else "-",
            s["completion"].replace("\n", "⏎")[:120],
        )
        for at in data
        for s in at["samples"]
    ]
    print_table(("step", "model", "#", "tokens", "reward", "completion"), rows, ids=())
