"""`prefq evals ...`: evaluations through the API (`/evals`): create one from testing criteria, run it on a model
(and a baseline) on the queue, list its runs, and show a run's results and its judged rows."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cli.client import Client, ClientError
from cli.config import call, client
from cli.console import JSON_OPTION, console, fail, print_json, print_table, wait_with_progress

evals_app = typer.Typer(
    help="Evaluations: criteria (graders, reference metrics, a pairwise judge) run on models.", no_args_is_help=True
)


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else "-"


@evals_app.command("create")
def create(
    criteria: Path = typer.Argument(..., help="A JSON file: the list of testing criteria", exists=True),
    name: str = typer.Option(..., "--name", help="The evaluation's name"),
    as_json: bool = JSON_OPTION,
) -> None:
    """An evaluation from a file of testing criteria (OpenAI's graders; reference_metrics, preference, pairwise)."""
    try:
        testing = json.loads(criteria.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        fail(f"{criteria}: {exc}")
    found = call("POST", "/evals", json={"name": name, "testing_criteria": testing})
    if as_json:
        print_json(found)
        return
    console.print(f"{found['id']}: {found['name']}, {len(found['testing_criteria'])} criteria")


@evals_app.command("list")
def list_evals(as_json: bool = JSON_OPTION) -> None:
    """The tenant's evaluations."""
    data = call("GET", "/evals")["data"]
    if as_json:
        print_json(data)
        return
    rows = [(e["id"], e["name"], ", ".join(c.get("name") or c["type"] for c in e["testing_criteria"])) for e in data]
    print_table(("id", "name", "criteria"), rows)


@evals_app.command("run")
def run(
    eval_id: str,
    model: str = typer.Option(..., "--model", help="The model evaluated: a job id, a fine-tuned or registered name"),
    data: str = typer.Option(..., "--data", help="A JSONL file (uploaded first), a dataset id or a storage URI"),
    baseline: str = typer.Option(None, "--baseline", help="A second model, judged against --model"),
    max_samples: int = typer.Option(None, "--max-samples", help="Rows evaluated at most"),
    max_tokens: int = typer.Option(None, "--max-tokens", help="New tokens of each answer"),
    gpus: int = typer.Option(1, "--gpus", help="Devices of the run; 0: a CPU worker"),
    name: str = typer.Option(None, "--name", help="The run's name"),
    wait: bool = typer.Option(False, "--wait", help="Follow the run to its end and show its results"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Queue a run of EVAL_ID on --model (and --baseline) over --data."""
    c = client()
    try:
        source = _data(c, data)
    except ClientError as exc:
        fail(str(exc))
    params = {"max_completions_tokens": max_tokens} if max_tokens else {}
    data_source = {"type": "completions", "model": model, "source": {"type": "file_id", "id": source}}
    data_source |= {"baseline": baseline, "max_samples": max_samples, "gpus": gpus, "sampling_params": params}
    body = {"name": name, "data_source": {k: v for k, v in data_source.items() if v is not None}}
    created = call("POST", f"/evals/{eval_id}/runs", json=body)
    if not wait:
        print_json(created) if as_json else console.print(f"{created['id']} {created['status']}")
        return
    final = wait_with_progress(c, created["id"])
    show(eval_id, created["id"], as_json=as_json)
    if final["status"] != "succeeded":
        raise typer.Exit(1)


def _data(c: Client, ref: str) -> str:
    path = Path(ref)
    if not path.is_file():
        return ref
    ds = c.upload_dataset(path, None)
    console.print(f"dataset {ds['id']}: {ds['rows']} rows, {ds['format']}")
    return ds["id"]


@evals_app.command("runs")
def runs(eval_id: str, as_json: bool = JSON_OPTION) -> None:
    """The evaluation's runs, newest first."""
    data = call("GET", f"/evals/{eval_id}/runs")["data"]
    if as_json:
        print_json(data)
        return
    rows = []
    for r in data:
        metrics = r["prefq"]["metrics"] or {}
        rows.append((r["id"], r["name"], r["status"], r["model"], _number(metrics.get("eval_win_rate"))))
    print_table(("id", "name", "status", "model", "win rate"), rows)


@evals_app.command("show")
def show(eval_id: str, run_id: str, as_json: bool = JSON_OPTION) -> None:
    """A run's results: each model's metrics, the win rate with its interval, and the criteria's pass counts."""
    found = call("GET", f"/evals/{eval_id}/runs/{run_id}")
    if as_json:
        print_json(found)
        return
    summary = found["prefq"]["results"]
    console.print(f"{found['id']} {found['status']}: {found['model']} on {found['data_source']['source']['id']}")
    if found["error"]:
        fail(f"{found['error']['code']}: {found['error']['message']}")
    if not summary:
        return
    baseline = summary.get("baseline") or {}
    names = sorted({*summary["model"], *baseline})
    print_table(
        ("metric", "model", "baseline"),
        [(n, _number(summary["model"].get(n)), _number(baseline.get(n))) for n in names],
        ids=("metric",),
    )
    if (pairwise := summary.get("pairwise")) and pairwise.get("interval"):
        low, high = pairwise["interval"]
        console.print(
            f"win rate {pairwise['win_rate']:.3f} [95%: {low:.3f}, {high:.3f}] against {found['data_source']['baseline']}"
            f" (judge {pairwise['judge']}): {pairwise['wins']} won, {pairwise['ties']} tied, {pairwise['losses']} lost"
        )
    for c in found["per_testing_criteria_results"]:
        console.print(f"{c['testing_criteria']}: {c['passed']} passed, {c['failed']} failed")


@evals_app.command("items")
def items(eval_id: str, run_id: str, limit: int = typer.Option(20, "--limit"), as_json: bool = JSON_OPTION) -> None:
    """A run's rows: the answers, their grades and the judge's verdicts."""
    data = call("GET", f"/evals/{eval_id}/runs/{run_id}/output_items", params={"limit": limit})["data"]
    if as_json:
        print_json(data)
        return
    rows = []
    for item in data:
        mine = item["prefq"]
        verdicts = " / ".join(v["verdict"] or "?" for v in mine.get("judge") or [])
        answers = mine["answers"]
        rows.append(
            (str(item["datasource_item_id"]), answers["model"][:40], (answers.get("baseline") or "")[:40], verdicts)
        )
    print_table(("#", "model", "baseline", "judge"), rows, ids=("#",))
