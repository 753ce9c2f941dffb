"""`prefq models ...`: the model registry through the API (`/models`); `prefq samples JOB`; `prefq export JOB DIR`."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer

from cli.client import Client, ClientError
from cli.config import call, client
from cli.console import JSON_OPTION, console, fail, print_json, print_table

models_app = typer.Typer(
    help="The model registry: promote a job's model, list versions, set aliases.", no_args_is_help=True
)


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
    require: list[str] = typer.Option(
        [], "--require", help="METRIC=MIN: a minimum of the model's newest evaluation run (repeatable)"
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Register a succeeded job's model (final, --checkpoint N, or --best) as the next version of NAME."""
    body = {"job_id": job_id, "aliases": alias, "description": description, "checkpoint": checkpoint, "best": best}
    try:
        body["require"] = {k: float(v) for k, v in (r.split("=", 1) for r in require)}
    except ValueError:
        fail(f"--require: give METRIC=MIN, e.g. eval_win_rate=0.55; got {require}")
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
    data = call("GET", "/models")["data"]
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
    m = call("GET", f"/models/{name}")
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
    m = call("PUT", f"/models/{name}/aliases/{alias}", json={"version": version})
    console.print(f"{m['name']}@{alias} → version {m['aliases'][alias]}")


@models_app.command("unalias")
def delete_alias(name: str, alias: str) -> None:
    """Remove ALIAS from NAME."""
    call("DELETE", f"/models/{name}/aliases/{alias}", expected=(204,))
    console.print(f"{name}@{alias} removed")


def samples(
    job_id: str, step: int = typer.Option(None, help="Only this evaluation step"), as_json: bool = JSON_OPTION
) -> None:
    """A job's sample generations at each evaluation: the policy's, and the reference's once (--json: the API's
    array, one object per evaluation)."""
    data = call("GET", f"/jobs/{job_id}/samples")["data"]
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


def export_model(
    job_id: str,
    out_dir: Path,
    checkpoint: int = typer.Option(None, help="A checkpoint's step; none: the final model"),
    fmt: str = typer.Option(
        "merged", "--format", help="merged (from_pretrained loads it), adapter (PEFT's, LoRA jobs), hf (as stored)"
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Export the trained model (or a checkpoint) into a folder, with a model card (README.md)."""
    params = {"format": fmt} | ({"checkpoint": checkpoint} if checkpoint is not None else {})
    c = client()
    try:
        found = c.request("GET", f"/jobs/{job_id}/export", params=params)
        out_dir.mkdir(parents=True, exist_ok=True)
        if found["merge"] is None:
            c.download(found["files"], out_dir)
        else:
            merge_into_base(c, found, out_dir)
    except ClientError as exc:
        fail(str(exc))
    if found["format"] == "adapter":  # the base as the job names it, not the worker's folder it was trained from
        config = out_dir / "adapter_config.json"
        config.write_text(
            json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": found["base_model"]})
        )
    (out_dir / "README.md").write_text(found["model_card"])
    if as_json:
        print_json({k: found[k] for k in ("job_id", "format", "checkpoint", "fine_tuned_model", "base_model")})
    else:
        console.print(f"{found['fine_tuned_model']} ({found['format']}) in {out_dir}")


def merge_into_base(c: Client, found: dict, out_dir: Path) -> None:
    """A LoRA checkpoint as a merged model: the adapter and the base downloaded, merged by PEFT in a process of its
    own (`python -m training merge`: this process imports no torch)."""
    with tempfile.TemporaryDirectory(prefix="prefq-export-") as tmp:
        adapter = Path(tmp) / "adapter"
        c.download(found["files"], adapter)
        merge = found["merge"]
        base, revision = merge.get("hub"), merge.get("revision")
        if merge.get("files") is not None:
            base = str(Path(tmp) / "base")
            c.download(merge["files"], Path(base))
        cmd = [sys.executable, "-m", "training", "merge", base, str(adapter), str(out_dir)]
        done = subprocess.run(cmd + (["--revision", revision] if revision else []), capture_output=True, text=True)
        if done.returncode != 0:
            raise ClientError(f"merging the adapter into {base} failed: {done.stderr.strip()[-2000:]}")
