"""Real training runs of the micro model on toy data, as `python -m training run` subprocesses."""

import json
import signal

import pytest

from tests.conftest import dpo_spec, of_type, run_training, start_training
from training.spec import EXIT_OK, EXIT_STOPPED, EXIT_USER_ERROR, MANIFEST_NAME, native_bf16


def test_dpo_raises_held_out_reward_accuracy(tmp_path, micro_model, toy_dpo):
    out = tmp_path / "run"
    rc, events = run_training(dpo_spec(micro_model, toy_dpo, max_steps=30, save_steps=15, eval_steps=15), out)
    assert rc == EXIT_OK
    assert [(e["event"], e.get("split")) for e in events[:3]] == [
        ("lengths", "train"),
        ("lengths", "eval"),
        ("started", None),
    ], "max_length's effect first"
    started = events[2]
    assert started["total_steps"] == 30 and started["examples"] == 340
    assert started["precision"] == ("bf16" if native_bf16(cuda=False) else "fp32"), "auto, as this CPU computes best"
    accuracies = [e["metrics"]["eval_rewards/accuracies"] for e in of_type(events, "eval")]
    assert [e["step"] for e in of_type(events, "eval")] == [0, 15, 30]
    assert accuracies[0] <= 0.6 and accuracies[-1] >= 0.9, accuracies

    progress = of_type(events, "progress")
    assert [e["step"] for e in progress] == list(range(1, 31))
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "beta",
    ):
        assert key in progress[-1]["metrics"], key
    assert progress[-1]["total_steps"] == 30 and progress[-1]["learning_rate"] == 3e-3

    assert [(e["step"], e["path"]) for e in of_type(events, "checkpoint")] == [
        (15, str(out / "checkpoint-15")),
        (30, str(out / "checkpoint-30")),
    ]
    ckpt = out / "checkpoint-15"
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    assert manifest["step"] == 15 and manifest["spec"]["method"] == "dpo"
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(
        manifest["files"]
    )
    newest_other = max(p.stat().st_mtime_ns for p in ckpt.iterdir() if p.name != MANIFEST_NAME)
    assert (ckpt / MANIFEST_NAME).stat().st_mtime_ns >= newest_other

    done = events[-1]
    assert done["event"] == "done" and done["final_path"] == str(out / "final")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["eval_rewards/accuracies"] == accuracies[-1]
    assert json.loads((out / "spec.json").read_text())["learning_rate"] == 3e-3

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert AutoTokenizer.from_pretrained(out / "final").pad_token == "<|pad|>"
    assert (out / "final" / "model.safetensors").is_file()
    assert sum(p.numel() for p in model.parameters()) > 100_000


@pytest.mark.parametrize("method", ["simpo", "orpo"])
def test_reference_free_pair_methods_raise_the_held_out_margin(tmp_path, micro_model, toy_dpo, method):
    """ORPO and SimPO through `python -m training run`: no reference pass, and the held-out reward margin (beta times
    the average log-prob of chosen over rejected) and accuracy rise."""
    spec = dpo_spec(micro_model, toy_dpo, method=method, max_steps=20, eval_steps=20, learning_rate=2e-3)
    rc, events = run_training(spec, tmp_path / "run")
    assert rc == EXIT_OK, of_type(events, "error")
    first, last = (e["metrics"] for e in of_type(events, "eval"))
    assert last["eval_rewards/margins"] > first["eval_rewards/margins"] + 0.05, (first, last)
    assert last["eval_rewards/accuracies"] >= 0.9, last
    assert not of_type(events, "ref_logprobs")
    if method == "orpo":
        assert last["eval_log_odds_chosen"] > first["eval_log_odds_chosen"]


@pytest.mark.parametrize("data", ["labelled", "pairs"])
def test_kto_on_labelled_answers_or_on_pairs_raises_the_held_out_margin(tmp_path, micro_model, toy_dpo, data):
    """KTO (TRL's trainer) on thumbs-up/down rows, or on pairs unrolled into them: the held-out reward margin of the
    desirable answers over the undesirable ones rises, and the reference model writes its samples once."""
    from training.toy_data import write_toy_data

    path = toy_dpo
    if data == "labelled":
        path = tmp_path / "kto.jsonl"
        write_toy_data(path, "kto", 600, seed=3)
    spec = dpo_spec(micro_model, path, method="kto", max_steps=20, eval_steps=20, sample_prompts=2)
    rc, events = run_training(spec, tmp_path / "run")
    assert rc == EXIT_OK, of_type(events, "error")
    first, last = (e["metrics"] for e in of_type(events, "eval"))
    assert last["eval_rewards/margins"] > first["eval_rewards/margins"] + 0.5, (first, last)
    assert "kl" in of_type(events, "progress")[-1]["metrics"]
    [train, _] = of_type(events, "lengths")
    assert train["rows"] == (510 if data == "labelled" else 680) and train["dropped"] == 0, train
    models = [e["model"] for e in of_type(events, "samples")]
    assert models.count("reference") == 1 and models.count("policy") == 2, models


def test_a_reward_model_learns_to_rank_held_out_pairs(tmp_path, micro_model, toy_dpo):
    """`reward`: TRL's RewardTrainer on the causal LM's body with a new one-score head; held-out pair accuracy rises
    to 0.9 or more, and the final model is a sequence classifier that scores a right answer above a wrong one."""
    out = tmp_path / "run"
    rc, events = run_training(dpo_spec(micro_model, toy_dpo, method="reward", max_steps=40, eval_steps=40), out)
    assert rc == EXIT_OK, of_type(events, "error")
    first, last = (e["metrics"] for e in of_type(events, "eval"))
    assert last["eval_accuracy"] >= 0.9 and last["eval_accuracy"] > first["eval_accuracy"], (first, last)
    assert not of_type(events, "samples") and of_type(events, "lengths")[0]["dropped"] == 0
    assert "margin" in of_type(events, "progress")[-1]["metrics"]

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    row = json.loads(toy_dpo.read_text().splitlines()[0])
    with torch.no_grad():
        scores = [
            model(**tokenizer(row["prompt"] + row[k] + tokenizer.eos_token, return_tensors="pt")).logits.item()
            for k in ("chosen", "rejected")
        ]
    assert scores[0] > scores[1], scores


def test_sft_halves_the_eval_loss(tmp_path, micro_model, toy_sft):
    spec = {
        "method": "sft",
        "model": str(micro_model),
        "train_file": str(toy_sft),
        "eval_fraction": 0.15,
        "max_steps": 30,
        "batch_size": 16,
        "learning_rate": 3e-3,
        "max_length": 64,
        "save_steps": 100,
    }
    rc, events = run_training(spec, tmp_path / "run")
    assert rc == EXIT_OK
    losses = [e["metrics"]["eval_loss"] for e in of_type(events, "eval")]
    assert len(losses) == 2 and losses[-1] <= losses[0] / 2, losses
    assert "mean_token_accuracy" in of_type(events, "progress")[-1]["metrics"]


def test_early_stopping_on_a_stalled_metric_stops_and_keeps_the_best_checkpoint(tmp_path, micro_model, toy_dpo):
    """Held-out reward accuracy climbs to its ceiling and stays there: two evaluations without a gain stop the run
    long before its 120 steps, and the best evaluation's checkpoint is kept and named."""
    spec = dpo_spec(micro_model, toy_dpo, max_steps=120, eval_steps=3, save_steps=1000, sample_prompts=0)
    spec |= {"best_metric": "rewards/accuracies", "early_stopping_patience": 2, "early_stopping_min_delta": 0.001}
    rc, events = run_training(spec, tmp_path / "run")
    assert rc == EXIT_OK, events[-1]
    accuracies = {e["step"]: e["metrics"]["eval_rewards/accuracies"] for e in of_type(events, "eval")}
    bests = of_type(events, "best")
    assert [b["step"] for b in bests][0] == 0 and all(b["metric"] == "eval_rewards/accuracies" for b in bests)
    assert [b["value"] for b in bests] == sorted({b["value"] for b in bests}), "each best improves on the last"
    best = {k: v for k, v in bests[-1].items() if k not in ("event", "time")}
    assert best["value"] == max(accuracies.values()) and best["mode"] == "max"
    (stopping,) = of_type(events, "early_stopping")
    assert stopping["step"] == best["step"] + 2 * 3 < 120 and stopping["best"] == best
    assert all(accuracies[s] <= best["value"] + 0.001 for s in accuracies if s > best["step"])
    checkpoints = [e["step"] for e in of_type(events, "checkpoint")]
    assert checkpoints == [b["step"] for b in bests if b["step"] > 0], "a checkpoint at each new best, only there"
    done = of_type(events, "done")[0]
    assert done["metrics"]["step"] == stopping["step"]
    assert done["metrics"]["best"] == dict(best, path=str(tmp_path / "run" / f"checkpoint-{best['step']}"))
    assert (tmp_path / "run" / f"checkpoint-{best['step']}" / MANIFEST_NAME).is_file()


def test_a_best_metric_the_evaluations_do_not_report_is_the_users_error(tmp_path, micro_model, toy_dpo):
    spec = dpo_spec(micro_model, toy_dpo, max_steps=4, eval_steps=2, sample_prompts=0, best_metric="bleu")
    rc, events = run_training(spec, tmp_path / "run")
    assert rc == EXIT_USER_ERROR
    error = events[-1]
    assert error["code"] == "invalid_spec" and error["message"].startswith("best_metric: ")
    assert "'eval_bleu'" in error["message"] and "eval_rewards/accuracies" in error["message"], error


def test_the_best_evaluation_is_counted_on_after_a_resume(tmp_path):
    from training.best import Best

    best = Best("eval_loss", "min", patience=2, min_delta=0.01)
    assert best.update(0, {"eval_loss": 1.0}) == (True, False)
    assert best.update(5, {"eval_loss": 0.995}) == (False, False), "a change under min_delta is no gain"
    best.save(tmp_path)
    resumed = Best("eval_loss", "min", patience=2, min_delta=0.01)
    resumed.load(tmp_path)
    assert resumed.update(10, {"eval_loss": float("nan")}) == (False, True), "patience counts across the resume"
    assert (resumed.value, resumed.step) == (1.0, 0)


def test_padding_free_sft_equals_padded_sft(tmp_path, micro_model):
    """Padding-free SFT (the default: each batch one row, attention kept within each sequence) against padded
    batches, fp32, on rows of very different lengths: the same losses within 1e-4, and updates that differ by
    under 0.1% of their size."""
    from safetensors.torch import load_file

    from training.toy_data import toy_rows

    rows = toy_rows("sft", 24, seed=1) + toy_rows("sft", 24, seed=2, context_words=25)
    rows = [rows[i // 2 + (i % 2) * 24] for i in range(48)]  # short and long side by side in every batch
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for padding_free in (False, True):
        spec = {
            "method": "sft",
            "model": str(micro_model),
            "train_file": str(data),
            "eval_fraction": 0,
            "max_steps": 3,
            "batch_size": 8,
            "learning_rate": 3e-3,
            "max_length": 128,
            "precision": "fp32",
            "padding_free": padding_free,
        }
        out = tmp_path / f"run-{padding_free}"
        rc, events = run_training(spec, out)
        assert rc == EXIT_OK, of_type(events, "error")
        assert of_type(events, "started")[0]["padding_free"] is padding_free
        runs[padding_free] = (
            [e["loss"] for e in of_type(events, "progress")],
            load_file(out / "final" / "model.safetensors"),
        )
    (padded, padded_weights), (packed, packed_weights) = runs[False], runs[True]
    assert len(packed) == 3 and packed == pytest.approx(padded, abs=1e-4), (packed, padded)
    # Adam divides by the root of the squared gradients, so a weight whose gradient is near zero moves by a
    # noisy amount either way; the runs agree when the two updates differ by a small part of their own size.
    start = load_file(micro_model / "model.safetensors")
    moved = sum((padded_weights[k] - start[k]).square().sum().item() for k in start) ** 0.5
    apart = sum((packed_weights[k] - padded_weights[k]).square().sum().item() for k in start) ** 0.5
    assert moved > 0 and apart / moved < 1e-3, (apart, moved)


def test_sigterm_then_resume_ends_like_a_straight_run(tmp_path, micro_model, toy_dpo):
    spec = dpo_spec(micro_model, toy_dpo, max_steps=16, save_steps=100, eval_fraction=0)
    rc, straight = run_training(spec, tmp_path / "straight")
    assert rc == EXIT_OK

    out = tmp_path / "stopped"
    proc = start_training(spec, out)
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))
        if events[-1]["event"] == "progress" and events[-1]["step"] == 8:
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_STOPPED
    stopped = events[-1]
    assert stopped["event"] == "stopped" and 8 <= stopped["step"] < 16
    assert stopped["checkpoint"] == str(out / f"checkpoint-{stopped['step']}")
    assert (out / f"checkpoint-{stopped['step']}" / MANIFEST_NAME).is_file()
    assert not (out / "final").exists()

    rc, resumed = run_training(spec, out, "--resume")
    assert rc == EXIT_OK
    assert of_type(resumed, "started")[0]["resumed_from_step"] == stopped["step"]
    assert of_type(resumed, "progress")[0]["step"] == stopped["step"] + 1
    last, last_straight = of_type(resumed, "progress")[-1], of_type(straight, "progress")[-1]
    assert last["step"] == last_straight["step"] == 16
    assert last["loss"] == pytest.approx(last_straight["loss"], abs=1e-4)


def test_resuming_from_the_last_steps_checkpoint_trains_no_more_steps(tmp_path, micro_model, toy_dpo):
    """A job cancelled (or its worker lost) after its last checkpoint, then retried, ends where it was."""
    spec = dpo_spec(micro_model, toy_dpo, max_steps=4, save_steps=4, eval_fraction=0)
    rc, first = run_training(spec, tmp_path / "run")
    assert rc == EXIT_OK and (tmp_path / "run" / "checkpoint-4" / MANIFEST_NAME).is_file()
    rc, again = run_training(spec, tmp_path / "run", "--resume")
    assert rc == EXIT_OK, again
    assert of_type(again, "progress") == [] and of_type(again, "checkpoint") == []
    assert again[-1]["event"] == "done" and again[-1]["metrics"]["step"] == 4


def test_lora_trains_without_a_reference_model(tmp_path, micro_model, toy_dpo):
    spec = dpo_spec(
        micro_model,
        toy_dpo,
        max_steps=6,
        eval_fraction=0,
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    )
    rc, events = run_training(spec, tmp_path / "run")
    assert rc == EXIT_OK
    losses = [e["loss"] for e in of_type(events, "progress")]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3) and losses[-1] < losses[0]

    from safetensors.torch import load_file

    base = load_file(micro_model / "model.safetensors")
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert set(final) == set(base), "the adapters are merged into a plain model"
    changed = {k for k in base if not (base[k] == final[k]).all()}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed), changed


def test_risk_schedule_moves_beta_and_keeps_it_positive(tmp_path, micro_model, toy_dpo):
    spec = dpo_spec(
        micro_model,
        toy_dpo,
        max_steps=20,
        eval_fraction=0,
        beta_schedule="risk",
        risk={"warmup_steps": 4, "quantile": 0.5, "target": 0.2, "alpha": 0.1},
    )
    rc, events = run_training(spec, tmp_path / "run")
    assert rc == EXIT_OK
    betas = [e["metrics"]["beta"] for e in of_type(events, "progress")]
    assert len(betas) == 20 and all(b > 0 for b in betas)
    assert betas[:4] == [0.1] * 4, "beta holds during the warm-up"
    assert len(set(betas[4:])) > 5, betas


def test_bad_spec_is_a_user_error_event(tmp_path, micro_model, toy_dpo):
    rc, events = run_training(dpo_spec(micro_model, toy_dpo, beta=-1), tmp_path / "run")
    assert rc == EXIT_USER_ERROR
    assert events == [{**events[0], "event": "error", "code": "invalid_spec", "user_error": True}]
    assert events[0]["message"].startswith("beta: ")


def test_bad_data_is_a_user_error_event_with_lines(tmp_path, micro_model):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "Q", "chosen": "A", "rejected": "B"}\n{"prompt": "Q", "chosen": "A"}\n')
    rc, events = run_training(dpo_spec(micro_model, data), tmp_path / "run")
    assert rc == EXIT_USER_ERROR
    (error,) = events
    assert error["code"] == "invalid_data" and error["user_error"] is True
    assert error["errors"] == [{"line": 2, "field": "rejected", "reason": "missing"}]


def test_missing_model_is_a_user_error_event(tmp_path, toy_dpo):
    rc, events = run_training(dpo_spec(tmp_path / "nowhere", toy_dpo), tmp_path / "run")
    assert rc == EXIT_USER_ERROR
    assert events[-1]["code"] == "invalid_model" and str(tmp_path / "nowhere") in events[-1]["message"]


def test_a_retried_run_reads_the_reference_cache_and_trains_the_same(tmp_path, micro_model, toy_dpo):
    """Attempt 1 computes the reference log-probs of both splits and writes them to ref_cache_dir; attempt 2 of
    the same spec reads them, runs 0 reference forward passes and logs the same losses."""
    spec = dpo_spec(micro_model, toy_dpo, max_steps=6, eval_steps=6, ref_cache_dir=str(tmp_path / "cache"))
    (rc1, first), (rc2, second) = (run_training(spec, tmp_path / name) for name in ("first", "second"))
    assert rc1 == rc2 == EXIT_OK

    def passes(events):
        return [(e["split"], e["cached"], e["forward_passes"]) for e in of_type(events, "ref_logprobs")]

    assert passes(first) == [("train", False, 22), ("eval", False, 4)]  # 340 and 60 pairs, batches of 16
    assert passes(second) == [("train", True, 0), ("eval", True, 0)]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        f"ref-logps-{e['key']}.safetensors" for e in of_type(first, "ref_logprobs")
    )
    assert [e["loss"] for e in of_type(second, "progress")] == [e["loss"] for e in of_type(first, "progress")]
    for key in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen"):
        assert of_type(second, "eval")[-1]["metrics"][key] == of_type(first, "eval")[-1]["metrics"][key], key
