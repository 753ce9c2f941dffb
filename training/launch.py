"""Launching the ranks of the `fsdp` and `deepspeed-tp` trainers: generated configs, `accelerate launch` (or ranks
forked from a warm run, `training.ranks`), and their supervision. (The environment a training process inherits is
`training.parent.run_env`.)

`python -m training run SPEC --out DIR` with a distributed trainer runs here first: it writes
DIR/launch/accelerate.yaml (and deepspeed.json). A run forked warm (`training.warm`: torch and the trainers already
imported) forks its ranks from itself with the environment `accelerate launch` would give them (`training.ranks`).
A run started cold (nothing imported) starts

    accelerate launch --config_file DIR/launch/accelerate.yaml -m training run SPEC --out DIR [--resume]

with one process per device of the job, and supervises it:

- SIGTERM goes to the rank processes themselves: torchrun starts each rank in a session of its own, and on
  SIGTERM its agent gives them 30 s before SIGKILL, too short for a big model to finish a step and save.
  The ranks agree on a step, save a checkpoint and exit 75. A second SIGTERM kills everything.
- The exit code is rank 0's (from DIR/launch/exit-code): torchrun reports any failing rank as 1.
- The launcher dies with this process, and every rank with the launcher (PR_SET_PDEATHSIG), so a SIGKILL
  of the worker's process group leaves no rank behind.

On a machine without GPUs the processes are CPU processes over gloo (FSDP is engaged on CPU by
`training.distributed`); on a GPU machine each process gets one of CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

from training.events import emit, event_stream
from training.parent import die_with_parent
from training.spec import EXIT_USER_ERROR, TrainingSpec

# DeepSpeed AutoTP partition that keeps lm_head and the embedding whole. TRL's fused LM head reads
# lm_head.weight itself: DeepSpeed's default policy shards the head over the vocabulary, and then the
# log-softmax runs over part of the vocabulary, giving wrong log-probs without any error.
LLAMA_LIKE_PARTITION = {
    "use_default_specs": False,
    "layer_specs": [
        {"patterns": [r".*\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$"], "partition_type": "column"},
        {"patterns": [r".*\.(o_proj|down_proj)\.weight$"], "partition_type": "row"},
    ],
}
ZERO_STAGE = 1  # AutoTP is not implemented with ZeRO-3; with TP over all processes ZeRO shards nothing anyway


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(spec: TrainingSpec) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",  # "auto": filled from the TrainingArguments
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        # explicit: accelerate resolves "auto" from its own mixed_precision ("no") before the Trainer sees it
        "bf16": {"enabled": spec.precision == "bf16"},
        # the gather flag lets the final save consolidate the tensor-parallel shards
        "zero_optimization": {"stage": ZERO_STAGE, "stage3_gather_16bit_weights_on_model_save": True},
        "tensor_parallel": {
            "autotp_size": spec.gpus,
            "vocab_parallel_lm_head": False,
            "partition_config": LLAMA_LIKE_PARTITION,
        },
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }


def accelerate_config(spec: TrainingSpec, deepspeed_file: Path | None) -> str:
    lines = [
        "compute_environment: LOCAL_MACHINE",
        "num_machines: 1",
        f"num_processes: {spec.gpus}",
        "machine_rank: 0",
        "main_process_ip: 127.0.0.1",
        f"main_process_port: {_free_port()}",
        "rdzv_backend: static",
        "same_network: true",
        "use_cpu: false",  # use_cpu would start one process and ignore FSDP / DeepSpeed
        "gpu_ids: all",
    ]
    if spec.trainer == "fsdp":
        lines += [
            "distributed_type: FSDP",
            "mixed_precision: 'no'",  # the spec's precision reaches the Trainer, which autocasts
            "fsdp_config:",
            "  fsdp_version: 2",
            "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP",  # one unit per decoder layer
            "  fsdp_state_dict_type: SHARDED_STATE_DICT",  # checkpoints: one shard per rank; final/ is full
            "  fsdp_reshard_after_forward: true",
            "  fsdp_offload_params: false",
            "  fsdp_cpu_ram_efficient_loading: false",
            "  fsdp_activation_checkpointing: false",
        ]
    elif spec.trainer == "deepspeed-tp":
        lines += [
            "distributed_type: DEEPSPEED",
            "deepspeed_config:",
            f"  deepspeed_config_file: {deepspeed_file}",
            "  deepspeed_multinode_launcher: standard",
        ]
    else:
        raise ValueError(f"Unknown distributed trainer: {spec.trainer}")
    return "\n".join(lines) + "\n"


def check_divisible(spec: TrainingSpec) -> str | None:
    """Tensor parallelism splits heads and the MLP across processes: they must divide evenly."""
    if spec.trainer != "deepspeed-tp":
        return None
    try:
        config = json.loads((Path(spec.model) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # the run reports an unloadable model itself
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = config.get(key)
        if value is not None and value % spec.gpus:
            return f"gpus: deepspeed-tp splits {key} ({value}) over {spec.gpus} processes; it must divide evenly"
    return None


def command(spec: TrainingSpec, spec_path: str, out_dir: Path, resume: bool) -> tuple[list[str], dict]:
    """Write the configs into OUT/launch and return the launch command and its environment."""
    launch_dir = (out_dir / "launch").resolve()
    launch_dir.mkdir(parents=True, exist_ok=True)
    ds_file = None
    if spec.trainer == "deepspeed-tp":
        ds_file = launch_dir / "deepspeed.json"
        ds_file.write_text(json.dumps(deepspeed_config(spec), indent=1))
    config = launch_dir / "accelerate.yaml"
    config.write_text(accelerate_config(spec, ds_file))
    env = dict(os.environ)
    if not env.get("CUDA_VISIBLE_DEVICES"):  # CPU processes: share the cores between them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.gpus)))
    # DeepSpeed compiles its C++ ops on first use (about a minute): keep them in a cache that outlives runs
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "prefq" / "torch_extensions"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [
        accelerate,
        "launch",
        "--config_file",
        str(config),
        "-m",
        "training",
        "run",
        str(spec_path),
        "--out",
        str(out_dir),
    ] + (["--resume"] if resume else [])
    return cmd, env


def launch(spec: TrainingSpec, spec_path: str, out_dir: Path, resume: bool) -> int:
    """Run the distributed trainer and return rank 0's exit code."""
    problem = check_divisible(spec)
    if problem:
        emit("error", code="invalid_spec", message=problem, user_error=True)
        return EXIT_USER_ERROR
    import psutil

    cmd, env = command(spec, spec_path, out_dir, resume)
    code_file = out_dir / "launch" / "exit-code"
    code_file.unlink(missing_ok=True)
    if "torch" in sys.modules:  # a warm run: its ranks are forked from it, imports and all
        from training.ranks import fork_ranks
        from training.warm import fork_hazards

        hazard = fork_hazards(harmless=("orphan-watch",))  # `python -m training run --stop-grace-s`'s
        if hazard is None:
            return fork_ranks(cmd, env, spec.gpus, code_file)
        print(f"ranks started by accelerate launch, not forked: {hazard}", file=sys.stderr)
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=partial(die_with_parent, signal.SIGKILL),
    )
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        try:
            launcher = psutil.Process(proc.pid)
            ranks = launcher.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        targets, sig = (ranks + [launcher], signal.SIGKILL) if len(received) > 1 else (ranks or [launcher], signum)
        for target in targets:
            try:
                target.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    events = event_stream()
    for line in proc.stdout:  # rank 0's events; anything else the launcher prints is a log line
        (events if line.startswith('{"event"') else sys.stderr).write(line)
        events.flush()
    rc = proc.wait()
    if code_file.is_file():
        return int(code_file.read_text())
    return rc if rc >= 0 else 128 - rc
