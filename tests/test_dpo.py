"""The DPO trainer in-process: every loss type, ORPO and SimPO, losses worked out by hand, beta schedules."""

import math

import pytest
import torch

from training.beta import BatchBetaSchedule, RiskBetaSchedule, quantile
from training.spec import DPO_LOSS_TYPES, parse_spec


def make_trainer(tmp_path, model, data, method="dpo", **overrides):
    from training.data import load_splits
    from training.run import _make_callback, _Stop, build_trainer

    spec = parse_spec(
        {
            "method": method,
            "model": str(model),
            "train_file": str(data),
            "eval_fraction": 0,
            "max_steps": 2,
            "batch_size": 8,
            "learning_rate": 1e-2,
            "max_length": 64,
            "save_steps": 100,
            "precision": "fp32",
            **overrides,
        }
    )
    train_ds, _ = load_splits(spec)
    trainer, _ = build_trainer(spec, tmp_path, train_ds, None, _make_callback(spec, _Stop(), len(train_ds), 0))
    return trainer


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_every_loss_type_trains(tmp_path, micro_model, toy_dpo, loss_type):
    extra = {"label_smoothing": 1e-3} if loss_type == "exo_pair" else {}
    trainer = make_trainer(tmp_path, micro_model, toy_dpo, loss_type=loss_type, **extra)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) == len(before), f"{loss_type}: unchanged {set(before) - set(changed)}"


def fixed_outputs(per_token: list[list[float]]):
    """Policy outputs whose completion tokens have the given log-probs (2 completion tokens per sequence)."""
    from trl.trainer.utils import FusedCausalLMOutput

    log_probs = torch.zeros(len(per_token), 4)
    log_probs[:, 2:] = torch.tensor(per_token)
    zeros = torch.zeros_like(log_probs)
    return FusedCausalLMOutput(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def by_hand_inputs():
    # sequences of 5 tokens: 3 prompt, 2 completion; rows are [chosen_1, chosen_2, rejected_1, rejected_2]
    mask = torch.tensor([[0, 0, 0, 1, 1]] * 4)
    return {
        "input_ids": torch.ones(4, 5, dtype=torch.long),
        "attention_mask": torch.ones(4, 5, dtype=torch.long),
        "completion_mask": mask,
        "ref_chosen_logps": torch.tensor([-11.0, -8.0]),
        "ref_rejected_logps": torch.tensor([-11.0, -9.0]),
    }


def test_sigmoid_and_ipo_losses_match_hand_computation(tmp_path, micro_model, toy_dpo):
    """Policy log-probs: chosen -10 and -6, rejected -12 and -9 (each the sum of two tokens).

    Reference: chosen -11 and -8, rejected -11 and -9. Log-ratios: chosen 1 and 2, rejected -1 and 0,
    so h = chosen - rejected = 2 and 2.
    sigmoid, beta 0.1: -log sigmoid(0.1 * 2) = log(1 + e^-0.2) = 0.598138869381...
    IPO, beta 0.1 (TRL divides each log-ratio by its 2 completion tokens): (2/2 - 1/(2 * 0.1))^2 = (1 - 5)^2 = 16
    for both pairs. beta 0.5: (1 - 1)^2 = 0.
    """
    outputs = fixed_outputs([[-5.0, -5.0], [-3.0, -3.0], [-6.0, -6.0], [-4.5, -4.5]])
    trainer = make_trainer(tmp_path, micro_model, toy_dpo, loss_type="sigmoid", beta=0.1)
    loss = trainer.loss_from_outputs(outputs, by_hand_inputs())
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-6)
    assert loss.item() == pytest.approx(0.598138869381, abs=1e-6)

    trainer = make_trainer(tmp_path, micro_model, toy_dpo, loss_type="ipo", beta=0.1)
    assert trainer.loss_from_outputs(outputs, by_hand_inputs()).item() == pytest.approx(16.0, abs=1e-6)
    trainer.beta = 0.5
    assert trainer.loss_from_outputs(outputs, by_hand_inputs()).item() == pytest.approx(0.0, abs=1e-6)


def test_simpo_and_orpo_losses_match_hand_computation(tmp_path, micro_model, toy_dpo):
    """The same policy log-probs, as averages per completion token: chosen -5 and -3, rejected -6 and -4.5.

    SimPO, beta 2, gamma 0.5: margins 2 * (-5 + 6) - 0.5 = 1.5 and 2 * (-3 + 4.5) - 0.5 = 2.5, so the loss is
    (log(1 + e^-1.5) + log(1 + e^-2.5)) / 2. Its rewards are 2 times the averages.
    ORPO, beta (lambda) 0.1: the chosen answers' NLL per token, (5 + 5 + 3 + 3) / 4 = 4, plus 0.1 times the mean of
    -log sigmoid(log odds), log odds = (a_w - a_l) - (log(1 - e^a_w) - log(1 - e^a_l)).
    Neither loads or asks a reference model.
    """
    outputs = fixed_outputs([[-5.0, -5.0], [-3.0, -3.0], [-6.0, -6.0], [-4.5, -4.5]])
    inputs = {k: v for k, v in by_hand_inputs().items() if not k.startswith("ref_")}

    def softplus(x: float) -> float:  # -log sigmoid(-x)
        return math.log1p(math.exp(x))

    simpo = make_trainer(tmp_path, micro_model, toy_dpo, method="simpo", beta=2.0, simpo_gamma=0.5)
    assert simpo.ref_model is None
    loss = simpo.loss_from_outputs(outputs, simpo._with_reference(inputs))
    assert loss.item() == pytest.approx((softplus(-1.5) + softplus(-2.5)) / 2, abs=1e-6)
    metrics = simpo._metrics["train" if simpo.model.training else "eval"]
    assert metrics["rewards/chosen"][-1] == pytest.approx(2 * (-5 - 3) / 2)
    assert metrics["rewards/margins"][-1] == pytest.approx((2 * 1 + 2 * 1.5) / 2)
    assert metrics["rewards/accuracies"][-1] == 1.0

    orpo = make_trainer(tmp_path, micro_model, toy_dpo, method="orpo", beta=0.1)
    assert orpo.ref_model is None
    loss = orpo.loss_from_outputs(outputs, orpo._with_reference(inputs))
    log_odds = [
        (w - lo) - (math.log1p(-math.exp(w)) - math.log1p(-math.exp(lo))) for w, lo in ((-5.0, -6.0), (-3.0, -4.5))
    ]
    assert loss.item() == pytest.approx(4.0 + 0.1 * sum(softplus(-x) for x in log_odds) / 2, abs=1e-6)
    metrics = orpo._metrics["train" if orpo.model.training else "eval"]
    assert metrics["log_odds_chosen"][-1] == pytest.approx(sum(log_odds) / 2, abs=1e-6)
    assert metrics["nll_loss"][-1] == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("method", "field", "value"),
    [
        ("orpo", "reference_free", True),
        ("simpo", "loss_type", "ipo"),
        ("sft", "simpo_gamma", 1.0),
        ("orpo", "simpo_gamma", 1.0),
        ("simpo", "precompute_ref_log_probs", True),
        ("dpo", "undesirable_weight", 2.0),
        ("kto", "beta_schedule", "risk"),
        ("dpo", "center_rewards_coefficient", 0.01),
        ("reward", "loss_type", "hinge"),
    ],
)
def test_what_a_method_does_not_use_is_refused_naming_the_field(tmp_path, method, field, value):
    from training.spec import SpecError

    with pytest.raises(SpecError, match=f"^{field}: only applies to method"):
        parse_spec({"method": method, "model": "m", "train_file": "t.jsonl", field: value})


def test_reference_free_uses_zero_reference_log_probs(tmp_path, micro_model, toy_dpo):
    trainer = make_trainer(tmp_path, micro_model, toy_dpo, reference_free=True)
    inputs = {k: v for k, v in by_hand_inputs().items() if not k.startswith("ref_")}
    with_ref = trainer._with_reference(inputs)
    assert with_ref["ref_chosen_logps"].tolist() == [0.0, 0.0] == with_ref["ref_rejected_logps"].tolist()
    assert trainer.ref_model is None


def test_max_prompt_length_keeps_the_end_of_the_prompt(tmp_path, micro_model, toy_dpo):
    trainer = make_trainer(tmp_path, micro_model, toy_dpo, max_prompt_length=4)
    tokenizer = trainer.processing_class
    for row in trainer.train_dataset.select(range(5)):
        assert len(row["prompt_ids"]) == 4
        assert tokenizer.decode(row["prompt_ids"]).endswith("?")


def test_risk_schedule_raises_beta_when_too_many_margins_pass_tau():
    schedule = RiskBetaSchedule(beta=0.1, warmup_steps=2, quantile=0.5, target=0.2, alpha=0.1, gamma=5.0, tau_ema=0.9)
    schedule.observe([0.0, 1.0, 2.0, 3.0])
    schedule.observe([1.0, 2.0])
    assert schedule.beta == 0.1 and schedule.tau == pytest.approx(quantile([0, 1, 2, 3, 1, 2], 0.5)) == 1.5
    schedule.observe([2.0, 3.0, 4.0, 5.0])  # share above tau 1.0, target 0.2: u = 0.8
    assert schedule.beta == pytest.approx(0.1 * math.exp(0.1 * math.tanh(5.0 * 0.8)))
    assert schedule.tau == pytest.approx(0.9 * 1.5 + 0.1 * 3.5)
    raised = schedule.beta
    for _ in range(5):
        schedule.observe([-5.0, -4.0])  # tau lags above these margins: share 0, u = -0.2, beta shrinks
    assert schedule.tau > -4.0
    assert 0 < schedule.beta == pytest.approx(raised * math.exp(-0.1 * math.tanh(-5.0 * -0.2) * 5))


def test_batch_schedule_follows_beta_dpo():
    schedule = BatchBetaSchedule(beta=0.1, alpha=0.6, momentum=0.9, min_beta=1e-3)
    assert schedule.beta_for([2.0, 4.0]) == pytest.approx(0.1)  # the first batch sets the baseline
    schedule.observe([2.0, 4.0])
    assert schedule.baseline == pytest.approx(0.3)
    assert schedule.beta_for([6.0, 8.0]) == pytest.approx(0.1 * (1 + 0.6 * (0.7 - 0.3)))
    assert schedule.beta_for([-1000.0]) == 1e-3


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-4), ("bf16", 0.05)])
def test_fast_path_matches_trls_fused_lm_head(tmp_path, micro_model, toy_dpo, precision, tolerance):
    """The basic trainer's completion-only log-probs against TRL's fused LM head, on the same batch:
    per-token log-probs, the metrics TRL logs, and the gradient of the summed log-probs."""
    trainer = make_trainer(tmp_path, micro_model, toy_dpo, precision=precision)
    assert trainer.fast
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    mask = batch["completion_mask"][:, 1:].bool()
    fast, fast_grad = outputs_and_gradient(trainer, batch, trainer._policy_outputs)
    trl, trl_grad = outputs_and_gradient(trainer, batch, trainer.fused_head_outputs)
    assert (fast.log_probs[~mask] == 0).all()
    assert torch.allclose(fast.log_probs[mask], trl.log_probs[mask], atol=tolerance)
    assert torch.allclose(fast.entropy[mask], trl.entropy[mask], atol=tolerance * 10)
    assert (fast.is_top1[mask] == trl.is_top1[mask]).float().mean() > 0.95
    assert torch.allclose(fast.mean_logits[mask], trl.mean_logits[mask], atol=tolerance * 10)
    assert (fast_grad - trl_grad).norm() / trl_grad.norm() < tolerance


def outputs_and_gradient(trainer, batch, policy_outputs):
    """Per-token outputs of `policy_outputs(model, batch)` and the gradient of their summed log-probs."""
    trainer.model.zero_grad()
    out = policy_outputs(trainer.model, batch)
    out.log_probs.sum().backward()
    return out, torch.cat([p.grad.flatten() for p in trainer.model.parameters()])


def test_bf16_reference_equals_the_policy_at_step_0(tmp_path, micro_model, toy_dpo):
    """The reference model's linear layers are stored in bf16: at step 0 its log-probs equal the policy's
    under autocast exactly (with tied embeddings too), so the first rewards are exactly 0."""
    trainer = make_trainer(tmp_path, micro_model, toy_dpo, precision="bf16")
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ref = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, batch))
    with torch.no_grad():
        policy = trainer._policy_outputs(trainer.model, batch).log_probs.sum(dim=1)
    assert torch.equal(policy, ref)
    assert trainer.ref_model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert trainer.ref_model.model.embed_tokens.weight.dtype == torch.float32


def test_precomputed_reference_log_probs_match_the_per_step_ones(tmp_path, micro_model, toy_dpo):
    """basic with precompute_ref_log_probs: TRL runs the pass inside its constructor. The batches then carry
    reference log-probs equal to those of a reference forward of the untrained policy, and training runs."""
    trainer = make_trainer(tmp_path, micro_model, toy_dpo, precompute_ref_log_probs=True)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    assert torch.allclose(batch["ref_chosen_logps"], chosen, atol=1e-4)
    assert torch.allclose(batch["ref_rejected_logps"], rejected, atol=1e-4)
    assert math.isfinite(trainer.train().training_loss)


@pytest.mark.parametrize("head", ["completion", "fused"])
def test_packed_batches_give_the_padded_numbers(tmp_path, micro_model, mixed_dpo, head):
    """fp32, a batch with padding: padding-free log-probs within 1e-4 of the padded batch's, and the same
    gradient, through the basic trainer's completion head and through TRL's fused head (fsdp, deepspeed-tp)."""
    trainer = make_trainer(tmp_path, micro_model, mixed_dpo)
    assert trainer.packed
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths.min() < lengths.max() / 2, "a batch with padding"
    policy_outputs = trainer._policy_outputs if head == "completion" else trainer.fused_head_outputs
    mask = batch["completion_mask"][:, 1:].bool()

    packed, packed_grad = outputs_and_gradient(trainer, batch, policy_outputs)
    trainer.packed = False
    padded, padded_grad = outputs_and_gradient(trainer, batch, policy_outputs)
    assert (packed.log_probs[~mask] == 0).all()
    assert torch.allclose(packed.log_probs, padded.log_probs, atol=1e-4)
    assert torch.allclose(packed.entropy[mask], padded.entropy[mask], atol=1e-4)
    assert (packed_grad - padded_grad).norm() / padded_grad.norm() < 1e-4
    ref = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    trainer.packed = True
    assert torch.allclose(torch.cat(trainer.compute_ref_log_probs(trainer.model, batch)), ref, atol=1e-4)


def test_models_with_sliding_windows_stay_padded():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from training.packing import use_varlen_attention

    def qwen(**window) -> Qwen2ForCausalLM:
        return Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=64,
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                intermediate_size=32,
                **window,
            )
        )

    assert use_varlen_attention(qwen())
    assert not use_varlen_attention(qwen(use_sliding_window=True, sliding_window=8, max_window_layers=0))
