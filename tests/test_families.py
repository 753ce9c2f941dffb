"""The model families users train (`training.families`): each family's chat format masks exactly the tokens of its
weight-1 assistant messages, and each architecture trains DPO (packed equal to padded), SFT on tool calls and
weights with LoRA and samples, and fsdp on two of them."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, of_type, python_env, run_training
from tests.test_chat import TOOLS, call
from training.chat import TemplateError, clean, tokenize
from training.families import FAMILIES
from training.spec import EXIT_OK
from training.toy_data import toy_rows


def tool_round(cities: list[str], answer: str) -> list[dict]:
    return [
        {"role": "user", "content": f"Weather in {' and '.join(cities)}?"},
        {  # Mistral's template takes 9-character call ids only
            "role": "assistant",
            "content": None,
            "tool_calls": [call("get_weather", {"city": c}, f"call{i}abcd") for i, c in enumerate(cities, 1)],
        },
        *({"role": "tool", "tool_call_id": f"call{i}abcd", "content": f"{17 + i}C"} for i in range(1, len(cities) + 1)),
        {"role": "assistant", "content": answer},
    ]


PARALLEL = tool_round(["Paris", "Rome"], "Paris 18C, Rome 19C.")
TURNS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there."},
    {"role": "user", "content": "What is 2 plus 4?"},
    {"role": "assistant", "content": "The answer is 6."},
]
WEIGHTED = [{"role": "system", "content": "Be brief."}, TURNS[0], {**TURNS[1], "weight": 0}, *TURNS[2:]]

QWEN_CALLS = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
)
THINK = "<think>\n\n</think>\n\n"
NO_TOOLS = "tools: the model's chat template does not render tools"
NO_TEMPLATE = "messages: the model has no chat template"
# Hand-worked: the text of each run of trained tokens, or the words of the refusal.
LABELS = {
    "qwen2": {
        "parallel": [QWEN_CALLS, "Paris 18C, Rome 19C.<|im_end|>\n"],
        "weighted": ["The answer is 6.<|im_end|>\n"],
        "turns": ["Hello there.<|im_end|>\n", "The answer is 6.<|im_end|>\n"],
    },
    "qwen3": {  # the last turn opens with an empty think block, which the turns before it lose
        "parallel": [QWEN_CALLS, THINK + "Paris 18C, Rome 19C.<|im_end|>\n"],
        "weighted": [THINK + "The answer is 6.<|im_end|>\n"],
        "turns": ["Hello there.<|im_end|>\n", THINK + "The answer is 6.<|im_end|>\n"],
    },
    "llama3": {
        "parallel": "This model only supports single tool-calls at once!",
        "weighted": ["The answer is 6.<|eot_id|>"],
        "turns": ["Hello there.<|eot_id|>", "The answer is 6.<|eot_id|>"],
    },
    "mistral": {
        "parallel": [
            '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call1abcd"}, '
            '{"name": "get_weather", "arguments": {"city": "Rome"}, "id": "call2abcd"}]</s>',
            " Paris 18C, Rome 19C.</s>",
        ],
        "weighted": [" The answer is 6.</s>"],
        "turns": [" Hello there.</s>", " The answer is 6.</s>"],
        # the system prompt rides on the last question, so an earlier turn renders differently once another follows
        "weighted-both": "messages[2]: the model's chat template renders earlier turns differently",
    },
    "gemma2": {
        "parallel": "Conversation roles must be user or assistant",
        "weighted": "System role not supported",
        "turns": ["Hello there.<end_of_turn>\n", "The answer is 6.<end_of_turn>\n"],
    },
    "gemma3": {
        "parallel": "Conversation roles must be user or assistant",
        "weighted": ["The answer is 6.<end_of_turn>\n"],
        "turns": ["Hello there.<end_of_turn>\n", "The answer is 6.<end_of_turn>\n"],
    },
    "phi3": {  # a conversation that asks for no reply ends with the end-of-text token, trained with the last turn
        "parallel": NO_TOOLS,
        "weighted": ["The answer is 6.<|end|>\n<|endoftext|>"],
        "turns": ["Hello there.<|end|>\n", "The answer is 6.<|end|>\n<|endoftext|>"],
    },
    "gpt2": {"parallel": NO_TEMPLATE, "weighted": NO_TEMPLATE, "turns": NO_TEMPLATE},
    "olmo2": {
        "parallel": NO_TOOLS,
        "weighted": ["The answer is 6.<|endoftext|>"],
        "turns": ["Hello there.<|endoftext|>", "The answer is 6.<|endoftext|>"],
    },
}
LABELS["qwen3_moe"] = LABELS["qwen3"]
CONVERSATIONS = {
    "parallel": PARALLEL,
    "weighted": WEIGHTED,
    "turns": TURNS,
    "weighted-both": [WEIGHTED[0], *TURNS],
}


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    from training.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        make_tiny_model(root / family, "micro", family=family)
    return root


def trained_runs(tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    runs, run = [], []
    for token, trained in [*zip(ids, mask, strict=True), (None, 0)]:
        if trained:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs


def test_every_family_is_in_the_labels_table():
    assert set(LABELS) == set(FAMILIES)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_labels_are_the_weight_1_assistant_tokens_of_each_family_template(family, family_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family_models / family)
    for name, expected in LABELS[family].items():
        tools = TOOLS if name == "parallel" else None
        if isinstance(expected, str):
            with pytest.raises(TemplateError) as refused:
                tokenize(tokenizer, CONVERSATIONS[name], tools)
            assert expected in str(refused.value), (name, str(refused.value))
            continue
        ids, mask = tokenize(tokenizer, CONVERSATIONS[name], tools)
        assert trained_runs(tokenizer, ids, mask) == expected, name
        # the segments put back together are the conversation as the template renders it
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(
            clean(CONVERSATIONS[name]), tools=tools, tokenize=False
        ), name


# -- the training matrix -------------------------------------------------------------------------------------------

PACKS = {f for f in FAMILIES if not f.startswith("gemma")}  # Gemma's soft-capping and sliding windows stay padded
TOOL_FAMILIES = {f for f, spec in FAMILIES.items() if spec.tools}


def _data(family: str, root) -> tuple:
    """(dpo file, sft file) for a family: conversations where it has a chat template, text where it has none."""
    pairs = toy_rows("dpo", 24, seed=3)
    sft = toy_rows("sft", 24, seed=4)
    if FAMILIES[family].template is not None:
        pairs = [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in pairs
        ]
        turns = [
            {
                "messages": [
                    TURNS[0],
                    {**TURNS[1], "weight": 0},
                    {"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": r["completion"]},
                ]
            }
            for r in sft
        ]
        if family in TOOL_FAMILIES:  # every other row a tool round; Llama 3 takes one call per turn
            cities = (["Paris"], ["Oslo"]) if family == "llama3" else (["Paris", "Rome"], ["Oslo", "Lima"])
            turns[::2] = [
                {"messages": tool_round(cities[i % 2], "Fine."), "tools": TOOLS, "parallel_tool_calls": True}
                for i in range(len(turns[::2]))
            ]
        sft = turns
    dpo_path, sft_path = root / f"{family}-dpo.jsonl", root / f"{family}-sft.jsonl"
    dpo_path.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    sft_path.write_text("".join(json.dumps(r) + "\n" for r in sft))
    return dpo_path, sft_path


def _spec(model, data, **kw) -> dict:
    return {
        "model": str(model),
        "train_file": str(data),
        "max_steps": 3,
        "batch_size": 4,
        "max_length": 256,
        "precision": "fp32",
        "eval_fraction": 0,
        **kw,
    }


@pytest.fixture(scope="module")
def matrix(family_models, tmp_path_factory):
    """Every family through DPO padded and packed and SFT with LoRA and samples, in one process
    (`tests.family_runs`); {(family, case): (exit code, events, out dir)}."""
    root = tmp_path_factory.mktemp("matrix")
    plan, cases = [], {}
    for family in FAMILIES:
        dpo, sft = _data(family, root)
        model = family_models / family
        cases[family, "dpo-padded"] = _spec(model, dpo, method="dpo", padding_free=False)
        cases[family, "dpo-packed"] = _spec(model, dpo, method="dpo", padding_free=True)
        cases[family, "sft-lora"] = _spec(
            model,
            sft,
            method="sft",
            eval_fraction=0.25,
            sample_prompts=2,
            learning_rate=1e-3,
            lora={"r": 4, "alpha": 8},
        )
    for (family, case), spec in cases.items():
        out = root / f"{family}-{case}"
        spec_path = root / f"{family}-{case}.json"
        spec_path.write_text(json.dumps(spec))
        plan.append([str(spec_path), str(out)])
    (root / "plan.json").write_text(json.dumps(plan))
    subprocess.run(
        [sys.executable, "-m", "tests.family_runs", str(root / "plan.json")],
        cwd=ROOT,
        env=python_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=600,
        check=False,
    )
    results = {}
    for family, case in cases:
        out = root / f"{family}-{case}"
        rc = int((out / "rc").read_text()) if (out / "rc").is_file() else None
        events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()] if out.is_dir() else []
        results[family, case] = rc, events, out
    return results


def _update_gap(model_dir, a_dir, b_dir) -> float:
    """How far apart two runs' weights ended, as a part of how far the first moved from the start."""
    from safetensors.torch import load_file

    start, a, b = (load_file(d / "model.safetensors") for d in (model_dir, a_dir / "final", b_dir / "final"))
    moved = sum((a[k] - start[k]).square().sum().item() for k in start) ** 0.5
    apart = sum((b[k] - a[k]).square().sum().item() for k in start) ** 0.5
    assert moved > 0
    return apart / moved


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_trains_dpo_packed_as_padded_and_sft_with_tools_lora_and_samples(family, matrix, family_models):
    for case in ("dpo-padded", "dpo-packed", "sft-lora"):
        rc, events, _ = matrix[family, case]
        assert rc == EXIT_OK, (case, of_type(events, "error"))
    (_, padded, padded_out), (_, packed, packed_out) = matrix[family, "dpo-padded"], matrix[family, "dpo-packed"]
    assert of_type(packed, "started")[0]["padding_free"] is (family in PACKS)
    losses = [e["loss"] for e in of_type(packed, "progress")]
    assert len(losses) == 3 and losses == pytest.approx([e["loss"] for e in of_type(padded, "progress")], abs=1e-4)
    assert _update_gap(family_models / family, padded_out, packed_out) < 1e-3

    _, sft, out = matrix[family, "sft-lora"]
    assert [e["loss"] for e in of_type(sft, "progress")] and all(e["loss"] > 0 for e in of_type(sft, "progress"))
    samples = of_type(sft, "samples")
    assert samples and len(samples[-1]["samples"]) == 2, samples
    assert (out / "final" / "model.safetensors").is_file() and not (out / "final" / "adapter_config.json").exists()


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_fsdp_trains_two_families_as_basic_does(family, matrix, tmp_path):
    """Two processes over gloo, each half of the batch, against the matrix's single-process padded DPO run: the
    same losses within 1e-5."""
    _, basic, basic_out = matrix[family, "dpo-padded"]
    spec = {**json.loads((basic_out / "spec.json").read_text()), "trainer": "fsdp", "gpus": 2, "batch_size": 2}
    rc, events = run_training(spec, tmp_path / "fsdp")
    assert rc == EXIT_OK, of_type(events, "error")
    assert of_type(events, "started")[0]["parallelism"]["processes"] == 2
    losses = [e["loss"] for e in of_type(events, "progress")]
    assert len(losses) == 3 and losses == pytest.approx([e["loss"] for e in of_type(basic, "progress")], abs=1e-5)
