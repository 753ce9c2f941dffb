"""Memory: the estimate of a run's peak per device (`training.memory`) against measured peaks, the API's refusal of a
job that no live worker can hold, QLoRA on this CPU, options refused by name, and an out-of-memory error that ends a
run as the user's to fix, with the advice."""

import json
from pathlib import Path

import pytest
from sqlmodel import Session

from jobs.db import make_engine
from jobs.models import Worker
from queue_config import gpu_queue
from tests.conftest import ROOT, dpo_spec, of_type, python_env, run_training
from tests.test_api import GOOD, keyed
from training.memory import GIB, estimate, shape
from training.spec import TrainingSpec, resolve_precision


def test_parameter_count_from_config_json_is_exact_for_every_family():
    import torch
    from transformers import AutoModelForCausalLM

    from training.families import FAMILIES, build_config

    for family in [None, *FAMILIES]:
        for tied in (True, False):
            config = build_config(family, 1000, 64, 3, 4, 2, 96, tied, {"bos": 1, "eos": 2, "pad": 0})
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
            real = sum(p.numel() for p in model.parameters())
            assert shape(json.loads(config.to_json_string())).params == real, (family, tied)


# (method, overrides): the single-process DPO path with its reference; QLoRA on this CPU (bitsandbytes' CPU backend)
# through TRL's head; SFT with gradient checkpointing.
RUNS = {
    "dpo": ("dpo", {"batch_size": 8, "max_length": 128}),
    "dpo-qlora": ("dpo", {"batch_size": 8, "max_length": 128, "lora": {"quantize": "4bit"}}),
    "sft-checkpointing": ("sft", {"batch_size": 8, "max_length": 256, "gradient_checkpointing": True}),
}


@pytest.mark.parametrize("name", RUNS)
def test_estimate_is_within_a_quarter_of_the_measured_peak(name, small_model, long_rows, tmp_path):
    method, overrides = RUNS[name]
    spec = dpo_spec(small_model, long_rows[method], method=method, max_steps=2, sample_prompts=0, eval_fraction=0.05)
    spec.update(overrides)
    code, events = run_training(spec, tmp_path / "out")  # forked warm as a worker's: its imports are resident too
    assert code == 0, of_type(events, "error")
    (memory,) = of_type(events, "memory")
    config = json.loads((small_model / "config.json").read_text())
    expected = estimate(config, resolve_precision(TrainingSpec.model_validate(spec)), cpu=True).total / GIB
    assert memory["estimated_gib"] == pytest.approx(expected, abs=1e-3)
    assert memory["device"] == "cpu" and memory["available_gib"] > 0
    ratio = memory["estimated_gib"] / memory["peak_gib"]
    print(f"{name}: estimated {memory['estimated_gib']:.3f} GiB, measured {memory['peak_gib']:.3f} GiB ({ratio:.2f}x)")
    assert 0.75 <= ratio <= 1.25, memory
    if "lora" in overrides and overrides["lora"].get("quantize"):
        assert of_type(events, "done")  # QLoRA trains here: NF4 through bitsandbytes' CPU backend
        # its model is the adapters merged into the unquantized base: any job or the playground loads it as it is
        assert "quantization_config" not in json.loads((tmp_path / "out" / "final" / "config.json").read_text())


def test_qlora_is_refused_by_name_where_it_cannot_run(monkeypatch, micro_model, toy_dpo):
    import importlib.util

    from training import run
    from training.spec import SpecError

    with pytest.raises(ValueError, match="lora.quantize: QLoRA runs on the 'basic' trainer"):
        TrainingSpec.model_validate(dpo_spec(micro_model, toy_dpo, trainer="fsdp", gpus=2, lora={"quantize": "4bit"}))
    spec = TrainingSpec.model_validate(dpo_spec(micro_model, toy_dpo, lora={"quantize": "4bit"}))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    with pytest.raises(SpecError, match="lora.quantize: QLoRA needs the bitsandbytes package"):
        run._check_devices(spec)


def test_liger_kernels_are_refused_by_name_without_cuda(micro_model, toy_dpo, tmp_path):
    code, events = run_training(dpo_spec(micro_model, toy_dpo, use_liger_kernel=True), tmp_path / "out")
    (error,) = of_type(events, "error")
    assert code == 2 and error["code"] == "invalid_spec" and error["user_error"]
    assert error["message"].startswith("use_liger_kernel: ") and "CUDA" in error["message"]


OOM_HOOK = """
import torch

def _oom(self, *args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

torch.optim.AdamW.step = _oom
"""


def test_out_of_memory_in_training_is_the_users_error_with_the_advice(micro_model, toy_dpo, tmp_path):
    """An out-of-memory error (injected at the first optimizer step by a `sitecustomize` on the run's path) ends the
    run as `model_too_big`, a user error that the worker does not retry, saying what would fit."""
    import subprocess
    import sys

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(OOM_HOOK)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(dpo_spec(micro_model, toy_dpo, max_steps=2)))
    env = {**python_env(), "PYTHONPATH": f"{hooks}:{ROOT}"}
    proc = subprocess.run(
        [sys.executable, "-m", "training", "run", str(spec_path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    (error,) = of_type(events, "error")
    assert proc.returncode == 2 and error["code"] == "model_too_big" and error["user_error"]
    message = error["message"]
    assert message.startswith("out of memory (CUDA out of memory. Tried to allocate 20.00 GiB)")
    assert "GiB per device" in message and "is available" in message and "Would fit:" in message


def _config_only_model(folder: Path, **sizes) -> Path:
    """A model folder with only config.json (the API reads nothing else): a Llama 3.2 1B's shapes by default."""
    config = {
        "model_type": "llama",
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        **sizes,
    }
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _live_worker(settings, name: str, gpus_mib: list[int]) -> None:
    gpus = [{"index": str(i), "name": "NVIDIA H100 80GB HBM3", "memory_mib": m} for i, m in enumerate(gpus_mib)]
    row = Worker(
        name=name,
        hostname="gpu-node",
        pid=1,
        queues=[gpu_queue(n) for n in range(1, len(gpus) + 1)],
        devices=len(gpus),
        inventory={"gpus": gpus, "cpu_devices": 0, "cpu_count": 16, "memory_gib": 128},
    )
    with Session(make_engine(settings.database_url)) as s:
        s.add(row)
        s.commit()


def test_a_job_no_live_worker_can_hold_is_422_naming_the_knobs(settings, tmp_path_factory):
    client = keyed(settings)
    dataset = client.post("/datasets", files={"file": ("pairs.jsonl", GOOD)}).json()["id"]
    model = _config_only_model(tmp_path_factory.mktemp("configs") / "llama-1b")
    body = {
        "model": str(model),
        "dataset": dataset,
        "method": "dpo",
        "hyperparameters": {"max_length": 512, "batch_size": 2},
    }

    assert client.post("/jobs", json=body).status_code == 202  # no live worker: nothing to compare with; it waits
    _live_worker(settings, "gpu-16g", [16 * 1024, 16 * 1024])
    client = keyed(settings)  # a new API process: its view of the live workers is read afresh
    r = client.post("/jobs", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["code"], error["field"]) == ("job_too_big", "model")
    message = error["message"]
    assert "1236M parameters" in message and "16.00 GiB per device is available" in message
    assert "Would fit: lora: {}" in message and "(QLoRA)" in message, message

    fitted = {**body, "hyperparameters": {**body["hyperparameters"], "lora": {}}}
    assert client.post("/jobs", json=fitted).status_code == 202  # a knob it named makes it fit
    _live_worker(settings, "gpu-80g", [80 * 1024])
    assert keyed(settings).post("/jobs", json=body).status_code == 202  # a bigger worker joined


def test_estimate_shards_over_fsdp_devices_and_loads_whole_copies_on_cpu(micro_model, toy_dpo):
    config = _big_config()
    one = estimate(config, TrainingSpec.model_validate(dpo_spec(micro_model, toy_dpo)))
    four = estimate(config, TrainingSpec.model_validate(dpo_spec(micro_model, toy_dpo, trainer="fsdp", gpus=4)))
    for part in ("weights", "gradients", "optimizer"):
        assert four.parts[part] == pytest.approx(one.parts[part] / 4, rel=1e-6)
    cpu = estimate(config, TrainingSpec.model_validate(dpo_spec(micro_model, toy_dpo, trainer="fsdp", gpus=4)), True)
    assert cpu.load_peak >= 4 * one.params  # each CPU process loads the whole model before sharding


def _big_config() -> dict:
    return {
        "model_type": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "intermediate_size": 4864,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    }
