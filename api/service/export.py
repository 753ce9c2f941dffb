"""A job's model (or one of its checkpoints) in the forms people deploy, with a model card.

- `merged`: a folder `AutoModelForCausalLM.from_pretrained` loads, the LoRA adapter merged into the weights. A LoRA
  job's final model is stored merged; a LoRA checkpoint holds the adapter alone, so the answer gives the adapter's
  files and its base (`merge`), and the client merges (`prefq export` does, with PEFT).
- `adapter`: PEFT's folder of a LoRA job's final model or checkpoint (`PeftModel.from_pretrained` on the base).
- `hf`: the model's full weights as stored: the final model, a checkpoint's model files (not its optimizer or trainer
  state), or a sharded (`fsdp`, `deepspeed-tp`) checkpoint's consolidated folder.

Files come as presigned URLs; the model card (README.md) names the job, its base, method, data, hyperparameters and
evaluation metrics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from api.deps import Services
from api.service.artifacts import model_files
from api.service.errors import Conflict, Invalid, NotFound
from api.service.served import base_of
from jobs import layout, modelref
from jobs.models import Job
from training.spec import ADAPTER, CONSOLIDATED, MANIFEST_NAME

FORMATS = ("merged", "adapter", "hf")
# A checkpoint's files that are training state, not the model
STATE = {"optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin", "best.json", "beta-schedule.json"}


@dataclass
class Export:
    format: str
    checkpoint: int | None
    fine_tuned_model: str
    files: list[tuple[str, str]]  # (name in the exported folder, storage key)
    base_model: str  # the job's base, as it names it
    model_card: str
    merge: dict | None = None  # the base to merge the adapter into: {"hub", "revision"} or {"files": [(name, key)]}
    lora: bool = False


def _model_files(prefix: str, keys: list[str]) -> list[tuple[str, str]]:
    """The files of a model folder directly under `prefix`, without training state."""
    out = []
    for key in keys:
        name = key[len(prefix) :]
        if "/" in name or name in STATE or name == MANIFEST_NAME or name.startswith("rng_state") or name == "README.md":
            continue
        out.append((name, key))
    return sorted(out)


def _under(prefix: str, keys: list[str]) -> list[tuple[str, str]]:
    return sorted((k[len(prefix) :], k) for k in keys if k.startswith(prefix))


def _refuse(message: str) -> Invalid:
    return Invalid("invalid_export", message, "format")


def export(svc: Services, job: Job, fmt: str, checkpoint: int | None) -> Export:
    """What `fmt` of the job's model (or of its checkpoint at step `checkpoint`) is; see the module's docstring."""
    if fmt not in FORMATS:
        raise _refuse(f"one of {', '.join(FORMATS)}")
    merge = None
    if checkpoint is None:
        prefix, keys = model_files(svc, job)
        adapter = _under(prefix + ADAPTER + "/", keys)
        whole = _model_files(prefix, keys)
        lora = bool(adapter)
    else:
        found = layout.list_checkpoints(svc.storage, job.tenant, job.id, MANIFEST_NAME, step=checkpoint)
        if checkpoint not in found:
            raise NotFound(
                "checkpoint_not_found", f"job {job.id} has no complete checkpoint at step {checkpoint}", "checkpoint"
            )
        prefix, keys = found[checkpoint].prefix, found[checkpoint].keys
        consolidated = prefix + CONSOLIDATED + "/"
        if any(k.startswith(consolidated) for k in keys):  # a sharded checkpoint: its gathered folder
            adapter = _under(consolidated + ADAPTER + "/", keys)
            whole, lora = _model_files(consolidated, keys), bool(adapter)
        elif prefix + "adapter_config.json" in keys:  # a LoRA checkpoint: the adapter alone
            adapter, whole, lora = _model_files(prefix, keys), [], True
        else:
            adapter, whole, lora = [], _model_files(prefix, keys), False
    if fmt == "adapter":
        if not lora:
            raise _refuse(f"job {job.id} did not train a LoRA adapter; export it as merged or hf")
        files = adapter
    elif whole:
        files = whole
    elif fmt == "hf":
        raise _refuse("this LoRA checkpoint holds the adapter alone; export it as adapter, or as merged")
    else:  # merged, from a LoRA checkpoint: the client merges the adapter into its base
        files, merge = adapter, _merge_base(svc, job)
    name = modelref.fine_tuned_name(job.model, job.tenant, job.suffix, job.id, checkpoint)
    card = model_card(job, name, fmt, checkpoint, lora)
    return Export(fmt, checkpoint, name, files, job.model, card, merge, lora)


def _merge_base(svc: Services, job: Job) -> dict:
    base = base_of(job.model, job.tenant, svc.store, svc.storage)
    if base is None:
        raise Conflict(
            "base_unavailable",
            f"the adapter's base model ({job.model}) cannot be given for a merge; export the adapter and merge it "
            "into the base where you have it",
            "format",
        )
    if "base_hub" in base:
        return {"hub": base["base_hub"], "revision": base.get("base_revision")}
    root = svc.storage.uri("")
    prefix = base["base_uri"][len(root) :].rstrip("/") + "/"
    return {"files": _model_files(prefix, svc.storage.list(prefix))}


def model_card(job: Job, name: str, fmt: str, checkpoint: int | None, lora: bool) -> str:
    """README.md: front matter the hub reads, then what was trained, how, on what, and how it scored."""
    tags = ["prefq", job.method] + (["lora"] if lora else [])
    front = [
        f"base_model: {json.dumps(job.model)}",
        f"library_name: {'peft' if fmt == 'adapter' else 'transformers'}",
        "tags:",
        *(f"- {t}" for t in tags),
    ]
    where = "the final model" if checkpoint is None else f"the checkpoint at step {checkpoint}"
    lines = [
        "---",
        *front,
        "---",
        "",
        f"# {name}",
        "",
        f"Trained by prefq job `{job.id}`: {job.method} of `{job.model}` with the `{job.trainer}` trainer on "
        f"{job.gpus} device(s), {job.step} steps. Exported as `{fmt}` from {where}.",
        "",
        f"- training data: dataset `{job.dataset_id}`"
        + (f", evaluated on `{job.eval_dataset_id}`" if job.eval_dataset_id else ""),
        f"- fine-tuned model name: `{name}`",
        "",
        "## Hyperparameters",
        "",
        "| name | value |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in sorted(job.hyperparameters.items())),
        "",
        "## Evaluation",
        "",
    ]
    if job.eval_metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [
            f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in sorted(job.eval_metrics.items())
        ]
    else:
        lines.append("The job ran no evaluation.")
    return "\n".join(lines) + "\n"
