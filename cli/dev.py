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
def dev(
    port: int = 8000,
    flower_port: int = 5555,
    data_dir: Path = Path(".prefq"),
    cpu_devices: int = typer.Option(2, help="Devices the worker serves on the CPU"),
) -> None:
    """Broker, API, a worker, the service worker and Flower on this machine, until Ctrl-C."""
    from cli.stack import admin_key, start_stack, stop

    procs, env = start_stack(data_dir, port, flower_port, cpu_devices)
    key, created = admin_key(data_dir)
    saved = config.write(env["PREFQ_API_URL"], key)
    console.print(
        f"prefq dev: API {env['PREFQ_API_URL']} (docs /docs), dashboard {env['PREFQ_API_URL']}/ui (sign in "
        f"with the admin key), playground {env['PREFQ_API_URL']}/v1/chat/completions (`prefq chat MODEL`), Flower "
        f"http://127.0.0.1:{flower_port}, data in {data_dir.resolve()}; Ctrl-C stops everything"
    )
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


DEMO_COMMON = {
    "batch_size": 16,
    "lr_scheduler": "constant",
    "max_length": 64,
    "sample_prompts": 2,
    "sample_max_tokens": 8,
}
# SFT teaches the answers (the tiny model gets the 25 sums of the toy data right in about 120 steps); DPO then
# prefers them to answers far off. Evaluations at the start and the end of each: the samples before and after.
DEMO_SFT = {**DEMO_COMMON, "max_steps": 120, "learning_rate": 1e-3, "save_steps": 120, "eval_steps": 120}
DEMO_DPO = {**DEMO_COMMON, "max_steps": 20, "learning_rate": 2e-4, "save_steps": 10, "eval_steps": 10}


def _demo_data(data_dir: Path) -> tuple[Path, Path, Path]:
    """The tiny model, 512 toy preference pairs, and the same prompts with their chosen answers as SFT data: both
    jobs hold out the same rows (same count, same seed), so their samples are of the same prompts."""
    import json
    import subprocess

    model_dir, pairs, sft = data_dir / "tiny-model", data_dir / "pairs.jsonl", data_dir / "sft.jsonl"
    if not (model_dir / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "training", "make-tiny-model", str(model_dir)], check=True)
    subprocess.run([sys.executable, "-m", "training", "make-toy-data", str(pairs), "--rows", "512"], check=True)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    sft.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in rows))
    return model_dir, sft, pairs


def _first_sample(c: Client, job_id: str, at: int) -> dict | None:
    """The policy's sample of the first held-out prompt at evaluation `at` (0: the first, -1: the last)."""
    evaluations = [e for e in c.request("GET", f"/jobs/{job_id}/samples")["data"] if e["model"] == "policy"]
    return evaluations[at]["samples"][0] | {"step": evaluations[at]["step"]} if evaluations else None


def _run(c: Client, what: str, job: dict) -> dict:
    created = c.submit(job)
    console.print(f"{what} job {created['id']}")
    final = wait_with_progress(c, created["id"])
    if final["status"] != "succeeded":
        fail(f"job {final['id']} {final['status']}: {final['error']}")
    return final


@dev_app.command()
def demo(data_dir: Path = Path(".prefq-demo")) -> None:
    """Start the embedded stack, build a tiny model and toy data, then through the API an SFT job and a DPO job on its
    model; print what the model answers before, between and after, and stop."""
    from cli.stack import admin_key, free_port, start_stack, stop

    data_dir = data_dir.resolve()
    model_dir, sft, pairs = _demo_data(data_dir)
    port = free_port()
    console.print(f"starting broker, API (port {port}), worker and service worker; logs in {data_dir / 'logs'}")
    procs, env = start_stack(data_dir, port, flower_port=None)
    try:
        key, created = admin_key(data_dir)
        if created:
            saved = config.write(env["PREFQ_API_URL"], key)
            console.print(f"admin key (tenant default; also in {data_dir / 'admin-key'} and {saved}): {key}")
        c = Client(env["PREFQ_API_URL"], key)
        sft_data, dpo_data = c.upload_dataset(sft, "sft"), c.upload_dataset(pairs, "dpo")
        console.print(
            f"datasets {sft_data['id']} ({sft_data['rows']} demonstrations), {dpo_data['id']} "
            f"({dpo_data['rows']} preference pairs)"
        )
        first = _run(
            c, "SFT", {"model": str(model_dir), "dataset": sft_data["id"], "method": "sft", "hyperparameters": DEMO_SFT}
        )
        final = _run(
            c,
            "DPO",
            {
                "model": first["id"],
                "dataset": dpo_data["id"],
                "method": "dpo",
                "hyperparameters": DEMO_DPO,
                "metadata": {"pipeline_after": first["id"]},
            },
        )
        evals = [e["data"] for e in c.events(final["id"])["data"] if e["type"] == "eval"]
        said = [_first_sample(c, first["id"], 0), _first_sample(c, first["id"], -1), _first_sample(c, final["id"], -1)]
    except ClientError as exc:
        fail(str(exc))
    finally:
        stop(procs)
    curve = ", ".join(f"step {e['step']}: {e['metrics']['eval_rewards/accuracies']:.3f}" for e in evals)
    console.print(f"DPO held-out reward accuracy: {final['eval_metrics']['eval_rewards/accuracies']:.3f} ({curve})")
    if all(said):
        untrained, tuned, preferred = said
        console.print(
            f"held-out prompt {untrained['prompt']!r}: the untrained model wrote {untrained['completion']!r}, "
            f"after SFT {tuned['completion']!r}, after DPO {preferred['completion']!r} "
            f"(prefq samples {final['id']})"
        )
    console.print(f"model: {final['result_uri']}")
