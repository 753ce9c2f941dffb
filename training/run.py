"""One training run: a spec in, JSON-lines events out, checkpoints and the final model in a local folder.

OUT/
  spec.json            the resolved spec
  checkpoint-N/        resumable: model, optimizer, scheduler, RNG, data position (trainer_state.json),
                       beta-schedule state; `prefq-manifest.json` is written last. `fsdp` and `deepspeed-tp`
                       checkpoints also hold hf/: the shards gathered into a folder `from_pretrained` loads
  final/               save_pretrained (safetensors) and the tokenizer; LoRA adapters are merged in, and kept
                       alone in final/adapter/ (PEFT's folder: served on the base, exported as it is)
  metrics.json         the last train and eval metrics, under TRL's names

SIGTERM: the run saves a checkpoint at the end of the current step and exits with EXIT_STOPPED (75).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from training.best import Best, MetricMissing
from training.chat import TemplateError
from training.events import emit
from training.formats import DataError
from training.lengths import TooLong
from training.spec import (
    ADAPTER,
    CONSOLIDATED,
    EXIT_INFRA_ERROR,
    EXIT_OK,
    EXIT_STOPPED,
    EXIT_USER_ERROR,
    MANIFEST_NAME,
    SpecError,
    TrainingSpec,
    load_spec,
    resolve_precision,
)
from training.warm import LEFT_OUT, leave_out

log = logging.getLogger("training")
SCHEDULE_STATE = "beta-schedule.json"


class ModelError(ValueError):
    """The model cannot be loaded (`invalid_model`) or does not fit (`model_too_big`): the user's to fix."""

    def __init__(self, message: str, code: str = "invalid_model"):
        super().__init__(message)
        self.code = code


class StopRequested(Exception):
    """SIGTERM before the training loop started: nothing to save."""


class _Stop:
    requested = False
    training = False


def _install_sigterm(stop: _Stop) -> None:
    def handler(signum, frame):
        stop.requested = True
        if not stop.training:
            raise StopRequested()

    signal.signal(signal.SIGTERM, handler)


def newest_checkpoint(out_dir: Path) -> Path | None:
    """The complete checkpoint (manifest present) with the highest step."""
    done = [p for p in out_dir.glob("checkpoint-*") if (p / MANIFEST_NAME).is_file()]
    return max(done, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def _write_manifest(ckpt: Path, step: int, epoch: float | None, spec: TrainingSpec) -> None:
    files = {str(p.relative_to(ckpt)): p.stat().st_size for p in sorted(ckpt.rglob("*")) if p.is_file()}
    manifest = {
        "step": step,
        "epoch": epoch,
        "base_model": spec.model,
        "method": spec.method,
        "spec": spec.resolved().model_dump(mode="json"),
        "files": files,
        "created_at": time.time(),
    }
    tmp = ckpt / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, ckpt / MANIFEST_NAME)


def _model_config(spec: TrainingSpec) -> dict:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec.model).to_dict()
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"model: cannot load {spec.model}: {exc}") from None


def _available(spec: TrainingSpec) -> tuple[int, bool, int]:
    """(bytes free per device, whether the devices are CPU processes sharing the host, devices on this machine)."""
    import psutil
    import torch

    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0], False, torch.cuda.device_count()
    processes = spec.gpus if spec.trainer != "basic" else 1
    return psutil.virtual_memory().available // processes, True, 1


class _Peak:
    """The run's peak memory above what it held before loading the model: the device's allocator on CUDA, the
    process's resident set (its high-water mark reset through /proc) on CPU."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            except OSError:
                pass
            self.base = self._status("VmRSS")

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def bytes(self) -> int:
        import torch

        peak = torch.cuda.max_memory_allocated() if self.cuda else self._status("VmHWM")
        return max(0, peak - self.base)


@dataclass
class _Fit:
    """The memory estimate of a run (`training.memory`) against what its device has free."""

    spec: TrainingSpec
    config: dict
    free: int
    cpu: bool
    devices: int

    def __post_init__(self):
        from training.memory import estimate

        self.need = estimate(self.config, self.spec, self.cpu)

    def advice(self) -> str:
        from training.memory import advice

        return advice(self.config, self.spec, self.free, self.cpu, self.devices)

    def event(self, peak: int) -> dict:
        from training.memory import GIB

        return {
            "device": "cpu" if self.cpu else "cuda",
            "estimated_gib": round(self.need.total / GIB, 3),
            "parts_gib": {k: round(v / GIB, 3) for k, v in self.need.parts.items()},
            "available_gib": round(self.free / GIB, 3),
            "peak_gib": round(peak / GIB, 3),
        }


def _check_fits(spec: TrainingSpec) -> _Fit:
    """Refuse a run whose estimated peak memory per device exceeds what its device has free, before the model loads."""
    fit = _Fit(spec, _model_config(spec), *_available(spec))
    if fit.need.total > fit.free:
        raise ModelError(f"model: {fit.advice()}", code="model_too_big")
    return fit


def _quantization(spec: TrainingSpec) -> dict:
    """QLoRA's loading arguments: the frozen linear layers in NF4 with double quantisation, computing in the run's
    precision (bf16, or fp32 on a device without native bf16)."""
    if spec.lora is None or spec.lora.quantize is None:
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if spec.precision == "bf16" else torch.float32,
    )
    return {"quantization_config": config}


def _check_devices(spec: TrainingSpec) -> None:
    """Options that need a library or a device this worker may lack are refused by name before anything loads."""
    import importlib.util

    import torch

    if spec.use_liger_kernel:
        if not torch.cuda.is_available():
            raise SpecError("use_liger_kernel: Liger's kernels are Triton kernels for CUDA GPUs; this worker has none")
        if importlib.util.find_spec("liger_kernel") is None:
            raise SpecError("use_liger_kernel: the liger-kernel package is not installed on this worker")
    if spec.lora is not None and spec.lora.quantize is not None:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise SpecError("lora.quantize: QLoRA needs the bitsandbytes package, which this worker does not have")
        if not torch.cuda.is_available() and not _bitsandbytes_on_cpu():
            raise SpecError("lora.quantize: this worker's bitsandbytes has no CPU backend and there is no CUDA GPU")


def _bitsandbytes_on_cpu() -> bool:
    """Whether bitsandbytes quantises to NF4 on this CPU (its CPU backend, from 0.46 on)."""
    import torch

    try:
        import bitsandbytes.functional as F

        packed, state = F.quantize_4bit(torch.ones(64, 64), quant_type="nf4")
        return bool(torch.allclose(F.dequantize_4bit(packed, state), torch.ones(64, 64)))
    except Exception:  # noqa: BLE001 - any failure means: it cannot
        return False


def _load_model(spec: TrainingSpec):
    """The model to train and its tokenizer; for `reward`, the causal LM's body under a new one-score head."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    kwargs = {"dtype": torch.float32, **_quantization(spec)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.model)
        if spec.method == "reward":
            from transformers import set_seed

            set_seed(spec.seed)  # the new head's initial weights come from the run's seed, as every other draw
            model = AutoModelForSequenceClassification.from_pretrained(spec.model, num_labels=1, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(spec.model, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model: cannot load {spec.model}: {exc}") from None
    if spec.use_liger_kernel:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        # RMSNorm, RoPE and SwiGLU; the LM head stays prefq's completion head (`training.logprobs`), not Liger's
        _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False, cross_entropy=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:  # a classifier finds each sequence's last token by the pad token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


class _NothingLeft(Exception):
    """Raised before a step when the run has already trained all of its steps."""


def _make_callback(
    spec: TrainingSpec, stop: _Stop, n_train: int, n_eval: int, prompts: list | None = None, items: list | None = None
):
    from transformers import TrainerCallback

    class EventsCallback(TrainerCallback):
        """Turns the Trainer's hooks into events, manifests and a clean stop on SIGTERM."""

        def __init__(self):
            self.trainer = None
            self.last_train: dict = {}
            self.last_eval: dict = {}
            self.last_checkpoint: Path | None = None
            self.sampler = None
            selection = spec.selection
            self.best = (
                Best(*selection, spec.early_stopping_patience, spec.early_stopping_min_delta) if selection else None
            )

        def _samples(self, step: int) -> dict[str, float]:
            """The evaluation's samples; their metrics (`sample_grader`'s mean grade, `sample_judge`'s win rate)."""
            if self.sampler is None:
                from training.samples import Sampler

                self.sampler = Sampler(spec, prompts or [], self.trainer.processing_class, items)
            return self.sampler.run(self.trainer, step)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if self.best is None:
                return
            improved, stop_now = self.best.update(state.global_step, metrics or {})
            training = self.trainer.is_in_train  # not the evaluation after the last step (the final model is kept)
            if improved:
                emit("best", **self.best.event())
                control.should_save = training and state.global_step > 0  # kept (step 0's is the model it started from)
            if stop_now and training:
                emit("early_stopping", step=state.global_step, patience=self.best.patience, best=self.best.event())
                control.should_training_stop = True

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            from training.distributed import describe_parallelism

            emit(
                "started",
                total_steps=state.max_steps,
                examples=n_train,
                eval_examples=n_eval,
                epochs=spec.epochs if spec.max_steps is None else None,
                resumed_from_step=state.global_step,
                trainer=spec.trainer,
                precision=spec.precision,
                parallelism=describe_parallelism(model),
                # batches packed into one row (DPO's `packed`, TRL's SFT `padding_free`)
                padding_free=bool(
                    getattr(self.trainer, "packed", False) or getattr(self.trainer, "padding_free", False)
                ),
            )

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None and any(k.startswith("eval_") for k in logs):
                # an evaluation: its samples first, so that their grade is one of its metrics (the same dict reaches
                # `on_evaluate`, where best_metric may name it)
                logs.update(self._samples(state.global_step))
            logs = dict(logs or {})
            if any(k.startswith("eval_") for k in logs):
                self.last_eval = {k: v for k, v in logs.items() if k.startswith("eval_")}
                emit("eval", step=state.global_step, metrics=self.last_eval)
            elif "loss" in logs:
                loss, lr = logs.pop("loss"), logs.pop("learning_rate", None)
                logs.pop("epoch", None)
                self.last_train = {"loss": loss, **logs}
                emit(
                    "progress",
                    step=state.global_step,
                    total_steps=state.max_steps,
                    epoch=state.epoch,
                    loss=loss,
                    learning_rate=lr,
                    metrics=logs,
                )

        def on_step_begin(self, args, state, control, **kwargs):
            # Resumed from a checkpoint at the last step, the Trainer would still run one more (its loop checks
            # max_steps only after a step): the checkpoint's weights are already the result.
            if 0 < state.max_steps <= state.global_step:
                raise _NothingLeft

        def on_step_end(self, args, state, control, **kwargs):
            if _stop_agreed(stop):
                control.should_save = True
                control.should_training_stop = True

        def on_save(self, args, state, control, **kwargs):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            _barrier()
            if self.trainer.is_fsdp_enabled or self.trainer.is_deepspeed_enabled:
                # the shards consolidated (collective) into a folder that `from_pretrained` loads: served and
                # exported as it is, on machines without the job's processes
                from training.distributed import save_final

                save_final(self.trainer, self.trainer.processing_class, ckpt / CONSOLIDATED)
            if state.is_world_process_zero:
                schedule = getattr(self.trainer, "beta_schedule", None)
                if schedule is not None:
                    (ckpt / SCHEDULE_STATE).write_text(json.dumps(schedule.state_dict()))
                if self.best is not None:
                    self.best.save(ckpt)
                _write_manifest(ckpt, state.global_step, state.epoch, spec)
                emit("checkpoint", step=state.global_step, path=str(ckpt))
            self.last_checkpoint = ckpt

    return EventsCallback()


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        import torch.distributed as dist

        dist.barrier()


def _stop_agreed(stop: _Stop) -> bool:
    """Whether any process was asked to stop: all ranks must save the same step."""
    if not _distributed():
        return stop.requested
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if stop.requested else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _trainer_args(spec: TrainingSpec, out_dir: Path, has_eval: bool) -> dict:
    import torch

    return dict(
        output_dir=str(out_dir),
        max_steps=spec.max_steps or -1,
        num_train_epochs=spec.epochs,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        learning_rate=spec.resolved_learning_rate,
        lr_scheduler_type=spec.lr_scheduler,
        warmup_steps=spec.warmup_steps,
        weight_decay=spec.weight_decay,
        max_grad_norm=spec.max_grad_norm,
        max_length=spec.max_length,
        bf16=spec.precision == "bf16",
        gradient_checkpointing=spec.gradient_checkpointing,
        seed=spec.seed,
        data_seed=spec.seed,
        logging_steps=spec.logging_steps,
        save_strategy="steps",
        save_steps=spec.save_steps,
        eval_strategy="steps" if (has_eval and spec.eval_steps) else "no",
        eval_steps=spec.eval_steps,
        eval_on_start=has_eval,
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )


def build_trainer(spec: TrainingSpec, out_dir: Path, train_ds, eval_ds, callback):
    """The TRL trainer for the spec's method, with the model loaded and the callback attached."""
    from transformers import PrinterCallback

    model, tokenizer = _load_model(spec)
    peft_config = None
    if spec.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=spec.lora.r,
            lora_alpha=spec.lora.alpha,
            lora_dropout=spec.lora.dropout,
            target_modules=spec.lora.target_modules,
            task_type="SEQ_CLS" if spec.method == "reward" else "CAUSAL_LM",  # SEQ_CLS trains the new head too
        )
    common = _trainer_args(spec, out_dir, eval_ds is not None)
    inputs = dict(
        model=model,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[callback],
    )
    if spec.pairs:  # DPO, and ORPO and SimPO as reference-free losses of the same trainer (`training.dpo`)
        from trl import DPOConfig

        from training.dpo import PrefqDPOTrainer

        args = DPOConfig(
            **common,
            beta=spec.beta,
            loss_type=spec.loss_types if spec.method == "dpo" else ["sft"],
            loss_weights=spec.loss_weights if spec.method == "dpo" else [1.0 if spec.method == "orpo" else 0.0],
            label_smoothing=spec.label_smoothing,
            precompute_ref_log_probs=spec.precomputes_reference,
        )
        trainer = PrefqDPOTrainer(args=args, spec=spec, **inputs)
    elif spec.method == "sft":
        from trl import SFTConfig

        from training.packing import use_varlen_attention
        from training.sft import PrefqSFTTrainer

        packed = spec.padding_free and use_varlen_attention(model)
        args = SFTConfig(**{**common, "max_length": None}, padding_free=packed)  # max_length: `training.sft`
        trainer = PrefqSFTTrainer(args=args, max_length=spec.max_length, **inputs)
    elif spec.method == "reward":
        from trl import RewardConfig

        from training.reward import PrefqRewardTrainer

        args = RewardConfig(**common, center_rewards_coefficient=spec.center_rewards_coefficient)
        trainer = PrefqRewardTrainer(args=args, **inputs)
    elif spec.method == "grpo":
        from training.grpo import build

        trainer = build(spec, common, inputs)
    elif spec.method == "kto":
        from trl import KTOConfig

        from training.kto import PrefqKTOTrainer

        args = KTOConfig(
            **common,
            beta=spec.beta,
            desirable_weight=spec.desirable_weight,
            undesirable_weight=spec.undesirable_weight,
        )
        trainer = PrefqKTOTrainer(args=args, **inputs)
    else:
        raise ValueError(f"Unknown method: {spec.method}")
    trainer.remove_callback(PrinterCallback)
    callback.trainer = trainer
    return trainer, tokenizer


def _merged_in_full_precision(model, final_dir: Path):
    """QLoRA's adapters merged into the base loaded unquantized (fp32, on the CPU): a model that any job, the
    playground and `from_pretrained` load without bitsandbytes, and no rounding of the update into NF4. The
    adapter stays in FINAL/adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    adapter = final_dir / ADAPTER
    model.save_pretrained(adapter)
    base_path = model.peft_config["default"].base_model_name_or_path
    cls = (
        AutoModelForSequenceClassification
        if model.base_model.model.__class__.__name__.endswith("Classification")
        else AutoModelForCausalLM
    )
    extra = {"num_labels": 1} if cls is AutoModelForSequenceClassification else {}
    base = cls.from_pretrained(base_path, dtype=torch.float32, device_map="cpu", **extra)
    return PeftModel.from_pretrained(base, adapter).merge_and_unload()


def _save_final(trainer, tokenizer, final_dir: Path) -> None:
    from peft import PeftModel

    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        from training.distributed import save_final

        return save_final(trainer, tokenizer, final_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if isinstance(model, PeftModel) and getattr(model.base_model.model, "is_loaded_in_4bit", False):
        model = _merged_in_full_precision(model, final_dir)
    elif isinstance(model, PeftModel):
        if trainer.accelerator.is_main_process:
            model.save_pretrained(final_dir / ADAPTER)
        model = model.merge_and_unload()
    if trainer.accelerator.is_main_process:
        model.save_pretrained(final_dir, safe_serialization=True)
        tokenizer.save_pretrained(final_dir)


def train(spec: TrainingSpec, out_dir: Path, resume: bool, stop: _Stop) -> int:
    from datasets import disable_progress_bars

    from training.data import load_splits
    from training.distributed import install_reference_sharding, world_size

    disable_progress_bars()
    main_rank = os.environ.get("RANK", "0") == "0"
    out_dir.mkdir(parents=True, exist_ok=True)
    if main_rank:
        (out_dir / "spec.json").write_text(spec.resolved().model_dump_json(indent=1))
    train_ds, eval_ds = load_splits(spec)
    if world_size() > 1:
        install_reference_sharding()
    else:
        from training.logprobs import keep_freed_memory

        keep_freed_memory()
    _check_devices(spec)
    fit = _check_fits(spec)
    checkpoint = newest_checkpoint(out_dir) if resume else None
    if resume and checkpoint is None:
        log.warning("--resume: no complete checkpoint in %s, starting from step 0", out_dir)
    from training.samples import held_out_prompts

    items = None
    if eval_ds is None or spec.method == "reward":  # a reward model scores and writes nothing: no samples
        prompts = []
    elif spec.method == "grpo" or spec.sample_grader is not None:  # samples graded against their rows
        prompts, items = held_out_prompts(eval_ds, spec.sample_prompts, with_items=True)
    else:
        prompts = held_out_prompts(eval_ds, spec.sample_prompts)
    n_eval = len(eval_ds) if eval_ds is not None else 0
    callback = _make_callback(spec, stop, len(train_ds), n_eval, prompts, items)
    peak = _Peak()
    try:
        trainer, tokenizer = build_trainer(spec, out_dir, train_ds, eval_ds, callback)
        schedule = getattr(trainer, "beta_schedule", None)
        if checkpoint is not None and schedule is not None and (checkpoint / SCHEDULE_STATE).is_file():
            schedule.load_state_dict(json.loads((checkpoint / SCHEDULE_STATE).read_text()))
        if checkpoint is not None and callback.best is not None:
            callback.best.load(checkpoint)

        stop.training = True
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except _NothingLeft:
            log.info(
                "resumed at step %d of %d: nothing left to train", trainer.state.global_step, trainer.state.max_steps
            )
    except Exception as exc:
        if _is_out_of_memory(exc):  # the user's to fix, with what would fit; never retried as a fault of ours
            traceback.print_exc(file=sys.stderr)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"out of memory ({first}). {fit.advice()}", code="model_too_big") from None
        raise
    emit("memory", **fit.event(peak.bytes()))
    if stop.requested:
        saved = callback.last_checkpoint
        emit("stopped", step=trainer.state.global_step, checkpoint=str(saved) if saved else None)
        return EXIT_STOPPED
    step = trainer.state.global_step
    if eval_ds is not None and not (spec.eval_steps and step % spec.eval_steps == 0):
        trainer.evaluate()
    final_dir = out_dir / "final"
    _save_final(trainer, tokenizer, final_dir)
    metrics = {"step": step, "train": callback.last_train, "eval": callback.last_eval}
    if callback.best is not None:
        metrics["best"] = _best_model(callback.best, step, out_dir, final_dir)
    if main_rank:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    emit("done", final_path=str(final_dir), metrics=metrics)
    return EXIT_OK


def _best_model(best: Best, step: int, out_dir: Path, final_dir: Path) -> dict:
    """The best evaluation and where its model is: its checkpoint, the final model (the last step was the best and
    no checkpoint was saved there), or none (the model before training was the best)."""
    found = dict(best.event(), path=None)
    if best.step == step and not (out_dir / f"checkpoint-{step}").is_dir():
        found["path"] = str(final_dir)
    elif best.step:
        found["path"] = str(out_dir / f"checkpoint-{best.step}")
    return found


def libraries_needed(spec: TrainingSpec) -> set[str]:
    """Of the libraries that `_skip_unused_libraries` may mark absent, those this run needs: bitsandbytes where it
    quantizes or loads a model saved quantized (a QLoRA job's)."""
    try:
        quantized = "quantization_config" in json.loads((Path(spec.model) / "config.json").read_text())
    except (OSError, ValueError):
        quantized = True
    return {"bitsandbytes"} if quantized or (spec.lora is not None and spec.lora.quantize is not None) else set()


def _skip_unused_libraries(spec: TrainingSpec) -> None:
    """Libraries that peft, transformers and TRL import as they load when installed, which a run does not use:
    bitsandbytes unless it quantizes (1 to 1.7 s of every run's start, measured here), and the trackers, which the
    worker process drives, never the run (0.3 s). They are marked absent before anything looks."""
    leave_out(set(LEFT_OUT) - libraries_needed(spec))


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def _evaluate(spec: TrainingSpec, out_dir: Path, stop: _Stop) -> int:
    """An evaluation run (`training.evaluate`); its own failures as `error` events."""
    from training.evaluate import EvalError, evaluate

    try:
        return evaluate(spec, out_dir, stop)
    except EvalError as exc:
        emit("error", code=exc.code, message=str(exc), user_error=exc.user_error)
        return EXIT_USER_ERROR if exc.user_error else EXIT_INFRA_ERROR


def main(spec_path: str, out_dir: str, resume: bool) -> int:
    """Run and map every failure to an `error` event and an exit code; never a bare traceback."""
    stop = _Stop()
    _install_sigterm(stop)
    try:
        spec = resolve_precision(load_spec(spec_path))
        _skip_unused_libraries(spec)
        if spec.method == "eval":
            return _evaluate(spec, Path(out_dir), stop)
        if spec.nodes > 1 and "LOCAL_RANK" not in os.environ:  # the launcher of the nodes' ranks
            from training.cluster import launch_nodes

            return launch_nodes(spec, spec_path, Path(out_dir), resume)
        if spec.trainer != "basic" and "LOCAL_RANK" not in os.environ:
            from training.launch import launch

            return launch(spec, spec_path, Path(out_dir), resume)  # the ranks come back in here
        return train(spec, Path(out_dir), resume, stop)
    except StopRequested:
        emit("stopped", step=0, checkpoint=None)
        return EXIT_STOPPED
    except (SpecError, MetricMissing) as exc:
        emit("error", code="invalid_spec", message=str(exc), user_error=True)
    except DataError as exc:
        emit(
            "error", code="invalid_data", message=str(exc), user_error=True, errors=[vars(p) for p in exc.report.errors]
        )
    except ModelError as exc:
        emit("error", code=exc.code, message=str(exc), user_error=True)
    except TooLong as exc:
        emit("error", code="rows_too_long", message=str(exc), user_error=True)
    except TemplateError as exc:
        emit("error", code="template_cannot_render", message=f"train_file: {exc}", user_error=True)
    except Exception as exc:  # noqa: BLE001 - the last line of defence of a child process
        traceback.print_exc(file=sys.stderr)
        if not _is_out_of_memory(exc):
            emit("error", code="training_crashed", message=f"{type(exc).__name__}: {exc}", user_error=False)
            return EXIT_INFRA_ERROR
        # out of memory before the estimate was made (while reading the data): no advice to give
        emit("error", code="model_too_big", message=f"out of memory: {exc}", user_error=True)
    return EXIT_USER_ERROR
