"""The launchers of prefq's processes (`prefq api|worker|serve|flower`), their checks (`check`, `doctor`), the
schema (`db upgrade`) and the training commands run without the queue. Each process is `exec`ed, so the heavy
imports (Celery, uvicorn, torch) happen in it, never in `prefq` itself."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from cli.config import client
from cli.console import JSON_OPTION, console, fail, print_json
from settings import Settings

procs_app = typer.Typer()
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
procs_app.add_typer(db_app, name="db")
PREFQ_ROOT = Path(__file__).resolve().parents[1]  # the folder that holds prefq's packages
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


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


def _training(*args: str) -> None:
    cmd = [sys.executable, "-m", "training", *args]
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, dict(os.environ))


@procs_app.command()
def api(host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Serve the HTTP API (uvicorn)."""
    _serve(
        [
            sys.executable,
            "-P",
            "-m",
            "uvicorn",
            "--factory",
            "api.app:create_app",
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--no-access-log",
        ]
    )


@procs_app.command()
def serve(
    host: str = "127.0.0.1",
    port: int = 8001,
    engine: str = typer.Option(
        None, help="transformers (the default) or vllm (needs vLLM with CUDA); sets PREFQ_SERVE_ENGINE"
    ),
) -> None:
    """The playground's generation service: one process per loaded model; the API forwards to it (PREFQ_SERVE_URL)."""
    if engine not in (None, "transformers", "vllm"):
        fail(f"--engine: transformers or vllm, not {engine!r}")
    _serve(
        [
            sys.executable,
            "-P",
            "-m",
            "uvicorn",
            "--factory",
            "serve.app:create_app",
            "--host",
            host,
            "--port",
            str(port),
            "--no-access-log",
        ],
        dict(os.environ) | ({"PREFQ_SERVE_ENGINE": engine} if engine else {}),
    )


@procs_app.command()
def worker(
    gpus: str = typer.Option(None, help="GPU indices this worker owns, e.g. 0,1"),
    cpu_devices: int = typer.Option(None, help="Without GPUs: serve jobs of up to N devices on the CPU"),
    service: bool = typer.Option(False, "--service", help="Callbacks and the reconciler, not training"),
    name: str = typer.Option(None, help="Worker name (default prefq-<kind>@<host>)"),
) -> None:
    """A Celery worker: training (prefork pool, one job at a time) or --service."""
    from queue_config import SERVICE_QUEUE, worker_queues

    env = dict(os.environ)
    if gpus is not None:
        env["PREFQ_GPUS"], env["CUDA_VISIBLE_DEVICES"] = gpus, gpus
    if cpu_devices is not None:
        env["PREFQ_CPU_DEVICES"] = str(cpu_devices)
    base = [sys.executable, "-P", "-m", "celery", "-A", "worker.app", "worker", "--loglevel", "INFO", "-E"]
    if service:
        # -B: the reconciler's beat, embedded; its schedule is in memory (queue_config: beat_scheduler)
        cmd = [
            *base,
            "-Q",
            SERVICE_QUEUE,
            "--pool",
            "threads",
            "--concurrency",
            "4",
            "-B",
            "-n",
            name or "prefq-service@%h",
        ]
    else:
        settings = Settings(gpus=env.get("PREFQ_GPUS", ""), cpu_devices=int(env.get("PREFQ_CPU_DEVICES", "0")))
        queues = ",".join(worker_queues(settings))
        cmd = [
            *base,
            "-Q",
            queues,
            "--pool",
            "prefork",
            "--concurrency",
            "1",
            "--prefetch-multiplier",
            "1",
            "-n",
            name or "prefq-worker@%h",
        ]
    _serve(cmd, env)


@procs_app.command()
def flower(port: int = 5555, address: str = "127.0.0.1") -> None:
    """Flower, the Celery monitor, on the same broker."""
    _serve(
        [sys.executable, "-P", "-m", "celery", "-A", "worker.app", "flower", f"--port={port}", f"--address={address}"]
    )


@procs_app.command()
def check(
    kind: str = typer.Argument(..., help="worker or service"),
    name: str = typer.Option(None, help="The worker's name (default prefq-<kind>@<this host>)"),
) -> None:
    """Exit 0 if this host's worker (or service worker) is healthy: its heartbeat is fresh and, for the service
    worker, its beat lives and the reconciler runs. What a liveness probe calls."""
    from worker import health

    if kind not in health.KINDS:
        fail(f"expected one of {', '.join(health.KINDS)}, got {kind!r}")
    problems = health.check(Settings(), kind, name)
    if problems:
        fail("; ".join(problems))
    console.print(f"{name or health.default_name(kind)}: healthy")


@procs_app.command()
def doctor(as_json: bool = JSON_OPTION) -> None:
    """What the API knows of the deployment: database, storage, broker, and when the reconciler last ran (--json:
    the API's `/readyz` object). Exits 1 when something is not ready."""
    from cli.client import ClientError

    try:
        ready = client().request("GET", "/readyz", expected=(200, 503))
    except ClientError as exc:
        fail(str(exc))
    if as_json:
        print_json(ready)
    else:
        for part, state in ready["checks"].items():
            console.print(f"{part}: {state}")
        console.print(f"broker: {ready['broker']}")
        last = ready["reconciler_last_run_s_ago"]
        console.print(f"reconciler: {'never ran' if last is None else f'last pass {last:.0f}s ago'}")
    if ready["status"] != "ok" or ready["broker"] != "ok" or ready["reconciler_last_run_s_ago"] is None:
        raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply the schema migrations to PREFQ_DATABASE_URL."""
    from jobs.db import upgrade

    url = Settings().database_url
    upgrade(url, revision)
    console.print(f"database at {url.split('@')[-1]} is at {revision}")


@procs_app.command(context_settings=PASS_THROUGH)
def make_tiny_model(ctx: typer.Context) -> None:
    """python -m training make-tiny-model DIR [--size micro|tiny|small] [--family qwen2|llama3|...]"""
    _training("make-tiny-model", *ctx.args)


@procs_app.command(context_settings=PASS_THROUGH)
def make_toy_data(ctx: typer.Context) -> None:
    """python -m training make-toy-data OUT --method dpo|sft --rows N --seed S"""
    _training("make-toy-data", *ctx.args)


@procs_app.command(context_settings=PASS_THROUGH)
def validate(ctx: typer.Context) -> None:
    """python -m training validate FILE --method dpo|sft [--model DIR]"""
    _training("validate", *ctx.args)


@procs_app.command(context_settings=PASS_THROUGH)
def train(ctx: typer.Context) -> None:
    """python -m training run SPEC --out DIR [--resume]: one run without the queue"""
    _training("run", *ctx.args)


@procs_app.command()
def schema() -> None:
    """The training spec's JSON schema (the hyperparameters' names)."""
    _training("schema")
