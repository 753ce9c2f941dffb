import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, python_env
from training.spec import DPO_LOSS_TYPES, SpecError, native_bf16, parse_spec, resolve_precision

BASE = {"method": "dpo", "model": "m", "train_file": "t.jsonl"}


def test_defaults_follow_the_method():
    assert parse_spec(BASE).resolved().learning_rate == 1e-6
    assert parse_spec({**BASE, "method": "sft"}).resolved().learning_rate == 2e-5
    assert parse_spec(BASE).beta == 0.1
    assert parse_spec(BASE).selection is None
    assert parse_spec({**BASE, "eval_steps": 5, "early_stopping_patience": 2}).selection == ("eval_loss", "min")
    assert parse_spec({**BASE, "eval_steps": 5, "best_metric": "rewards/accuracies"}).selection == (
        "eval_rewards/accuracies",
        "max",
    )


def test_auto_precision_is_bf16_only_where_the_device_computes_it_natively(monkeypatch):
    """A CPU without AVX512-BF16 or AMX runs bf16 matmuls hundreds of times slower than fp32 (measured on an AVX2
    EPYC: 0.28 GFLOP/s against 80): `auto`, the default, trains there in fp32. An explicit choice is kept."""
    import training.spec

    avx2 = "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw"
    assert not native_bf16(cuda=False, cpuinfo=avx2)
    assert native_bf16(cuda=False, cpuinfo=avx2 + " avx512_bf16") and native_bf16(
        cuda=False, cpuinfo=avx2 + " amx_bf16"
    )
    assert native_bf16(cuda=True, cpuinfo=avx2)
    assert parse_spec(BASE).precision == "auto"
    monkeypatch.setattr(training.spec, "native_bf16", lambda cuda: False)
    assert resolve_precision(parse_spec(BASE)).precision == "fp32"
    assert resolve_precision(parse_spec({**BASE, "precision": "bf16"})).precision == "bf16"
    monkeypatch.setattr(training.spec, "native_bf16", lambda cuda: True)
    assert resolve_precision(parse_spec(BASE)).precision == "bf16"
    assert resolve_precision(parse_spec({**BASE, "precision": "fp32"})).precision == "fp32"


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"beta": 0}, "beta", "greater than 0"),
        ({"method": "ppo"}, "method", "'dpo', 'sft', 'orpo', 'simpo', 'kto', 'reward', 'grpo' or 'eval'"),
        ({"method": "eval"}, "evaluation", "method 'eval' needs one"),
        ({"evaluation": {"metrics": ["f1"]}}, "evaluation", "only for method 'eval'"),
        ({"method": "eval", "evaluation": {}}, "evaluation", "give metrics, graders or a pairwise judge"),
        (
            {"method": "eval", "evaluation": {"pairwise": {"judge": "j"}}},
            "evaluation.pairwise",
            "set evaluation.baseline",
        ),
        ({"method": "eval", "evaluation": {"graders": {"g": {"type": "x"}}}}, "evaluation.graders.g.type", "one of"),
        (
            {"method": "eval", "evaluation": {"baseline": "b", "pairwise": {"judge": "j", "template": "{prompt}"}}},
            "evaluation.pairwise.template",
            "lacks {first}, {second}",
        ),
        ({"method": "reward", "sample_judge": "j"}, "sample_judge", "writes no samples"),
        ({"nodes": 2}, "nodes", "use 'fsdp' or 'deepspeed-tp'"),
        ({"trainer": "fsdp", "gpus": 3, "nodes": 2}, "gpus", "do not split evenly over 2 nodes"),
        ({"trainer": "fsdp", "gpus": 2, "nodes": 2, "sample_judge": "j"}, "sample_judge", "cannot reach"),
        (
            {
                "method": "grpo",
                "trainer": "fsdp",
                "gpus": 2,
                "nodes": 2,
                "grader": {
                    "type": "multi",
                    "name": "m",
                    "graders": [
                        {"type": "string_check", "name": "a", "input": "{{sample.output_text}}", "reference": "x"}
                        | {"operation": "eq"},
                        {"type": "python", "name": "b", "source": "def grade(sample, item):\n    return 1.0"},
                    ],
                    "calculate_output": "a + b",
                },
            },
            "grader",
            "python graders and judges are run by the worker",
        ),
        ({"sample_judge": "j", "sample_prompts": 0}, "sample_judge", "set sample_prompts above 0"),
        ({"loss_type": ["sigmoid", "nope"]}, "loss_type", "unknown loss type 'nope'"),
        ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, "loss_weights", "one per type"),
        ({"loss_type": "exo_pair"}, "label_smoothing", "label_smoothing > 0"),
        ({"method": "sft", "reference_free": True}, "reference_free", "only applies to method 'dpo'"),
        ({"max_length": 64, "max_prompt_length": 64}, "max_prompt_length", "smaller than max_length"),
        ({"batch_size": 0}, "batch_size", "greater than or equal to 1"),
        ({"lora": {"r": 0}}, "lora.r", "greater than or equal to 1"),
        ({"risk": {"quantile": 1.5}}, "risk.quantile", "less than 1"),
        ({"trainer": "basic", "gpus": 2}, "gpus", "use 'fsdp'"),
        ({"learning_rte": 1e-5}, "learning_rte", "unknown field"),
        ({"early_stopping_patience": 2}, "early_stopping_patience", "set eval_steps"),
        ({"best_metric": "loss", "eval_steps": 5, "eval_fraction": 0}, "best_metric", "held-out data"),
        ({"early_stopping_min_delta": 0.1}, "early_stopping_min_delta", "only applies with early_stopping_patience"),
    ],
)
def test_bad_values_name_the_field_and_the_fix(change, field, words):
    with pytest.raises(SpecError) as err:
        parse_spec({**BASE, **change})
    assert str(err.value).startswith(f"{field}: ")
    assert words in str(err.value)


def test_loss_types_are_those_of_the_installed_trl():
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    listed = help_text.split("Possible values are:")[1].split(". If")[0]
    assert set(DPO_LOSS_TYPES) == {name.strip(" `'") for name in listed.split(",")}


def test_schema_command_prints_every_field():
    out = subprocess.run(
        [sys.executable, "-m", "training", "schema"],
        capture_output=True,
        text=True,
        env=python_env(),
        cwd=ROOT,
        check=True,
    )
    schema = json.loads(out.stdout)
    for name in (
        "method",
        "model",
        "train_file",
        "eval_file",
        "eval_fraction",
        "learning_rate",
        "max_steps",
        "epochs",
        "batch_size",
        "gradient_accumulation_steps",
        "max_length",
        "max_prompt_length",
        "seed",
        "save_steps",
        "eval_steps",
        "trainer",
        "beta",
        "loss_type",
        "label_smoothing",
        "reference_free",
        "precompute_ref_log_probs",
        "beta_schedule",
        "lora",
    ):
        assert name in schema["properties"], name


def test_spec_formats_and_validate_import_no_torch():
    code = (
        "import sys, training.spec, training.formats, training.events, training.beta; "
        "import training.launch, training.__main__; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], env=python_env(), cwd=ROOT, check=True)
