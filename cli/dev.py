"""`prefq dev` and `prefq demo`: the embedded stack (`cli.stack`) on this machine, for a person."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import typer

from cli import config
from cli.client import Client, ClientError
from cli.console import console, fail, wait_with_progress

dev_app = typer.Typer()


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


@dev_app.command()
def dev(port: int = 8000, flower_port: int = 5555, data_dir: Path = Path(".prefq"),
        cpu_devices: int = typer.Option(2, help="Devices the worker serves on the CPU")) -> None:  # fmt: skip
    """Broker, API, a worker, the service worker and Flower on this machine, until Ctrl-C."""
    from cli.stack import admin_key, start_stack, stop

    procs, env = start_stack(data_dir, port, flower_port, cpu_devices)
    key, created = admin_key(data_dir)
    saved = config.write(env["PREFQ_API_URL"], key)
    console.print(f"prefq dev: API {env['PREFQ_API_URL']} (docs /docs), dashboard {env['PREFQ_API_URL']}/ui (sign in "
                  f"with the admin key), playground {env['PREFQ_API_URL']}/v1/chat/completions (`prefq chat MODEL`), Flower "
                  f"http://127.0.0.1:{flower_port}, data in {data_dir.resolve()}; Ctrl-C stops everything")  # fmt: skip
    if created:
        console.print(f"admin key (tenant default; shown once, also in {data_dir.resolve() / 'admin-key'}): {key}")
    roots = env["PREFQ_MODEL_ROOTS"].replace(",", ", ")
    console.print(f"the CLI uses it from {saved}; models may be folders under {roots} (PREFQ_MODEL_ROOTS)")
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


@dev_app.command()
def demo(data_dir: Path = Path(".prefq-demo")) -> None:
    """Start the embedded stack, build a tiny model and toy pairs, run a DPO job through the API, and stop."""
    import subprocess

    from cli.stack import admin_key, free_port, start_stack, stop

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
            saved = config.write(env["PREFQ_API_URL"], key)
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
        console.print(
            f"held-out prompt {first['prompt']!r}: step {policy[0]['step']} wrote {first['completion']!r}, "
            f"step {policy[-1]['step']} wrote {last['completion']!r} (prefq samples {final['id']})"
        )
    console.print(f"model: {final['result_uri']}")
