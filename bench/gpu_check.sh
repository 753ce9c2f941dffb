#!/usr/bin/env bash
# GPU readiness check, for anyone with one CUDA GPU; about 5-10 minutes. Not yet run on a GPU by its author
# (it was written on a machine without one: only its no-CUDA exit was checked there).
#
#   bash bench/gpu_check.sh            # uses .venv/bin/python; PYTHON=... to use another interpreter
#
# 1. checks that torch sees a CUDA device (a CPU build of torch stops here, saying so) and prints what it is;
# 2. runs the tests marked `cuda` (tests/test_cuda.py: flash varlen attention, padding-free = padded, the tiled
#    LM head's memory at a 152k vocabulary, a DPO run);
# 3. runs bench/train_throughput.py on CUDA with a random Qwen2.5-0.5B-shaped Llama (494M parameters) built
#    locally, in bf16 (TRL with sdpa attention, prefq with the flash varlen kernel), one round of both length
#    sets: tokens/s, MFU against the in-run bf16 GEMM ceiling and against the GPU's bf16 datasheet peak, and
#    peak memory, for TRL's defaults, TRL's best flags, prefq padded and prefq.
# Set PREFQ_GPU_BF16_TFLOPS to the GPU's dense bf16 peak when the table below does not know it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

PEAK=$("$PY" - <<'PYEOF'
import os
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) sees no CUDA "
             "device. Run this on a machine with an NVIDIA GPU and a CUDA build of torch==2.13.0.")
props = torch.cuda.get_device_properties(0)
print(f"gpu_check: {props.name}, compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}", file=sys.stderr)
if props.major < 8:
    sys.exit("gpu_check: bf16 and the flash varlen kernel need compute capability 8.0 (Ampere) or newer")
# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' datasheets; SXM figures for H100/H200/B200
PEAKS = {"H200": 989, "GH200": 989, "H100 PCIe": 756, "H100": 989, "B200": 2250, "A100": 312, "A800": 312,
         "L40S": 362, "L4": 121}
peak = os.environ.get("PREFQ_GPU_BF16_TFLOPS") or next((str(v) for k, v in PEAKS.items() if k in props.name), "")
if not peak:
    print(f"gpu_check: no bf16 peak known for {props.name}; set PREFQ_GPU_BF16_TFLOPS for an MFU-of-peak column",
          file=sys.stderr)
print(peak)
PYEOF
)

echo "gpu_check: tests marked cuda" >&2
"$PY" -m pytest -q -m cuda tests/test_cuda.py

echo "gpu_check: throughput, Qwen2.5-0.5B-shaped Llama, bf16, one round" >&2
"$PY" bench/train_throughput.py --device cuda --model-size qwen-0.5b --rounds 1 --steps 12 ${PEAK:+--peak-tflops "$PEAK"}
