"""DPO training throughput: prefq's `basic` trainer against TRL's DPOTrainer, measured in one run.

    .venv/bin/python bench/train_throughput.py [--steps 12] [--rounds 2]

Same model (a random 23M-parameter Llama, vocabulary 16384, untied head), same data (preference pairs of
232-256 tokens with prompts of 64-160), batch 8 pairs, max_length 256, one epoch of `steps` steps:

- trl_default: TRL 1.16 `DPOTrainer` with its defaults (bf16, gradient checkpointing, a reference forward per step)
- trl_precompute: the same with `precompute_ref_log_probs=True` (its precompute pass counted end to end)
- prefq: `training.run.build_trainer` for a `basic` DPO spec (bf16, no checkpointing), as a worker runs it

Each variant trains in a subprocess of its own (its peak RSS is its own); rounds alternate the variants, and
each ratio is taken against trl_default of the same round, then the median over rounds is printed.
tokens/s counts real tokens (prompt+chosen and prompt+rejected, no padding): "loop" over the steps after
the warm-up, "end to end" over everything from the trainer's construction (precompute included) to the end.
"""

from __future__ import annotations

import argparse
import json
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
VARIANTS = ("trl_default", "trl_precompute", "prefq")
BATCH, MAX_LENGTH = 8, 256


def build_assets(work: Path, pairs: int) -> None:
    from transformers import AutoTokenizer

    from training.tiny import make_tiny_model
    from training.toy_data import FILLER

    make_tiny_model(work / "model", "small")
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    rng = random.Random(0)

    def text(tokens: int) -> str:
        words: list[str] = []
        while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < tokens:
            words.append(rng.choice(FILLER))
        return " " + " ".join(words[:-1])

    with open(work / "pairs.jsonl", "w") as out:
        for _ in range(pairs):
            prompt = "Question:" + text(rng.randint(64, 160))
            room = MAX_LENGTH - len(tokenizer(prompt)["input_ids"]) - 1
            row = {"prompt": prompt, "chosen": text(room - rng.randint(0, 24)),
                   "rejected": text(room - rng.randint(0, 24))}  # fmt: skip
            out.write(json.dumps(row) + "\n")


def child(variant: str, work: Path, steps: int, warmup: int) -> dict:
    """Train one variant; returns its timings (runs in a fresh process)."""
    from transformers import TrainerCallback

    from training.data import load_splits
    from training.logprobs import keep_freed_memory
    from training.run import _make_callback, _Stop, build_trainer
    from training.spec import parse_spec

    spec = parse_spec({"method": "dpo", "model": str(work / "model"), "train_file": str(work / "pairs.jsonl"),
                       "eval_fraction": 0, "max_steps": steps, "batch_size": BATCH, "max_length": MAX_LENGTH,
                       "learning_rate": 1e-6, "save_steps": 10_000})  # fmt: skip
    train_ds, _ = load_splits(spec)
    step_times, step_tokens = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - self.t0)

    t_start = time.perf_counter()
    if variant == "prefq":
        keep_freed_memory()  # what `python -m training run` does for a basic run
        trainer, _ = build_trainer(spec, work / variant, train_ds, None, _make_callback(spec, _Stop(), len(train_ds), 0))
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        tokenizer = AutoTokenizer.from_pretrained(spec.model)
        model = AutoModelForCausalLM.from_pretrained(spec.model)
        config = DPOConfig(output_dir=str(work / variant), max_steps=steps, per_device_train_batch_size=BATCH,
                           max_length=MAX_LENGTH, learning_rate=1e-6, report_to="none", disable_tqdm=True,
                           save_strategy="no", use_cpu=True, seed=42,
                           precompute_ref_log_probs=variant == "trl_precompute")  # fmt: skip
        trainer = DPOTrainer(model=model, args=config, train_dataset=train_ds, processing_class=tokenizer)
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        step_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    trainer.add_callback(Clock())
    trainer.train()
    total = time.perf_counter() - t_start
    tokens = step_tokens[:steps]
    loop_tokens = sum(tokens[warmup:])
    return {
        "loop_tokens_s": loop_tokens / sum(step_times[warmup:]),
        "e2e_tokens_s": sum(tokens) / total,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "loss": trainer.state.log_history[-2].get("loss") if len(trainer.state.log_history) > 1 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.work, args.steps, args.warmup)))
        return

    work = Path(tempfile.mkdtemp(prefix="prefq-throughput-"))
    build_assets(work, pairs=args.steps * BATCH)
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    env = dict(os.environ, TQDM_DISABLE="1", HF_DATASETS_CACHE=str(work / "hf-cache"))
    for r in range(args.rounds):
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--work", str(work), "--steps",
                                  str(args.steps), "--warmup", str(args.warmup)], capture_output=True, text=True,
                                 env={**env, "HF_DATASETS_CACHE": str(work / f"hf-cache-{r}-{variant}")})  # fmt: skip
            if out.returncode:
                sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
            results[variant].append(json.loads(out.stdout.splitlines()[-1]))
            print(f"round {r + 1} {variant}: {results[variant][-1]}", file=sys.stderr, flush=True)

    def ratio(variant: str, key: str) -> float:
        return statistics.median(a[key] / b[key] for a, b in zip(results[variant], results["trl_default"], strict=True))

    print(f"\nDPO training throughput, 23M-parameter Llama, batch {BATCH}, max_length {MAX_LENGTH}, "
          f"{args.steps} steps ({args.warmup} warm-up), {os.cpu_count()} CPU cores, median of {args.rounds} rounds\n")
    print(f"{'variant':16} {'loop tok/s':>11} {'ratio':>7} {'end-to-end tok/s':>17} {'ratio':>7} {'peak RSS GiB':>13}")
    for variant in VARIANTS:
        rows = results[variant]
        print(f"{variant:16} {statistics.median(r['loop_tokens_s'] for r in rows):11.0f} "
              f"{ratio(variant, 'loop_tokens_s'):6.2f}x {statistics.median(r['e2e_tokens_s'] for r in rows):17.0f} "
              f"{ratio(variant, 'e2e_tokens_s'):6.2f}x {statistics.median(r['peak_rss_gib'] for r in rows):13.2f}")
    prefq, pre = ratio("prefq", "e2e_tokens_s"), ratio("trl_precompute", "e2e_tokens_s")
    print(f"\ngoal: prefq >= 1.5x trl_default end to end ({prefq:.2f}x) and >= trl_precompute ({prefq / pre:.2f}x)")


if __name__ == "__main__":
    main()
