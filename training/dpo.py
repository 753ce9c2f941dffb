"""TRL's DPOTrainer with what prefq adds: a moving beta, reference-free DPO, a prompt-length cap, and a
faster single-process path.

The losses stay TRL's (`DPOTrainer._compute_loss`, one switch over `loss_type`). This subclass runs the
policy forward itself, so that it knows the batch's pair margins before the loss is taken, sets `self.beta`
from the schedule, and then hands TRL the outputs it already has, together with the reference log-probs,
through `loss_from_outputs`.

In one process without LoRA (the `basic` trainer), policy and reference log-probs come from
`training.logprobs` (completion positions only, one log-softmax pass, bf16 GEMMs) and the reference model's
linear layers are stored in bf16 (what autocast casts them to on every call anyway). Under `fsdp` and
`deepspeed-tp` the forward stays TRL's fused LM head, which runs inside the sharded model's forward.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from trl import DPOTrainer

from training.beta import BatchBetaSchedule, RiskBetaSchedule
from training.distributed import DistributedTrainerMixin, GatheredMargins
from training.logprobs import completion_outputs
from training.spec import TrainingSpec

_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


def make_beta_schedule(spec: TrainingSpec) -> RiskBetaSchedule | BatchBetaSchedule | None:
    if spec.beta_schedule == "constant":
        return None
    elif spec.beta_schedule == "risk":
        return RiskBetaSchedule(spec.beta, **spec.risk.model_dump())
    elif spec.beta_schedule == "batch":
        return BatchBetaSchedule(spec.beta, **spec.batch_beta.model_dump())
    raise ValueError(f"Unknown beta schedule: {spec.beta_schedule}")


class PrefqDPOTrainer(DistributedTrainerMixin, DPOTrainer):
    def __init__(self, *args, spec: TrainingSpec, **kwargs):
        self.max_prompt_length = spec.max_prompt_length
        super().__init__(*args, **kwargs)
        self.beta_schedule = make_beta_schedule(spec)
        if self.beta_schedule is not None and self.is_fsdp_enabled and self.accelerator.num_processes > 1:
            self.beta_schedule = GatheredMargins(self.beta_schedule)  # each rank has only its part of the batch
        self.reference_free = spec.reference_free
        if self.reference_free:
            self.ref_model = None  # TRL loads one whenever LoRA and precompute are off; it is never used here
        self.fast = (self.accelerator.num_processes == 1 and not isinstance(self.model, PeftModel)
                     and not self.aux_loss_enabled)  # fmt: skip
        if self.fast and self.ref_model is not None:
            self.ref_model.requires_grad_(False)
            if self.args.bf16:  # linear weights only: norms and embeddings stay fp32, as under autocast
                head = self.ref_model.get_output_embeddings()
                tied = head.weight is self.ref_model.get_input_embeddings().weight  # a bf16 head would cast both
                for module in self.ref_model.modules():
                    if isinstance(module, torch.nn.Linear) and not (tied and module is head):
                        module.to(torch.bfloat16)
        # From here on `_compute_loss` always finds the reference log-probs in its inputs: precomputed,
        # zero (reference-free), or computed by `_with_reference` just before.
        self.precompute_ref_logps = True

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        keep = self.max_prompt_length
        if keep is None:
            return dataset
        # Keep the end of a long prompt: the question sits next to the answer.
        return dataset.map(lambda ex: {"prompt_ids": ex["prompt_ids"][-keep:]}, desc="Capping prompt length")

    def _with_reference(self, inputs: dict) -> dict:
        if "ref_chosen_logps" in inputs:
            return inputs
        if self.reference_free:
            zeros = torch.zeros(inputs["input_ids"].size(0) // 2, device=inputs["input_ids"].device)
            return {**inputs, "ref_chosen_logps": zeros, "ref_rejected_logps": zeros}
        ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
        return {**inputs, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of a padded batch (also TRL's precompute pass): (chosen, rejected)."""
        if not self.fast:
            return super().compute_ref_log_probs(model, inputs)
        with torch.inference_mode():
            outputs = completion_outputs(self.accelerator.unwrap_model(model), inputs, self.accelerator.autocast())
            logps = outputs.log_probs.sum(dim=1)
        return logps.clone().chunk(2, dim=0)  # out of inference mode, usable in the loss

    def _policy_outputs(self, model, inputs: dict):
        if self.fast:
            return completion_outputs(self.accelerator.unwrap_model(model), inputs, self.accelerator.autocast())
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        return model(**model_kwargs, labels=labels, fused_lm_head=True)

    def loss_from_outputs(self, outputs, inputs: dict, return_outputs: bool = False):
        """TRL's loss and metrics for policy outputs already computed (`inputs` carry reference log-probs)."""
        return super()._compute_loss(lambda **_: outputs, inputs, return_outputs)

    def _compute_loss(self, model, inputs, return_outputs):
        inputs = self._with_reference(inputs)
        outputs = self._policy_outputs(model, inputs)
        if self.beta_schedule is not None:
            seq_len = inputs["completion_mask"].size(1) - 1
            logps = outputs.log_probs[:, -seq_len:].detach().sum(dim=1)
            chosen, rejected = logps.chunk(2, dim=0)
            margins = ((chosen - inputs["ref_chosen_logps"]) - (rejected - inputs["ref_rejected_logps"])).tolist()
            self.beta = self.beta_schedule.beta_for(margins)
            if self.model.training:
                self.beta_schedule.observe(margins)
        return self.loss_from_outputs(outputs, inputs, return_outputs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            logs["beta"] = self.beta
        super().log(logs, start_time)
