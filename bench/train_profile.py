"""Where a `basic` DPO step spends its time: torch's profiler over the training loop of `bench/train_throughput.py`.

    .venv/bin/python bench/train_profile.py [--lengths uniform|realistic] [--model-size small] [--steps 8]

Builds the same random model and data as the throughput benchmark, trains prefq's `basic` DPO (padding-free, bf16,
a reference forward per step) and profiles the steps after two warm-up steps. Prints the share of the loop's CPU
time by kind of work: the matrix products (what the MFU ceiling measures), attention (sdpa), the LM head's
log-softmax and gather, the optimizer, and everything else (elementwise, norms, copies, autograd bookkeeping), and
then the top operators by self time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from train_throughput import BATCH, MAX_LENGTH, build_data, build_model  # noqa: E402

KINDS = (  # first match wins: (kind, substrings of the operator's name)
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn", "onednn")),
    ("attention", ("attention", "sdpa", "flash")),
    ("lm head: log-softmax, gather", ("log_softmax", "logsumexp", "gather", "_log_softmax")),
    ("optimizer", ("adam", "_foreach", "optimizer")),
)


def main() -> None:
    from training.tiny import SIZES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", choices=list(MAX_LENGTH), default="uniform")
    parser.add_argument("--model-size", choices=list(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from training.data import load_splits
    from training.logprobs import keep_freed_memory
    from training.run import _make_callback, _Stop, build_trainer
    from training.spec import parse_spec

    work = Path(tempfile.mkdtemp(prefix="prefq-profile-"))
    build_model(work, args.model_size)
    data = build_data(work, args.lengths, pairs=(args.steps + 2) * BATCH)
    spec = parse_spec(
        {
            "method": "dpo",
            "model": str(work / "model"),
            "train_file": str(data),
            "eval_fraction": 0,
            "max_steps": args.steps + 2,
            "batch_size": BATCH,
            "max_length": MAX_LENGTH[args.lengths],
            "learning_rate": 1e-6,
            "save_steps": 10_000,
        }
    )
    train_ds, _ = load_splits(spec)
    keep_freed_memory()
    trainer, _ = build_trainer(spec, work / "run", train_ds, None, _make_callback(spec, _Stop(), len(train_ds), 0))
    prof = profile(activities=[ProfilerActivity.CPU])

    class Window(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == 2:
                prof.__enter__()

        def on_train_end(self, a, state, control, **kw):
            prof.__exit__(None, None, None)

    trainer.add_callback(Window())
    trainer.train()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    by_kind: dict[str, float] = defaultdict(float)
    for e in events:
        name = e.key.lower()
        kind = next((k for k, subs in KINDS if any(s in name for s in subs)), "other")
        by_kind[kind] += e.self_cpu_time_total
    print(
        f"\n{args.steps} profiled steps, {args.lengths} lengths, model {args.model_size}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; loop CPU time {total / 1e6:.2f} s"
    )
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:32} {t / total:6.1%}")
    print("\ntop operators by self CPU time:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:20]:
        print(f"  {e.key[:60]:60} {e.self_cpu_time_total / total:6.1%}  calls {e.count}")


if __name__ == "__main__":
    main()
