"""The `prefq` command. Client commands talk HTTP to the API (--api-url or PREFQ_API_URL)."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from api import chat_cli, clientconfig
from api.client import Client, ClientError
from api.keys_cli import keys_app
from api.models_cli import models_app, samples
from queue_config import Settings

app = typer.Typer(help="prefq: preference training (DPO, SFT) on your own GPU pool.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")
app.command()(samples)
app.command()(chat_cli.chat)
console = Console(width=None if sys.stdout.isatty() else 250)  # piped output: no truncated tables
state: dict = {}
FINISHED = {"succeeded", "failed", "cancelled"}


@app.callback()
def main(api_url: str = typer.Option(None, help="API base URL [env PREFQ_API_URL]")) -> None:
    state["api_url"] = api_url


def client() -> Client:
    """The API client: --api-url, else PREFQ_API_URL, else the config file's; the key from PREFQ_API_KEY, else
    the config file (which `prefq dev` writes)."""
    settings, saved = Settings(), clientconfig.read()
    url = state.get("api_url") or (settings.api_url if "api_url" in settings.model_fields_set else None)
    key = settings.api_key.get_secret_value() if settings.api_key else saved.get("api_key")
    return Client(url or saved.get("api_url") or settings.api_url, key)


def fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


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
    ds = c.upload_dataset(path, method)
    console.print(f"dataset {ds['id']}: {ds['rows']} rows, {ds['format']}, {ds['warning_count']} warning(s)")
    return ds["id"]


def _row(job: dict) -> str:
    acc = job["eval_metrics"].get("eval_rewards/accuracies")
    extra = f" eval reward accuracy {acc:.3f}" if acc is not None else ""
    return f"{job['id']} {job['status']} step {job['step']}/{job['total_steps'] or '?'}{extra}"


def wait_with_progress(c: Client, job_id: str) -> dict:
    """A live bar with step/total, loss, reward accuracy and time left, until the job finishes."""
    columns = [TextColumn("[bold]{task.fields[status]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}"), TimeRemainingColumn()]  # fmt: skip
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("job", total=None, status="queued", loss="-", acc="-")
        while True:
            job = c.job(job_id)
            m = job["metrics"]
            acc = m.get("rewards/accuracies", m.get("mean_token_accuracy"))
            bar.update(task, total=job["total_steps"], completed=job["step"], status=job["status"],
                       loss=f"{m['loss']:.4f}" if m.get("loss") is not None else "-",
                       acc=f"{acc:.2f}" if acc is not None else "-")  # fmt: skip
            if job["status"] in FINISHED:
                return job
            time.sleep(1.0)


@app.command()
def submit(
    dataset: str = typer.Argument(..., help="A JSONL file (uploaded first), a dataset id or a storage URI"),
    model: str = typer.Option(..., help="Base model: a folder the workers can read, a storage URI, a hub id "
                              "(org/name@rev), or a succeeded job's id or fine-tuned model name"),
    method: str = typer.Option(..., help="dpo or sft"),
    trainer: str = typer.Option("basic", help="basic, fsdp or deepspeed-tp"),
    gpus: int = typer.Option(1, help="Devices of the job (0: a CPU worker)"),
    eval_dataset: str = typer.Option(None, "--eval", help="Held-out data: a file, dataset id or URI"),
    sets: list[str] = typer.Option([], "--set", help="A hyperparameter, key=value (repeatable)"),
    callback_url: str = typer.Option(None, help="POSTed the finished job, HMAC-signed"),
    idempotency_key: str = typer.Option(None, help="Repeat-safe submission key"),
    wait: bool = typer.Option(False, "--wait", help="Show a live progress bar until the job finishes"),
    then: tuple[str, str] | None = typer.Option(None, "--then", metavar="METHOD DATA",
                                         help="A second job on this one's model once it has succeeded, e.g. "
                                         "`--then dpo pairs.jsonl` after an SFT job (the --set values apply to both)"),
) -> None:
    """Queue a training job; prints its id first. With --then, waits for it, then queues the second job."""
    c = client()
    if then and then[0] not in ("dpo", "sft"):
        fail(f"--then: the method is dpo or sft, not {then[0]!r}")
    try:
        job = {"model": str(Path(model).resolve()) if Path(model).is_dir() else model,
               "dataset": _dataset_ref(c, dataset, method), "method": method, "trainer": trainer, "gpus": gpus,
               "hyperparameters": parse_sets(sets)}  # fmt: skip
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
    console.print(_row(final))
    if final["status"] != "succeeded":
        fail(f"{final['error']['code']}: {final['error']['message']}" if final["error"] else final["status"])
    console.print(f"model: {final['result_uri']}")


def _then(c: Client, job: dict, first_id: str, method: str, dataset: str, idempotency_key: str | None) -> dict:
    """The pipeline's second job: on the first one's model (its reference model too, for DPO), linked to it by the
    metadata `pipeline_after`, once the first has succeeded."""
    first = wait_with_progress(c, first_id)
    console.print(_row(first))
    if first["status"] != "succeeded":
        fail(f"{first_id} {first['status']}: the --then job is not queued")
    second = {**job, "model": first_id, "method": method, "dataset": dataset, "metadata": {"pipeline_after": first_id}}
    second.pop("eval_dataset", None)
    created = c.submit(second, f"{idempotency_key}-then" if idempotency_key else None)
    console.print(created["id"])
    return created


@app.command()
def status(job_id: str) -> None:
    """A job, as JSON."""
    try:
        console.print_json(json.dumps(client().job(job_id)))
    except ClientError as exc:
        fail(str(exc))


@app.command("list")
def list_jobs(status: str = typer.Option(None, help="queued, running, cancelling, succeeded, failed, cancelled"),
              since: str = typer.Option(None, help="Created within, e.g. 1h"),
              limit: int = typer.Option(50)) -> None:  # fmt: skip
    """Jobs, newest first."""
    table = Table("id", "status", "method", "trainer", "gpus", "step", "error")
    try:
        for i, job in enumerate(client().jobs(status, parse_since(since) if since else None)):
            if i == limit:
                break
            err = job["error"]["code"] if job["error"] else ""
            table.add_row(job["id"], job["status"], job["method"], job["trainer"], str(job["gpus"]),
                          f"{job['step']}/{job['total_steps'] or '?'}", err)  # fmt: skip
    except ClientError as exc:
        fail(str(exc))
    console.print(table)


@app.command()
def events(job_id: str, follow: bool = typer.Option(False, "--follow", "-f"), after: int = 0) -> None:
    """A job's events, one JSON object per line; --follow streams them until the job ends."""
    c = client()
    try:
        stream = c.stream_events(job_id, after) if follow else c.events(job_id, after)["data"]
        for event in stream:
            print(json.dumps(event), flush=True)
    except ClientError as exc:
        fail(str(exc))


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a job (a running one stops at its next heartbeat, after saving a checkpoint)."""
    try:
        console.print(_row(client().request("POST", f"/jobs/{job_id}/cancel")))
    except ClientError as exc:
        fail(str(exc))


@app.command()
def retry(job_id: str = typer.Argument(None), failed: bool = typer.Option(False, "--failed", help="Every failed job"),
          since: str = typer.Option(None, help="With --failed: created within, e.g. 1h")) -> None:  # fmt: skip
    """Run a failed or cancelled job again, resuming from its newest checkpoint."""
    if bool(job_id) == failed:
        fail("give a job id or --failed")
    c = client()
    try:
        ids = [job_id] if job_id else [j["id"] for j in c.jobs("failed", parse_since(since) if since else None)]
        for jid in ids:
            console.print(_row(c.request("POST", f"/jobs/{jid}/retry")))
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
def workers() -> None:
    """The worker pool: devices, current job, last heartbeat."""
    table = Table("name", "live", "devices", "inventory", "queues", "current job", "heartbeat")
    try:
        for w in client().request("GET", "/workers")["data"]:
            inv = w["inventory"]
            gpus = ", ".join(f"{g['name']} {g['memory_mib']} MiB" for g in inv.get("gpus", []))
            desc = gpus or f"CPU x{inv.get('cpu_devices', 0)} ({inv.get('cpu_count')} cores, {inv.get('memory_gib')} GiB)"
            table.add_row(w["name"], "yes" if w["live"] else "no", str(w["devices"]), desc, ",".join(w["queues"]),
                          w["current_job_id"] or "-", f"{time.time() - w['last_heartbeat']:.0f}s ago")  # fmt: skip
    except ClientError as exc:
        fail(str(exc))
    console.print(table)


PREFQ_ROOT = Path(__file__).resolve().parents[1]  # the folder that holds prefq's packages


def _serve(cmd: list[str], env: dict | None = None) -> None:
    """Become a long-running prefq process (API, worker, Flower) that imports nothing from the working folder:
    Python's `-P`, and the working folder set to prefq's own root, since Celery and uvicorn put it first on the
    import path. Relative data and work folders are made absolute first, so they keep their meaning."""
    env = dict(env or os.environ)
    settings = Settings()
    env["PREFQ_DATA_DIR"], env["PREFQ_WORK_DIR"] = str(settings.data_dir), str(settings.work_dir)
    sys.stdout.flush()
    os.chdir(PREFQ_ROOT)
    os.execvpe(cmd[0], cmd, env)


def _exec(cmd: list[str]) -> None:
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, dict(os.environ))


@app.command()
def api(host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Serve the HTTP API (uvicorn)."""
    _serve([sys.executable, "-P", "-m", "uvicorn", "--factory", "api.app:create_app", "--host", host, "--port",
            str(port), "--workers", str(workers), "--no-access-log"])  # fmt: skip


@app.command()
def serve(host: str = "127.0.0.1", port: int = 8001) -> None:
    """The playground's generation service: one process per loaded model; the API forwards to it (PREFQ_SERVE_URL)."""
    _serve([sys.executable, "-P", "-m", "uvicorn", "--factory", "worker.serve:create_app", "--host", host, "--port",
            str(port), "--no-access-log"])  # fmt: skip


@app.command()
def worker(gpus: str = typer.Option(None, help="GPU indices this worker owns, e.g. 0,1"),
           cpu_devices: int = typer.Option(None, help="Without GPUs: serve jobs of up to N devices on the CPU"),
           service: bool = typer.Option(False, "--service", help="Callbacks and the reconciler, not training"),
           name: str = typer.Option(None, help="Worker name (default prefq-<kind>@<host>)")) -> None:  # fmt: skip
    """A Celery worker: training (prefork pool, one job at a time) or --service."""
    env = dict(os.environ)
    if gpus is not None:
        env["PREFQ_GPUS"], env["CUDA_VISIBLE_DEVICES"] = gpus, gpus
    if cpu_devices is not None:
        env["PREFQ_CPU_DEVICES"] = str(cpu_devices)
    base = [sys.executable, "-P", "-m", "celery", "-A", "worker.app", "worker", "--loglevel", "INFO", "-E"]
    if service:
        from queue_config import SERVICE_QUEUE

        # -B: the reconciler's beat, embedded; its schedule is in memory (queue_config: beat_scheduler)
        cmd = [*base, "-Q", SERVICE_QUEUE, "--pool", "threads", "--concurrency", "4", "-B",
               "-n", name or "prefq-service@%h"]  # fmt: skip
    else:
        settings = Settings(gpus=env.get("PREFQ_GPUS", ""), cpu_devices=int(env.get("PREFQ_CPU_DEVICES", "0")))
        queues = ",".join(settings.worker_queues())
        cmd = [*base, "-Q", queues, "--pool", "prefork", "--concurrency", "1", "--prefetch-multiplier", "1",
               "-n", name or "prefq-worker@%h"]  # fmt: skip
    _serve(cmd, env)


@app.command()
def flower(port: int = 5555, address: str = "127.0.0.1") -> None:
    """Flower, the Celery monitor, on the same broker."""
    _serve([sys.executable, "-P", "-m", "celery", "-A", "worker.app", "flower", f"--port={port}",
            f"--address={address}"])  # fmt: skip


@app.command()
def check(kind: str = typer.Argument(..., help="worker or service"),
          name: str = typer.Option(None, help="The worker's name (default prefq-<kind>@<this host>)")) -> None:  # fmt: skip
    """Exit 0 if this host's worker (or service worker) is healthy: its heartbeat is fresh and, for the service
    worker, its beat lives and the reconciler runs. What a liveness probe calls."""
    from worker import health

    if kind not in health.KINDS:
        fail(f"expected one of {', '.join(health.KINDS)}, got {kind!r}")
    problems = health.check(Settings(), kind, name)
    if problems:
        fail("; ".join(problems))
    console.print(f"{name or health.default_name(kind)}: healthy")


@app.command()
def doctor() -> None:
    """What the API knows of the deployment: database, storage, broker, and when the reconciler last ran."""
    try:
        ready = client().request("GET", "/readyz", expected=(200, 503))
    except ClientError as exc:
        fail(str(exc))
    for part, state in ready["checks"].items():
        console.print(f"{part}: {state}")
    console.print(f"broker: {ready['broker']}")
    last = ready["reconciler_last_run_s_ago"]
    console.print(f"reconciler: {'never ran' if last is None else f'last pass {last:.0f}s ago'}")
    if ready["status"] != "ok" or ready["broker"] != "ok" or last is None:
        raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply the schema migrations to PREFQ_DATABASE_URL."""
    from jobs.db import upgrade

    url = Settings().database_url
    upgrade(url, revision)
    console.print(f"database at {url.split('@')[-1]} is at {revision}")


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


@app.command()
def dev(port: int = 8000, flower_port: int = 5555, data_dir: Path = Path(".prefq"),
        cpu_devices: int = typer.Option(2, help="Devices the worker serves on the CPU")) -> None:  # fmt: skip
    """Broker, API, a worker, the service worker and Flower on this machine, until Ctrl-C."""
    from api.dev import admin_key, start_stack, stop

    procs, env = start_stack(data_dir, port, flower_port, cpu_devices)
    key, created = admin_key(data_dir)
    saved = clientconfig.write(env["PREFQ_API_URL"], key)
    console.print(f"prefq dev: API {env['PREFQ_API_URL']} (docs /docs), dashboard {env['PREFQ_API_URL']}/ui (sign in "
                  f"with the admin key), playground {env['PREFQ_API_URL']}/v1/chat/completions (`prefq chat MODEL`), Flower "
                  f"http://127.0.0.1:{flower_port}, data in {data_dir.resolve()}; Ctrl-C stops everything")  # fmt: skip
    if created:
        console.print(f"admin key (tenant default; shown once, also in {data_dir.resolve() / 'admin-key'}): {key}")
    console.print(f"the CLI uses it from {saved}; models may be folders under {data_dir.resolve()}")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        console.print("[red]a process of the stack exited; stopping[/red]")
    except KeyboardInterrupt:
        pass
    finally:
        stop(procs)


DEMO_HYPERPARAMETERS = {"max_steps": 40, "batch_size": 16, "learning_rate": 1e-3, "lr_scheduler": "constant",
                        "max_length": 64, "save_steps": 20, "eval_steps": 20}  # fmt: skip


@app.command()
def demo(data_dir: Path = Path(".prefq-demo")) -> None:
    """Start the embedded stack, build a tiny model and toy pairs, run a DPO job through the API, and stop."""
    import subprocess

    from api.dev import admin_key, free_port, start_stack, stop

    data_dir = data_dir.resolve()
    model_dir, pairs = data_dir / "tiny-model", data_dir / "pairs.jsonl"
    if not (model_dir / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "training", "make-tiny-model", str(model_dir)], check=True)
    subprocess.run([sys.executable, "-m", "training", "make-toy-data", str(pairs), "--rows", "512"], check=True)
    port = free_port()
    console.print(f"starting broker, API (port {port}), worker and service worker; logs in {data_dir / 'logs'}")
    procs, env = start_stack(data_dir, port, flower_port=None)
    try:
        key, created = admin_key(data_dir)
        if created:
            saved = clientconfig.write(env["PREFQ_API_URL"], key)
            console.print(f"admin key (tenant default; also in {data_dir / 'admin-key'} and {saved}): {key}")
        c = Client(env["PREFQ_API_URL"], key)
        dataset = c.upload_dataset(pairs, "dpo")
        console.print(f"dataset {dataset['id']}: {dataset['rows']} pairs ({dataset['format']})")
        job = c.submit({"model": str(model_dir), "dataset": dataset["id"], "method": "dpo",
                        "hyperparameters": DEMO_HYPERPARAMETERS})  # fmt: skip
        console.print(f"job {job['id']}")
        final = wait_with_progress(c, job["id"])
        evals = [e["data"] for e in c.events(job["id"])["data"] if e["type"] == "eval"]
        policy = [at for at in c.request("GET", f"/jobs/{job['id']}/samples")["data"] if at["model"] == "policy"]
    except ClientError as exc:
        fail(str(exc))
    finally:
        stop(procs)
    if final["status"] != "succeeded":
        fail(f"job {final['id']} {final['status']}: {final['error']}")
    curve = ", ".join(f"step {e['step']}: {e['metrics']['eval_rewards/accuracies']:.3f}" for e in evals)
    console.print(f"held-out reward accuracy: {final['eval_metrics']['eval_rewards/accuracies']:.3f} ({curve})")
    if policy and policy[0]["samples"] and policy[-1]["samples"]:
        first, last = policy[0]["samples"][0], policy[-1]["samples"][0]
        console.print(f"held-out prompt {first['prompt']!r}: step {policy[0]['step']} wrote {first['completion']!r}, "
                      f"step {policy[-1]['step']} wrote {last['completion']!r} (prefq samples {final['id']})")
    console.print(f"model: {final['result_uri']}")


def _training(*args: str) -> None:
    _exec([sys.executable, "-m", "training", *args])


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def make_tiny_model(ctx: typer.Context) -> None:
    """python -m training make-tiny-model DIR [--size micro|tiny|small]"""
    _training("make-tiny-model", *ctx.args)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def make_toy_data(ctx: typer.Context) -> None:
    """python -m training make-toy-data OUT --method dpo|sft --rows N --seed S"""
    _training("make-toy-data", *ctx.args)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def validate(ctx: typer.Context) -> None:
    """python -m training validate FILE --method dpo|sft [--model DIR]"""
    _training("validate", *ctx.args)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(ctx: typer.Context) -> None:
    """python -m training run SPEC --out DIR [--resume]: one run without the queue"""
    _training("run", *ctx.args)


@app.command()
def schema() -> None:
    """The training spec's JSON schema (the hyperparameters' names)."""
    _training("schema")


if __name__ == "__main__":
    app()
