"""The `prefq` command. Client commands talk HTTP to the API (--api-url or PREFQ_API_URL); every command that
lists or shows takes `--json`. Imports stay light (no Celery, no torch): `prefq --help` must be quick."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import typer

from cli import chat, dev, evals, keys, models, procs
from cli.client import Client, ClientError
from cli.config import client, state
from cli.console import JSON_OPTION, console, fail, print_json, print_table, wait_with_progress
from training.spec import DATA_KINDS

app = typer.Typer(help="prefq: preference training (DPO, SFT) on your own GPU pool.", no_args_is_help=True)
app.add_typer(keys.keys_app, name="keys")
app.add_typer(models.models_app, name="models")
app.add_typer(evals.evals_app, name="evals")
app.add_typer(procs.procs_app)
app.add_typer(dev.dev_app)
app.command()(models.samples)
app.command("export")(models.export_model)
app.command()(chat.chat)


@app.callback()
def main(api_url: str = typer.Option(None, help="API base URL [env PREFQ_API_URL]")) -> None:
    state["api_url"] = api_url


def parse_since(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text.strip())
    if not match:
        fail(f"--since: expected a duration like 30m, 1h or 2d, got {text!r}")
    seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return time.time() - seconds


def parse_sets(pairs: list[str]) -> dict:
    """`key=value` (value as JSON where it parses, else a string); dotted keys nest: `lora.r=8`."""
    out: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            fail(f"--set: expected key=value, got {pair!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _dataset_ref(c: Client, ref: str, method: str) -> str:
    path = Path(ref)
    if not path.is_file():
        return ref
    kinds = DATA_KINDS.get(method, (method,))
    ds = c.upload_dataset(path, kinds[0] if len(kinds) == 1 else None)  # kto takes its own rows or pairs: detected
    chat = (
        f", {ds['tool_examples']} with tools, {ds['untrained_messages']} weight-0 answers"
        if ds["tool_examples"] or ds["untrained_messages"]
        else ""
    )
    console.print(f"dataset {ds['id']}: {ds['rows']} rows, {ds['format']}{chat}, {ds['warning_count']} warning(s)")
    return ds["id"]


def _json_arg(value: str, option: str):
    """JSON from a file, or the value itself as JSON."""
    text = Path(value).read_text() if Path(value).is_file() else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"{option}: not JSON ({exc.msg}, line {exc.lineno} column {exc.colno})")


def row(job: dict) -> str:
    acc = job["eval_metrics"].get("eval_rewards/accuracies")
    extra = f" eval reward accuracy {acc:.3f}" if acc is not None else ""
    if (reward := job["eval_metrics"].get("eval_reward")) is not None:  # GRPO: its grader's mean score
        extra = f" eval reward {reward:.3f}"
    return f"{job['id']} {job['status']} step {job['step']}/{job['total_steps'] or '?'}{extra}"


@app.command()
def submit(
    dataset: str = typer.Argument(..., help="A JSONL file (uploaded first), a dataset id or a storage URI"),
    model: str = typer.Option(
        ...,
        help="Base model: a folder the workers can read, a storage URI, a hub id "
        "(org/name@rev), or a succeeded job's id or fine-tuned model name",
    ),
    method: str = typer.Option(
        ...,
        help="dpo, orpo, simpo, reward (preference pairs), kto (labelled answers or pairs), sft, or grpo "
        "(prompts, scored by --grader)",
    ),
    grader: str = typer.Option(
        None, help="grpo: the grader, OpenAI's JSON, in a file or inline (`POST /graders/validate` checks one)"
    ),
    trainer: str = typer.Option("basic", help="basic, fsdp or deepspeed-tp"),
    gpus: int = typer.Option(1, help="Devices of the job, of each node (0: a CPU worker)"),
    nodes: int = typer.Option(1, help="Nodes the job spans (fsdp, deepspeed-tp), on the server's Ray cluster"),
    eval_dataset: str = typer.Option(None, "--eval", help="Held-out data: a file, dataset id or URI"),
    sets: list[str] = typer.Option([], "--set", help="A hyperparameter, key=value (repeatable)"),
    callback_url: str = typer.Option(None, help="POSTed the finished job, HMAC-signed"),
    idempotency_key: str = typer.Option(
        None, help="Repeat-safe submission key (default: a fresh one, kept for this command's own retries)"
    ),
    wait: bool = typer.Option(False, "--wait", help="Show a live progress bar until the job finishes"),
    then: tuple[str, str] | None = typer.Option(
        None,
        "--then",
        metavar="METHOD DATA",
        help="A second job on this one's model once it has succeeded, e.g. "
        "`--then dpo pairs.jsonl` after an SFT job (the --set values apply to both)",
    ),
) -> None:
    """Queue a training job; prints its id first. With --then, waits for it, then queues the second job."""
    c = client()
    if then and then[0] not in DATA_KINDS:
        fail(f"--then: the method is one of {', '.join(DATA_KINDS)}, not {then[0]!r}")
    try:
        job = {
            "model": str(Path(model).resolve()) if Path(model).is_dir() else model,
            "dataset": _dataset_ref(c, dataset, method),
            "method": method,
            "trainer": trainer,
            "gpus": gpus,
            "nodes": nodes,
            "hyperparameters": parse_sets(sets),
        }
        if grader:
            job["hyperparameters"]["grader"] = _json_arg(grader, "--grader")
        if eval_dataset:
            job["eval_dataset"] = _dataset_ref(c, eval_dataset, method)
        if callback_url:
            job["callback_url"] = callback_url
        second = _dataset_ref(c, then[1], then[0]) if then else None  # a bad file fails before anything runs
        created = c.submit(job, idempotency_key)
        console.print(created["id"])
        for warning in created.get("warnings", []):
            console.print(f"[yellow]warning:[/yellow] {warning}")
        if second:
            created = _then(c, job, created["id"], then[0], second, idempotency_key)
        if not wait:
            return
        final = wait_with_progress(c, created["id"])
    except ClientError as exc:
        fail(str(exc))
    console.print(row(final))
    if final["status"] != "succeeded":
        fail(f"{final['error']['code']}: {final['error']['message']}" if final["error"] else final["status"])
    console.print(f"model: {final['result_uri']}")


def _then(c: Client, job: dict, first_id: str, method: str, dataset: str, idempotency_key: str | None) -> dict:
    """The pipeline's second job: on the first one's model (its reference model too, for DPO), linked to it by the
    metadata `pipeline_after`, once the first has succeeded."""
    first = wait_with_progress(c, first_id)
    console.print(row(first))
    if first["status"] != "succeeded":
        fail(f"{first_id} {first['status']}: the --then job is not queued")
    second = {**job, "model": first_id, "method": method, "dataset": dataset, "metadata": {"pipeline_after": first_id}}
    second.pop("eval_dataset", None)
    created = c.submit(second, f"{idempotency_key}-then" if idempotency_key else None)
    console.print(created["id"])
    return created


@app.command()
def status(job_id: str, as_json: bool = JSON_OPTION) -> None:
    """A job, as JSON (--json: without colour or layout)."""
    try:
        job = client().job(job_id)
    except ClientError as exc:
        fail(str(exc))
    if as_json:
        print_json(job)
    else:
        console.print_json(json.dumps(job))


@app.command("list")
def list_jobs(
    status: str = typer.Option(None, help="queued, running, cancelling, succeeded, failed, cancelled"),
    since: str = typer.Option(None, help="Created within, e.g. 1h"),
    limit: int = typer.Option(50),
    as_json: bool = JSON_OPTION,
) -> None:
    """Jobs, newest first (--json: an array of the API's job objects)."""
    found = []
    try:
        for job in client().jobs(status, parse_since(since) if since else None):
            if len(found) == limit:
                break
            found.append(job)
    except ClientError as exc:
        fail(str(exc))
    if as_json:
        print_json(found)
        return
    rows = [
        (
            j["id"],
            j["status"],
            j["method"],
            j["trainer"],
            str(j["gpus"]),
            f"{j['step']}/{j['total_steps'] or '?'}",
            j["error"]["code"] if j["error"] else "",
        )
        for j in found
    ]
    print_table(("id", "status", "method", "trainer", "gpus", "step", "error"), rows)


@app.command()
def events(
    job_id: str, follow: bool = typer.Option(False, "--follow", "-f"), after: int = 0, as_json: bool = JSON_OPTION
) -> None:
    """A job's events, one JSON object per line; --follow streams them until the job ends. --json: the events as
    one JSON array (not with --follow)."""
    if as_json and follow:
        fail("--json prints one array at the end: use --follow alone for a stream of JSON lines")
    c = client()
    try:
        stream = c.stream_events(job_id, after) if follow else c.events(job_id, after)["data"]
        if as_json:
            print_json(list(stream))
            return
        for event in stream:
            print(json.dumps(event), flush=True)
    except ClientError as exc:
        fail(str(exc))


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a job (a running one stops at its next heartbeat, after saving a checkpoint)."""
    try:
        console.print(row(client().request("POST", f"/jobs/{job_id}/cancel")))
    except ClientError as exc:
        fail(str(exc))


@app.command()
def retry(
    job_id: str = typer.Argument(None),
    failed: bool = typer.Option(False, "--failed", help="Every failed job"),
    since: str = typer.Option(None, help="With --failed: created within, e.g. 1h"),
) -> None:
    """Run a failed or cancelled job again, resuming from its newest checkpoint."""
    if bool(job_id) == failed:
        fail("give a job id or --failed")
    c = client()
    try:
        ids = [job_id] if job_id else [j["id"] for j in c.jobs("failed", parse_since(since) if since else None)]
        for jid in ids:
            console.print(row(c.request("POST", f"/jobs/{jid}/retry")))
    except ClientError as exc:
        fail(str(exc))


@app.command()
def download(job_id: str, out_dir: Path, checkpoint: int = typer.Option(None, help="A checkpoint's step")) -> None:
    """Download the trained model (or a checkpoint) into a folder."""
    c = client()
    try:
        if checkpoint is None:
            files = c.request("GET", f"/jobs/{job_id}/model")["files"]
        else:
            found = [ck for ck in c.request("GET", f"/jobs/{job_id}/checkpoints")["data"] if ck["step"] == checkpoint]
            if not found:
                fail(f"job {job_id} has no complete checkpoint at step {checkpoint}")
            files = found[0]["files"]
        c.download(files, out_dir)
    except ClientError as exc:
        fail(str(exc))
    console.print(f"{len(files)} files in {out_dir}")


@app.command()
def workers(as_json: bool = JSON_OPTION) -> None:
    """The worker pool: devices, current job, last heartbeat (--json: the API's array)."""
    try:
        data = client().request("GET", "/workers")["data"]
    except ClientError as exc:
        fail(str(exc))
    if as_json:
        print_json(data)
        return
    rows = []
    for w in data:
        inv = w["inventory"]
        gpus = ", ".join(f"{g['name']} {g['memory_mib']} MiB" for g in inv.get("gpus", []))
        desc = gpus or f"CPU x{inv.get('cpu_devices', 0)} ({inv.get('cpu_count')} cores, {inv.get('memory_gib')} GiB)"
        rows.append(
            (
                w["name"],
                "yes" if w["live"] else "no",
                str(w["devices"]),
                desc,
                ",".join(w["queues"]),
                w["current_job_id"] or "-",
                f"{time.time() - w['last_heartbeat']:.0f}s ago",
            )
        )
    print_table(
        ("name", "live", "devices", "inventory", "queues", "current job", "heartbeat"),
        rows,
        ids=("name", "current job"),
    )


if __name__ == "__main__":
    app()
