"""TRL's DPOTrainer with what prefq adds: a moving beta, reference-free DPO, a prompt-length cap, padding-free
batches, cached reference log-probs, a faster single-process path, and the reference-free pair methods ORPO and
SimPO.

The losses stay TRL's (`DPOTrainer._compute_loss`, one switch over `loss_type`). This subclass runs the
policy forward itself, so that it knows the batch's pair margins before the loss is taken, sets `self.beta`
from the schedule, and then hands TRL the outputs it already has, together with the reference log-probs,
through `loss_from_outputs`.

Padding-free (`padding_free`, on by default): the model runs on each batch's real tokens packed into one row
(`training.packing`), and the outputs come back in TRL's padded layout. In one process without LoRA (the
`basic` trainer), policy and reference log-probs come from `training.logprobs` (completion positions only, one
log-softmax pass, bf16 GEMMs) and the reference model's linear layers are stored in bf16 (what autocast casts
them to on every call anyway). Under `fsdp` and `deepspeed-tp` the forward stays TRL's fused LM head, which runs
inside the sharded model's forward.

ORPO (Hong et al. 2024) and SimPO (Meng et al. 2024) are losses of this trainer, on the same batches and paths
(packed, fused head, fsdp, deepspeed-tp), with no reference model: both score a completion by its average
log-prob per token. SimPO: -log sigmoid(beta * (avg_chosen - avg_rejected) - gamma). ORPO: TRL's `sft` loss (the
chosen answers' NLL) plus beta (the paper's lambda) times -log sigmoid of the log odds ratio of chosen over
rejected. TRL's `rewards/*` metrics are then those methods' own, beta times the average log-prob, as TRL's
CPO/ORPO trainers log them; ORPO adds `log_odds_ratio`, `log_odds_chosen` and `nll_loss`.

Precomputed reference log-probs: TRL runs the pass inside its constructor; `_precompute_ref_logps` puts the
cache of `training.refcache` in front of it when the spec names a `ref_cache_dir`, and reports each split in a
`ref_logprobs` event.
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch
import torch.nn.functional as F
from accelerate.utils import broadcast_object_list
from peft import PeftModel
from torch.utils.data import DataLoader
from trl import DPOTrainer
from trl.models import prepare_deepspeed
from trl.trainer.utils import global_then_local_main_first, use_adapter

from training import lengths, refcache
from training.beta import BatchBetaSchedule, RiskBetaSchedule
from training.distributed import DistributedTrainerMixin, GatheredMargins
from training.events import emit
from training.logprobs import completion_outputs
from training.packing import pack, use_varlen_attention
from training.spec import REFERENCE_FREE_METHODS, TrainingSpec

_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
_PER_TOKEN_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def make_beta_schedule(spec: TrainingSpec) -> RiskBetaSchedule | BatchBetaSchedule | None:
    if spec.beta_schedule == "constant":
        return None
    elif spec.beta_schedule == "risk":
        return RiskBetaSchedule(spec.beta, **spec.risk.model_dump())
    elif spec.beta_schedule == "batch":
        return BatchBetaSchedule(spec.beta, **spec.batch_beta.model_dump())
    raise ValueError(f"Unknown beta schedule: {spec.beta_schedule}")


def _with_reference_columns(dataset, chosen: torch.Tensor, rejected: torch.Tensor):
    """The split with its reference log-probs as float32 columns, in memory."""
    dataset = dataset.add_column("ref_chosen_logps", chosen.float().numpy())
    return dataset.add_column("ref_rejected_logps", rejected.float().numpy())


class PrefqDPOTrainer(DistributedTrainerMixin, DPOTrainer):
    def __init__(self, *args, model, spec: TrainingSpec, **kwargs):
        # Set before TRL's constructor, which runs the reference precompute pass.
        self.spec = spec
        self.max_prompt_length = spec.max_prompt_length
        self.packed = spec.padding_free and use_varlen_attention(model)  # TRL's own reference copy inherits it
        self.reference_forward_passes = 0
        super().__init__(*args, model=model, **kwargs)
        self.beta_schedule = make_beta_schedule(spec)
        if self.beta_schedule is not None and self.is_fsdp_enabled and self.accelerator.num_processes > 1:
            self.beta_schedule = GatheredMargins(self.beta_schedule)  # each rank has only its part of the batch
        self.reference_free = not spec.has_reference
        if self.reference_free:
            self.ref_model = None  # TRL loads one whenever LoRA and precompute are off; it is never used here
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

    @property
    def fast(self) -> bool:
        """One process, no LoRA, no MoE auxiliary loss: log-probs from `training.logprobs`, not TRL's fused head."""
        return (
            self.accelerator.num_processes == 1 and not isinstance(self.model, PeftModel) and not self.aux_loss_enabled
        )

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # TRL drops the rows whose prompt fills max_length without a word (and, when all are, the run dies later on
        # an empty loader): prefq tokenizes without that filter, caps prompts, then drops and counts itself.
        with lengths.unlimited(args) as limit:
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        cap = self.max_prompt_length
        # Main process first, as TRL's own maps: on a dataset that the ranks share on disk, ranks mapping at once
        # write the same cache file.
        with global_then_local_main_first():
            if cap is not None:  # keep the end of a long prompt: the question sits next to the answer
                dataset = dataset.map(lambda ex: {"prompt_ids": ex["prompt_ids"][-cap:]}, desc="Capping prompt length")
            if limit is None:
                return dataset
            prompts = [len(p) for p in dataset["prompt_ids"]]
            answers = [max(len(c), len(r)) for c, r in zip(dataset["chosen_ids"], dataset["rejected_ids"], strict=True)]
            kept = [p < limit or args.truncation_mode == "keep_end" for p in prompts]
            return lengths.keep(
                dataset_name, dataset, [p + a for p, a in zip(prompts, answers, strict=True)], kept, limit
            )

    @functools.cached_property
    def reference_fingerprint(self) -> str:
        """The reference model folder's fingerprint (`training.refcache`), hashed once for both splits."""
        return refcache.folder_fingerprint(self.spec.model)

    def _cache_settings(self) -> dict:
        """What besides the reference model and the token ids decides the reference log-probs (`training.refcache`)."""
        return {
            "max_length": self.args.max_length,
            "truncation_mode": self.args.truncation_mode,
            "precision": self.spec.precision,
            "device": self.accelerator.device.type,
            "logprobs": "prefq-completion-head" if self.fast else "trl-fused-head",
            "packed": self.packed,
        }

    def _reference_pass(self, dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference log-probs of a split, (chosen, rejected), as TRL's precompute pass scores them, but kept in
        memory: TRL writes them to a cache file beside the split's Arrow files, which ranks of one job only share
        when the split is saved on disk, and ranks reading Arrow files that another rank writes is a race."""
        loader = self.accelerator.prepare(
            DataLoader(
                dataset,
                batch_size=batch_size,
                collate_fn=self.data_collator,
                shuffle=False,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory,
            )
        )
        if self.ref_model is None and self.is_deepspeed_enabled:  # one inference engine for every pass, as TRL's
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        else:
            model = self.ref_model or self.model
        chosen, rejected = [], []
        # Under AutoTP every rank scores the same batch (TP over all processes): nothing to gather.
        gather = self.accelerator.gather_for_metrics if self.autotp_size() <= 1 else (lambda ref: ref)
        for batch in loader:
            ref = gather(self.compute_ref_log_probs(model, batch))
            chosen.append(ref[0].float().cpu())
            rejected.append(ref[1].float().cpu())
        return torch.cat(chosen), torch.cat(rejected)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """The reference pass over a split, behind the spec's reference cache; one `ref_logprobs` event per split."""
        if self.spec.ref_cache_dir is None:
            chosen, rejected = self._reference_pass(dataset, batch_size)
            return _with_reference_columns(dataset, chosen, rejected)
        started = time.perf_counter()
        decision = [None, None]
        if self.accelerator.is_main_process:  # one hash of the model folder and the data, shared by every rank
            key = refcache.cache_key(
                refcache.key_document(self.reference_fingerprint, refcache.rows_digest(dataset), self._cache_settings())
            )
            decision = [key, refcache.cache_path(self.spec.ref_cache_dir, key).is_file()]
        broadcast_object_list(decision, from_process=0)
        key, hit = decision
        path = refcache.cache_path(self.spec.ref_cache_dir, key)
        cached = refcache.load(path, key, len(dataset)) if hit else None
        passes_before = self.reference_forward_passes
        if cached is not None:
            chosen, rejected = cached
        else:
            chosen, rejected = self._reference_pass(dataset, batch_size)
            if self.accelerator.is_main_process:
                refcache.store(path, key, chosen, rejected)
        dataset = _with_reference_columns(dataset, chosen, rejected)
        emit(
            "ref_logprobs",
            split=name,
            key=key,
            cached=cached is not None,
            rows=len(dataset),
            path=str(path),
            forward_passes=self.reference_forward_passes - passes_before,
            seconds=round(time.perf_counter() - started, 3),
        )
        return dataset

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
        self.reference_forward_passes += 1
        if self.fast:
            with torch.inference_mode():
                outputs = completion_outputs(
                    self.accelerator.unwrap_model(model), inputs, self.accelerator.autocast(), self.packed
                )
            return outputs.log_probs.sum(dim=1).clone().chunk(2, dim=0)  # out of inference mode, usable in the loss
        if not self.packed:
            return super().compute_ref_log_probs(model, inputs)
        adapter = contextlib.nullcontext()
        if self.ref_model is None and isinstance(unwrapped := self.accelerator.unwrap_model(self.model), PeftModel):
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with torch.no_grad(), adapter, self.accelerator.autocast():
            outputs = self.fused_head_outputs(model, inputs)
        return outputs.log_probs.sum(dim=1).chunk(2, dim=0)

    def fused_head_outputs(self, model, inputs: dict, **model_kwargs):
        """TRL's fused LM head through the (possibly sharded) model's forward; packed when `self.packed`."""
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        if not self.packed:
            padded = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
            return model(**padded, **model_kwargs, labels=labels, fused_lm_head=True, use_cache=False)
        row = pack(inputs["input_ids"], inputs["attention_mask"])
        scored = inputs["attention_mask"][:, 1:].bool()  # positions whose next token is in the same sequence
        shift_labels = labels.new_full(row.input_ids.shape, -100)
        shift_labels[0, row.offsets[scored]] = labels[:, 1:][scored]
        outputs = model(
            **row.model_kwargs(), **model_kwargs, shift_labels=shift_labels, fused_lm_head=True, use_cache=False
        )
        for name in _PER_TOKEN_OUTPUTS:
            if (values := getattr(outputs, name)) is not None:
                outputs[name] = row.spread(values[0], scored)
        return outputs

    def _policy_outputs(self, model, inputs: dict):
        if self.fast:
            return completion_outputs(
                self.accelerator.unwrap_model(model), inputs, self.accelerator.autocast(), self.packed
            )
        router = {"output_router_logits": True} if self.aux_loss_enabled else {}
        return self.fused_head_outputs(model, inputs, **router)

    def loss_from_outputs(self, outputs, inputs: dict, return_outputs: bool = False):
        """TRL's loss and metrics for policy outputs already computed (`inputs` carry reference log-probs), plus the
        ORPO or SimPO term."""
        result = super()._compute_loss(lambda **_: outputs, inputs, return_outputs)
        if self.spec.method not in REFERENCE_FREE_METHODS:
            return result
        extra = self._reference_free_loss(outputs, inputs)
        return (result[0] + extra, result[1]) if return_outputs else result + extra

    def _reference_free_loss(self, outputs, inputs: dict) -> torch.Tensor:
        """SimPO's loss, or ORPO's odds-ratio term, from the policy's average log-prob per completion token."""
        mask = inputs["completion_mask"][:, 1:]
        per_token = outputs.log_probs[:, -mask.size(1) :] * mask
        average = per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        chosen, rejected = average.chunk(2, dim=0)
        metrics = self._metrics["train" if self.model.training else "eval"]
        if self.spec.method == "simpo":
            loss = -F.logsigmoid(self.beta * (chosen - rejected) - self.spec.simpo_gamma).mean()
        else:  # orpo: log(p / (1 - p)) of each answer, p its average per-token probability
            below_one = -1e-6  # log(1 - p) at p = 1 is -inf
            log_odds = (chosen - rejected) - (
                torch.log1p(-torch.exp(chosen.clamp(max=below_one)))
                - torch.log1p(-torch.exp(rejected.clamp(max=below_one)))
            )
            loss = -self.beta * F.logsigmoid(log_odds).mean()
            metrics["nll_loss"].append(self.accelerator.gather(-chosen.detach()).mean().item())
            metrics["log_odds_ratio"].append(self.accelerator.gather(F.logsigmoid(log_odds).detach()).mean().item())
            metrics["log_odds_chosen"].append(self.accelerator.gather(log_odds.detach()).mean().item())
        # TRL logged rewards from summed log-probs; these methods' rewards are beta times the average log-prob
        rewards = self.beta * average.detach()
        chosen_rewards, rejected_rewards = rewards.chunk(2, dim=0)
        for name, value in (
            ("rewards/chosen", chosen_rewards),
            ("rewards/rejected", rejected_rewards),
            ("rewards/accuracies", (chosen_rewards > rejected_rewards).float()),
            ("rewards/margins", chosen_rewards - rejected_rewards),
        ):
            metrics[name][-1] = self.accelerator.gather(value).mean().item()
        return loss

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
