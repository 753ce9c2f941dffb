"""Training throughput: prefq's `basic` trainer against TRL's DPOTrainer (and, with `--method sft`, its
SFTTrainer), on uniform and long-tailed lengths.

    .venv/bin/python bench/train_throughput.py [--method dpo|sft] [--lengths uniform realistic]
                                               [--model-size small] [--steps 12] [--rounds 2] [--device cpu|cuda]
                                               [--liger]

Model: a random Llama of `training.tiny.SIZES[--model-size]` (default `small`: 23M parameters, vocabulary
16384, untied head; `qwen-0.5b`: Qwen2.5-0.5B's shapes, for GPUs) with the local tokenizer. Batch 8 pairs,
one epoch of `steps` steps. Data, built here (no download):

- uniform: pairs of 232-256 tokens with prompts of 64-160, max_length 256 (the case before issue 14);
- realistic: HH-RLHF-like long-tailed lengths, max_length 1024 (keep_start truncation): prompt tokens drawn
  from a lognormal of median 120 and sigma 0.9, each response (chosen, rejected) independently from a lognormal
  of median 70 and sigma 0.9 (at least 8 and 4 tokens). Multi-turn prompts of a few hundred tokens with a tail
  past a thousand, and responses of tens to hundreds, are the shape of HH-RLHF; the parameters are set by hand
  to that shape, not fitted to the dataset (which cannot be downloaded here).

Variants, each training in a subprocess of its own (its peak memory is its own); rounds alternate them:

- trl_default: TRL 1.16 `DPOTrainer` with its defaults (bf16, gradient checkpointing, a reference forward per step)
- trl_best: TRL's fastest flags measured here: precompute_ref_log_probs (its pass counted end to end) and no
  gradient checkpointing
- prefq_padded: `training.run.build_trainer` for a `basic` DPO spec with padding_free off
- prefq: a worker's `basic` run (bf16, padding-free, no checkpointing), here with a reference forward per step;
  through the queue the worker caches the reference pass instead (a first job runs the same reference forwards up
  front, a retried or re-run one none)
- prefq_liger ("prefq + liger"; only with `--device cuda --liger`): the prefq row's run with `use_liger_kernel`, Liger's
  Triton kernels (RMSNorm, RoPE, SwiGLU) patched into the model. A failure of this row alone (Liger missing or
  refused) is reported in its row and in stderr; the other rows stand
- ceiling: not a trainer: bf16 GEMMs at the model's own shapes (every decoder linear layer's forward and two
  backward GEMMs at the dataset's mean tokens per step, and the LM head's three at its completion positions),
  timed in the same round; its FLOP/s is the ceiling MFU is taken against.

With `--method sft` the same rows train SFT on each pair's prompt and chosen answer (loss on the answer):
trl_default is TRL's `SFTTrainer` with its defaults (bf16, gradient checkpointing, padded batches), trl_best its
`padding_free` batches without checkpointing, prefq_padded and prefq a `basic` SFT spec with padding_free off and
on (the default). The step's FLOPs then have no reference forward.

Columns (with `--peak-tflops`, also MFU against the device's datasheet bf16 peak): tokens/s counts real tokens (prompt+chosen and prompt+rejected, no padding), "loop" over the steps
after the warm-up, "end to end" from the trainer's construction (model load, tokenisation, precompute) to the
end. padding: the share of the token positions the policy's decoder ran on that were padding. MFU: the FLOPs a
DPO step needs on its real tokens, over the loop time, over the ceiling. FLOPs are counted as: 2 per weight of
every decoder linear layer per token; causal attention at 2 x 2 x hidden x (L+1)/2 per token per layer (scores
and values, the lower triangle of an L-token sequence); the LM head only at the positions whose next token is a
completion token (the loss needs no other); the backward as twice the forward; one more forward for a reference
run in the step. Padding, prompt-position logits and recomputation (checkpointing, the tiled head) are not
counted: they are the waste MFU shows. Each figure is the best of the rounds (other work on a shared machine only
ever slows a run down, so the fastest round is the closest to the machine's own speed), and ratios are taken
between those; every round's raw figures go to stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TRAINERS = ("trl_default", "trl_best", "prefq_padded", "prefq")
LIGER = "prefq_liger"  # with --device cuda --liger: prefq with use_liger_kernel
LABELS = {LIGER: "prefq + liger"}
BATCH = 8
MAX_LENGTH = {"uniform": 256, "realistic": 1024}


def build_model(work: Path, size: str) -> None:
    from training.tiny import make_tiny_model

    make_tiny_model(work / "model", size)


def build_data(work: Path, lengths: str, pairs: int, method: str) -> Path:
    from transformers import AutoTokenizer

    from training.toy_data import FILLER

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    rng = random.Random(0)

    def text(tokens: int) -> str:
        ids = tokenizer(" " + " ".join(rng.choice(FILLER) for _ in range(tokens)), add_special_tokens=False)
        return tokenizer.decode(ids["input_ids"][:tokens])

    def lognormal(median: float, sigma: float, low: int) -> int:
        return max(low, round(math.exp(rng.gauss(math.log(median), sigma))))

    path = work / f"{lengths}-{method}.jsonl"
    with open(path, "w") as out:
        for _ in range(pairs):
            if lengths == "uniform":
                prompt = "Question:" + text(rng.randint(64, 160))
                room = MAX_LENGTH["uniform"] - len(tokenizer(prompt)["input_ids"]) - 1
                row = {
                    "prompt": prompt,
                    "chosen": text(room - rng.randint(0, 24)),
                    "rejected": text(room - rng.randint(0, 24)),
                }
            else:
                row = {
                    "prompt": "Question:" + text(lognormal(120, 0.9, 8)),
                    "chosen": text(lognormal(70, 0.9, 4)),
                    "rejected": text(lognormal(70, 0.9, 4)),
                }
            if method == "sft":  # the prompt and its chosen answer
                row = {"prompt": row["prompt"], "completion": row["chosen"]}
            out.write(json.dumps(row) + "\n")
    return path


def step_flops(config, lengths: list[int], completions: list[int], reference: bool) -> float:
    """The FLOPs one DPO step needs (see the module docstring): sequences of `lengths` tokens, of which
    `completions` positions are scored by the LM head."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = h // config.num_attention_heads * config.num_key_value_heads
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)  # q and o, k and v, gate up and down
    forward = sum(2 * linear * n + layers * 2 * h * n * (n + 1) for n in lengths)
    forward += 2 * h * config.vocab_size * sum(completions)
    return forward * (4 if reference else 3)


def child(variant: str, method: str, work: Path, lengths: str, steps: int, warmup: int, device: str) -> dict:
    """Train one variant; returns its measures (runs in a fresh process)."""
    import torch
    from transformers import AutoConfig, TrainerCallback

    from training.data import load_splits
    from training.logprobs import keep_freed_memory
    from training.run import _make_callback, _Stop, build_trainer
    from training.spec import parse_spec

    max_length = MAX_LENGTH[lengths]
    fields = {
        "method": method,
        "model": str(work / "model"),
        "train_file": str(work / f"{lengths}-{method}.jsonl"),
        "eval_fraction": 0,
        "max_steps": steps,
        "batch_size": BATCH,
        "max_length": max_length,
        "learning_rate": 1e-6,
        "save_steps": 10_000,
        "padding_free": variant in ("prefq", LIGER),
    }
    if variant == LIGER:
        fields["use_liger_kernel"] = True
    spec = parse_spec(fields)
    train_ds, _ = load_splits(spec)
    step_times, batches, positions = [], [], []

    def sync() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = sync()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(sync() - self.t0)

    t_start = sync()
    if variant.startswith("prefq"):
        keep_freed_memory()  # what `python -m training run` does for a basic run
        callback = _make_callback(spec, _Stop(), len(train_ds), 0)
        trainer, _ = build_trainer(spec, work / variant, train_ds, None, callback)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

        tokenizer = AutoTokenizer.from_pretrained(spec.model)
        model = AutoModelForCausalLM.from_pretrained(spec.model)
        best = variant == "trl_best"
        common = {
            "output_dir": str(work / variant),
            "max_steps": steps,
            "per_device_train_batch_size": BATCH,
            "max_length": max_length,
            "learning_rate": 1e-6,
            "report_to": "none",
            "disable_tqdm": True,
            "save_strategy": "no",
            "logging_steps": 1,
            "use_cpu": device == "cpu",
            "seed": 42,
            "gradient_checkpointing": not best,
        }
        if method == "sft":
            if best:  # TRL enforces no max_length on padding-free batches and refuses one; a few long rows stay whole
                common["max_length"] = None
            config = SFTConfig(**common, padding_free=best)
            trainer = SFTTrainer(model=model, args=config, train_dataset=train_ds, processing_class=tokenizer)
        else:
            config = DPOConfig(**common, precompute_ref_log_probs=best)
            trainer = DPOTrainer(model=model, args=config, train_dataset=train_ds, processing_class=tokenizer)
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        if method == "sft":  # padded: rows of the attention mask; padding-free: one row, sequences at position 0
            if "attention_mask" in batch:
                real = batch["attention_mask"].sum(dim=1).tolist()
            else:
                starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].size(1)]
                real = [b - a for a, b in itertools.pairwise(starts)]
            batches.append((real, [int((batch["labels"] != -100).sum())]))
        else:
            batches.append(
                (batch["attention_mask"].sum(dim=1).tolist(), batch["completion_mask"][:, 1:].sum(dim=1).tolist())
            )
        return batch

    def count_positions(module, args, kwargs):
        if module.training:  # the policy's forward in a training step (not the reference's, not the precompute)
            positions.append((kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).numel())

    trainer.data_collator = counting
    trainer.model.get_decoder().register_forward_pre_hook(count_positions, with_kwargs=True)
    trainer.add_callback(Clock())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    total = sync() - t_start
    batches = batches[:steps]  # accelerate fetches a batch ahead
    real = [sum(lengths) for lengths, _ in batches]
    reference = method == "dpo" and variant != "trl_best"
    config = AutoConfig.from_pretrained(spec.model)
    loop_flops = sum(step_flops(config, n, c, reference) for n, c in batches[warmup:])
    return {
        "loop_tokens_s": sum(real[warmup:]) / sum(step_times[warmup:]),
        "e2e_tokens_s": sum(real) / total,
        "loop_flops_s": loop_flops / sum(step_times[warmup:]),
        "padding": 1 - sum(real) / sum(positions),
        "peak_gib": (
            torch.cuda.max_memory_allocated() / 2**30
            if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        ),
        "loss": next(log["loss"] for log in reversed(trainer.state.log_history) if "loss" in log),
        "tokens_per_step": statistics.mean(real),
        "completions_per_step": statistics.mean(sum(c) for _, c in batches),
    }


def ceiling(work: Path, tokens: int, completions: int, device: str) -> dict:
    """bf16 GEMM FLOP/s at the model's shapes: each decoder linear (forward, grad input, grad weight) at `tokens`
    rows, the LM head's three at `completions` rows, weighted by how often a step runs each."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(work / "model")
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = h // config.num_attention_heads * config.num_key_value_heads
    layer_shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]  # q k v o gate up down
    gemms = []  # (m, k, n, times per step)
    for fan_in, fan_out in layer_shapes:
        gemms += [
            (tokens, fan_in, fan_out, config.num_hidden_layers),
            (tokens, fan_out, fan_in, config.num_hidden_layers),
            (fan_out, tokens, fan_in, config.num_hidden_layers),
        ]
    gemms += [(completions, h, vocab, 1), (completions, vocab, h, 1), (vocab, completions, h, 1)]
    flops = seconds = 0.0
    for m, k, n, times in gemms:
        a = torch.randn(m, k, dtype=torch.bfloat16, device=device)
        b = torch.randn(k, n, dtype=torch.bfloat16, device=device)
        runs = []
        for _ in range(6):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.mm(a, b)
            if device == "cuda":
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - t0)
        flops += 2 * m * k * n * times
        seconds += statistics.median(runs[1:]) * times
    return {"flops_s": flops / seconds}


def run_child(args, work: Path, what: list[str], env: dict, required: bool = True) -> dict | None:
    """One child's measures; a failure stops the bench, or (not `required`) is printed and gives None."""
    out = subprocess.run(
        [sys.executable, __file__, "--work", str(work), "--device", args.device, *what],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode:
        if required:
            sys.exit(f"{' '.join(what)} failed:\n{out.stderr[-3000:]}")
        print(f"{' '.join(what)} failed:\n{out.stderr[-3000:]}", file=sys.stderr, flush=True)
        return None
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    from training.tiny import SIZES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["dpo", "sft"], default="dpo")
    parser.add_argument("--lengths", nargs="+", choices=list(MAX_LENGTH), default=list(MAX_LENGTH))
    parser.add_argument("--model-size", choices=list(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--peak-tflops", type=float, help="the device's bf16 datasheet peak: adds an MFU column against it"
    )
    parser.add_argument(
        "--liger",
        action="store_true",
        help="with --device cuda: also a `prefq + liger` row, prefq with use_liger_kernel (Liger's Triton kernels)",
    )
    parser.add_argument("--child", choices=[*TRAINERS, LIGER], help=argparse.SUPPRESS)
    parser.add_argument("--ceiling", nargs=2, type=int, metavar=("TOKENS", "COMPLETIONS"), help=argparse.SUPPRESS)
    parser.add_argument("--data", choices=list(MAX_LENGTH), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.method, args.work, args.data, args.steps, args.warmup, args.device)))
        return
    if args.ceiling:
        print(json.dumps(ceiling(args.work, *args.ceiling, args.device)))
        return

    if args.liger and args.device != "cuda":
        sys.exit(
            "--liger: Liger's kernels are Triton kernels, and prefq refuses use_liger_kernel off CUDA; add --device cuda"
        )
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch")
    variants = (*TRAINERS, LIGER) if args.liger else TRAINERS
    work = Path(tempfile.mkdtemp(prefix="prefq-throughput-"))
    build_model(work, args.model_size)
    env = dict(os.environ, TQDM_DISABLE="1")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    tables = []
    for lengths in args.lengths:
        build_data(work, lengths, pairs=args.steps * BATCH, method=args.method)
        results: dict[str, list[dict]] = {v: [] for v in variants}
        ceilings: list[float] = []
        for r in range(args.rounds):
            for variant in variants:
                what = ["--child", variant, "--method", args.method, "--data", lengths, "--steps", str(args.steps)]
                what += ["--warmup", str(args.warmup)]
                child_env = {**env, "HF_DATASETS_CACHE": str(work / f"hf-{lengths}-{r}-{variant}")}
                result = run_child(args, work, what, child_env, required=variant in TRAINERS)
                if result is None:
                    continue
                results[variant].append(result)
                print(f"{lengths} round {r + 1} {variant}: {result}", file=sys.stderr, flush=True)
            shape = results["prefq"][-1]
            what = ["--ceiling", str(round(shape["tokens_per_step"])), str(round(shape["completions_per_step"]))]
            ceilings.append(run_child(args, work, what, env)["flops_s"])
            print(f"{lengths} round {r + 1} ceiling: {ceilings[-1] / 1e9:.0f} GFLOP/s", file=sys.stderr, flush=True)
        tables.append(report(args, lengths, results, ceilings))
    for table in tables:
        print(table)


def report(args, lengths: str, results: dict[str, list[dict]], ceilings: list[float]) -> str:
    def best(variant: str, key: str) -> float:
        return max(r[key] for r in results[variant])

    def ratio(variant: str, key: str, base: str = "trl_default") -> float:
        return best(variant, key) / best(base, key)

    def mfu(variant: str) -> float:
        return best(variant, "loop_flops_s") / max(ceilings)

    def median(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in results[variant])

    lines = [
        f"\n{args.method.upper()} training throughput, {lengths} lengths (max_length {MAX_LENGTH[lengths]}, "
        f"{median('prefq', 'tokens_per_step'):.0f} real tokens per step), model {args.model_size}, batch {BATCH}, "
        f"{args.steps} steps ({args.warmup} warm-up), {args.device} ({os.cpu_count()} CPU cores), best of "
        f"{args.rounds} rounds; ceiling {max(ceilings) / 1e9:.0f} GFLOP/s bf16\n",
        f"{'variant':14} {'padding':>8} {'loop tok/s':>11} {'ratio':>7} {'e2e tok/s':>10} {'ratio':>7} "
        f"{'MFU':>6} {'of peak':>8} {'peak GiB':>9} {'last loss':>10}",
    ]
    for variant in results:
        if not results[variant]:
            lines.append(f"{LABELS.get(variant, variant):14} failed: see stderr")
            continue
        of_peak = (
            f"{best(variant, 'loop_flops_s') / (args.peak_tflops * 1e12):8.1%}" if args.peak_tflops else f"{'-':>8}"
        )
        lines.append(
            f"{LABELS.get(variant, variant):14} {median(variant, 'padding'):8.1%} {best(variant, 'loop_tokens_s'):11.0f} "
            f"{ratio(variant, 'loop_tokens_s'):6.2f}x {best(variant, 'e2e_tokens_s'):10.0f} "
            f"{ratio(variant, 'e2e_tokens_s'):6.2f}x {mfu(variant):6.1%} {of_peak} "
            f"{median(variant, 'peak_gib'):9.2f} {median(variant, 'loss'):10.4f}"
        )
    trl = max(("trl_default", "trl_best"), key=lambda v: best(v, "e2e_tokens_s"))
    lines.append(
        f"\nprefq end to end: {ratio('prefq', 'e2e_tokens_s', 'prefq_padded'):.2f}x its padded path, "
        f"{ratio('prefq', 'e2e_tokens_s', trl):.2f}x TRL's best ({trl}); loop MFU {mfu('prefq'):.1%} of the "
        "in-run ceiling"
    )
    if results.get(LIGER):
        lines.append(
            f"prefq + liger: {ratio(LIGER, 'loop_tokens_s', 'prefq'):.2f}x prefq's loop tokens/s, peak "
            f"{median(LIGER, 'peak_gib'):.2f} GiB against {median('prefq', 'peak_gib'):.2f} GiB"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
