"""What the `fsdp` and `deepspeed-tp` trainers need inside each rank (see `training.launch` for the launch).

- FSDP on CPU: accelerate switches to FSDP only for GPU-like distributed types; on CPU it silently runs DDP.
  `engage_fsdp_on_cpu` finishes what it skipped, right after the Trainer builds its Accelerator.
- DeepSpeed AutoTP: every rank sees the whole batch, so TRL's gathers over all processes repeat it; the
  reference log-prob precompute and the token count are corrected for that.
- The reference model under FSDP is sharded like the policy, one unit per decoder layer.
- Beta schedules see the margins of the whole global batch, gathered over data-parallel ranks.
- `final/` is a full state dict gathered from the shards, written by rank 0.
- Datasets are saved to disk once and memory-mapped by every rank when the reference log-probs are
  precomputed (an in-memory dataset caches in a temporary folder of its own per process).
- Each rank dies with its launcher, writes rank 0's exit code, and leaves the process group cleanly.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from training.parent import die_with_parent
from training.spec import ADAPTER

log = logging.getLogger("training")


def in_launched_rank() -> bool:
    return "LOCAL_RANK" in os.environ


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def engage_fsdp_on_cpu(accelerator) -> bool:
    """Turn accelerate's CPU fallback (MULTI_CPU: DDP over gloo) into FSDP when the launcher asked for FSDP.

    FSDP2 (`fully_shard`) works on CPU over gloo; accelerate only skips attaching the plugin. Mixed precision
    stays with the Trainer's autocast (fp32 parameters, as in `basic`): accelerate's FSDP policy would run
    TRL's fused LM head on a bf16 weight and move the log-probs away from the other trainers'.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    if state.distributed_type == DistributedType.FSDP:
        return False  # a GPU machine: accelerate did it
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"fsdp: expected MULTI_CPU on a machine without GPUs, got {state.distributed_type}")
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # version, wrap policy, state dict type from FSDP_*
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def prepare_fsdp_per_layer(model, accelerator):
    """The reference model sharded like the policy, one FSDP2 unit per decoder layer (TRL's `prepare_fsdp`
    shards the root only, which all-gathers the whole reference model for every forward)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import FSDPModule
    from trl.models.utils import prepare_fsdp

    if accelerator.state.fsdp_plugin.fsdp_version != 2 or isinstance(model, FSDPModule):
        return prepare_fsdp(model, accelerator)
    model = fsdp2_prepare_model(accelerator, model)
    model.eval()
    return model


class GatheredMargins:
    """A beta schedule fed the margins of the global batch: under fsdp each rank has only its part of it."""

    def __init__(self, schedule):
        self.schedule = schedule
        self._last: tuple | None = None

    def _gather(self, margins: list[float]) -> list[float]:
        import torch.distributed as dist

        if self._last is not None and self._last[0] is margins:  # beta_for and observe of one batch
            return self._last[1]
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, margins)
        self._last = (margins, [m for part in parts for m in part])
        return self._last[1]

    def beta_for(self, margins: list[float]) -> float:
        return self.schedule.beta_for(self._gather(margins))

    def observe(self, margins: list[float]) -> None:
        self.schedule.observe(self._gather(margins))

    def __getattr__(self, name):
        return getattr(self.schedule, name)


def _without_shm_collectives() -> None:
    """On CPU, DeepSpeed's communication backend loads its shared-memory all-reduce, a C++ extension it compiles on
    first use (30 s on 2 cores, and again each time the processes of a machine disagree on its build flags, which
    they were seen to do run after run). It speeds up inference's all-reduce; training over gloo needs none. Marked
    incompatible, the backend uses torch.distributed's gloo, as fsdp does."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DistributedTrainerMixin:
    """In front of the TRL trainers: FSDP on CPU, tensor-parallel corrections, gathered beta margins."""

    def create_accelerator_and_postprocess(self) -> None:
        import torch

        if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and not torch.cuda.is_available():
            _without_shm_collectives()
        super().create_accelerator_and_postprocess()
        if engage_fsdp_on_cpu(self.accelerator):
            self.is_fsdp_enabled = True
            log.info("fsdp: FSDP2 engaged on CPU over gloo")

    def autotp_size(self) -> int:
        if not getattr(self, "is_deepspeed_enabled", False):
            return 1
        return self.accelerator.state.deepspeed_plugin.deepspeed_config.get("tensor_parallel", {}).get("autotp_size", 1)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.autotp_size() > 1:
            self._tp_size = self.autotp_size()  # TRL's token count would count each token once per TP rank


def install_reference_sharding() -> None:
    """TRL's DPOTrainer shards the reference model with `prepare_fsdp`; shard it per layer instead."""
    import trl.trainer.dpo_trainer

    trl.trainer.dpo_trainer.prepare_fsdp = prepare_fsdp_per_layer


def describe_parallelism(model) -> dict:
    """What the training-time model is: FSDP2 shards (DTensors), tensor-parallel layers, or plain."""
    from torch.distributed.tensor import DTensor

    inner = getattr(model, "module", model)
    params = list(inner.parameters())
    modules = dict(inner.named_modules())
    classes = {}
    for suffix in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        name = next((n for n in modules if n.endswith(f"layers.0.{suffix}")), None)
        if name:
            classes[suffix] = type(modules[name]).__name__
    head = modules.get("lm_head")
    return {
        "processes": world_size(),
        "parameters": len(params),
        "dtensor_parameters": sum(isinstance(p, DTensor) for p in params),
        "layer_classes": classes,
        "lm_head": {"class": type(head).__name__, "rows": int(head.weight.shape[0])} if head is not None else None,
    }


def save_final(trainer, tokenizer, final_dir: Path) -> None:
    """A full state dict gathered from the shards (collective: every rank calls it), saved by rank 0."""
    import torch
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    acc = trainer.accelerator
    model = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
    state_dict = acc.get_state_dict(model)
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(trainer.model)
        state_dict = {k: v.float() for k, v in state_dict.items()}
        if isinstance(unwrapped, PeftModel):
            config = unwrapped.peft_config["default"]
            base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path, dtype=torch.float32)
            peft = get_peft_model(base, config)
            _, unexpected = peft.load_state_dict(state_dict, strict=False)
            if unexpected:
                raise RuntimeError(f"final: unexpected keys in the gathered LoRA state: {unexpected[:5]}")
            peft.save_pretrained(final_dir / ADAPTER)  # the adapter alone, beside the merged model
            peft.merge_and_unload().save_pretrained(final_dir, safe_serialization=True)
        else:
            with torch.device("meta"):
                fresh = AutoModelForCausalLM.from_config(unwrapped.config)
            missing, unexpected = fresh.load_state_dict(state_dict, strict=False, assign=True)
            fresh.tie_weights()
            if unexpected or set(missing) - {"lm_head.weight"}:
                raise RuntimeError(f"final: gathered state does not fit the model ({missing[:5]}, {unexpected[:5]})")
            fresh.save_pretrained(final_dir, safe_serialization=True)
        tokenizer.save_pretrained(final_dir)
    acc.wait_for_everyone()


def die_with_launcher() -> None:
    """SIGKILL this rank when its launcher dies (torchrun puts ranks in sessions of their own)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:  # the launcher died before prctl
        os._exit(137)


def finish_rank(out_dir: str, code: int) -> int:
    """Rank 0 writes its exit code for the launcher's supervisor; every rank leaves the group cleanly.

    Without the barrier and destroy_process_group a gloo rank that exits while its peer still works sometimes
    aborts in the ProcessGroupGloo destructor, and torchrun reports the run as failed.
    """
    import torch.distributed as dist

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the outcome is decided; torchrun may signal the others
    if os.environ.get("RANK", "0") == "0":
        path = Path(out_dir) / "launch" / "exit-code"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(code))
    if dist.is_available() and dist.is_initialized():
        if code in (0, 75):
            dist.barrier()
        dist.destroy_process_group()
    return code
