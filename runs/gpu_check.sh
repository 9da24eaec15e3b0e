#!/usr/bin/env bash
# Prove the GPU path on ONE H100/H200 in under 8 minutes, with no network, by construction: every step runs under
# its own time limit (`timeout`), the limits plus the kill grace add up to 7.5 minutes, a step past its limit is
# reported as TIMED OUT and the run goes on, and the summary is printed whatever happens (even on Ctrl-C).
#   1. environment report (torch, CUDA, GPU, attention backend and why: FA3, or FlexAttention when the node has
#      no network and no FA3 kernel in its cache)
#   2. pytest -m gpu (CUDA vs CPU parity, KV-cache decode, attention backends, compiled model and Muon, fp8 linear)
#   3. bench_train at d20 with the auto batch, bf16 then fp8: tok/s, MFU vs datasheet peak, peak memory next to
#      the estimate, share of step time outside GPU kernels (torch.profiler), compile time apart from step time
#   4. bench_infer at d20
#   5. a tiny end to end run on the GPU from data this script generates: tok_train -> base -> SFT -> a reply
#   bash runs/gpu_check.sh                    # logs in a temp dir (printed), or GPU_CHECK_DIR=...
#   GPU_CHECK_DRY=1 bash runs/gpu_check.sh    # print the commands and limits only (works without a GPU)
#   GPU_CHECK_E2E_ONLY=1 GPU_CHECK_E2E_BATCH=4 bash runs/gpu_check.sh   # only step 5, runs on a CPU too
#   GPU_CHECK_LIMIT_SCALE=2 bash runs/gpu_check.sh   # every limit x2 (a slower GPU; no longer within 8 minutes)
# Uses .venv when present (runs/setup_env.sh), else the python on PATH. Exits non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY="${GPU_CHECK_DRY:-0}"
E2E_ONLY="${GPU_CHECK_E2E_ONLY:-0}"
E2E_BATCH="${GPU_CHECK_E2E_BATCH:-auto}"
SCALE="${GPU_CHECK_LIMIT_SCALE:-1}"
KILL_GRACE=3  # seconds between a step's SIGTERM and its SIGKILL
LOGS="${GPU_CHECK_DIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$LOGS"
[ -x .venv/bin/python ] && source .venv/bin/activate
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
export PYTORCH_ALLOC_CONF="${PYTORCH_ALLOC_CONF:-expandable_segments:True}"
T_START=$SECONDS
FAILED=0
declare -a SUMMARY=()

step() {  # step NAME LIMIT_S LOGFILE CMD...: run (or print) under a time limit, tee the log, record the outcome
    local name="$1" limit log="$LOGS/$3"
    limit=$(awk -v s="$2" -v k="$SCALE" 'BEGIN { printf "%g", s * k }')
    shift 3
    echo; echo "=== [$name] (limit ${limit}s) $*"
    if [ "$DRY" = "1" ]; then SUMMARY+=("$(printf '%-17s (dry run) limit %ss' "$name:" "$limit")"); return 0; fi
    local t0=$SECONDS status
    timeout -k "$KILL_GRACE" "$limit" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    case "$rc" in
        0) status=ok ;;
        124|137) status="TIMED OUT (limit ${limit}s)"; FAILED=1 ;;
        *) status="FAILED (exit $rc)"; FAILED=1 ;;
    esac
    SUMMARY+=("$(printf '%-17s %s in %ss' "$name:" "$status" $((SECONDS - t0)))")
}

grab() {  # grab LOGFILE PATTERN: the last matching line of a log, or "-"
    local line=""
    [ -f "$LOGS/$1" ] && line=$(grep -E "$2" "$LOGS/$1" | tail -1)
    echo "${line:--}"
}

summary() {
    echo
    echo "==================================== GPU CHECK SUMMARY ===================================="
    [ "$DRY" = "1" ] && echo "(dry run: commands printed only)"
    echo "$(grab env.log '^torch ')"
    echo "$(grab env.log '^attention backend')"
    [ "$(grab env.log 'WARNING: Flash Attention 3')" != "-" ] && echo "$(grab env.log 'WARNING: Flash Attention 3')"
    for s in "${SUMMARY[@]}"; do echo "  $s"; done
    echo "tests:       $(grab pytest.log '(passed|failed|skipped|error)')"
    for mode in bf16 fp8; do
        f="train_$mode.log"
        echo "train $mode:  $(grab "$f" '^throughput') | $(grab "$f" '^MFU vs datasheet')"
        echo "             compile: $(grab "$f" 'compile \+ first step') | $(grab "$f" '^device batch size')"
        echo "             $(grab "$f" '^peak memory vs estimate')"
    done
    toks() { grab "$1" '^throughput' | awk '{gsub(",", "", $2); print $2}'; }
    local bf16 fp8
    bf16=$(toks train_bf16.log); fp8=$(toks train_fp8.log)
    echo "fp8 speed-up: $(awk -v a="$fp8" -v b="$bf16" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2fx", a / b; else print "-" }')"
    echo "profile:     $(grab train_bf16.log '^step time outside GPU kernels')"
    echo "infer:       $(grab infer.log '^prefill') | $(grab infer.log '^decode batch 1:')"
    echo "             $(grab infer.log '^decode batch [0-9]')"
    echo "e2e reply:   $(tail -3 "$LOGS/e2e_chat.log" 2>/dev/null | tr '\n' ' ')"
    echo "targets: d20 bf16 >= 45% MFU vs 989 TFLOP/s | fp8 >= 1.1x bf16 tok/s | peak within 10% of estimate | < 3% outside kernels"
    local result="every step passed"
    [ "$FAILED" = 0 ] || result="SOME STEPS FAILED OR TIMED OUT"
    [ "$DRY" != "1" ] || result="dry run, nothing ran"
    echo "result: $result |" \
         "total time: $((SECONDS - T_START))s | logs: $LOGS"
    echo "==========================================================================================="
}
trap 'summary; exit $(( FAILED || $? ))' EXIT
trap 'echo "interrupted"; FAILED=1; exit 130' INT TERM

if [ "$DRY" != "1" ] && [ "$E2E_ONLY" != "1" ] && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "runs/gpu_check.sh needs a CUDA GPU and torch with CUDA (bash runs/setup_env.sh on the GPU node)."
    FAILED=1
    exit 1
fi

# Limits in seconds (x GPU_CHECK_LIMIT_SCALE): 25+80+95+75+40 + 10+15+40+25+15 = 420, plus 10 x 3 s of kill grace
# = 450 s = 7.5 min. A compile is the bulk of most steps; the bench steps print it apart from the step times.
if [ "$E2E_ONLY" != "1" ]; then
# 1. environment
step env 25 env.log python -c "
import os, torch, nanochat.attention as a
p = torch.cuda.get_device_properties(0)
print(f'torch {torch.__version__} | CUDA {torch.version.cuda} | GPU {p.name} (sm {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB)')
try:
    import kernels; kv = kernels.__version__
except ImportError:
    kv = 'not installed'
print(f'kernels: {kv} | kernels.lock: {os.path.exists(a.KERNELS_LOCK)} | KERNELS_CACHE={os.environ.get(\"KERNELS_CACHE\")}')
print(f'attention backend: {a.get_backend()} ({a.backend_reason()})')
"

# 2. the GPU tests
step pytest-gpu 80 pytest.log python -m pytest -q -m gpu -p no:cacheprovider tests/test_attention.py tests/test_fp8.py \
    tests/test_compile.py tests/test_gpu_parity.py

# 3. training throughput at d20 (compiled, SSSL windows, 2048 context, batch sized by the memory estimate)
D20="--depth=20 --max-seq-len=2048 --window-pattern=SSSL --vocab-size=32768 --compile=1 --device-batch-size=auto --baseline=0"
step bench-train-bf16 95 train_bf16.log python -m scripts.bench_train $D20 --steps=6 --warmup-steps=2 --profile=1
step bench-train-fp8 75 train_fp8.log python -m scripts.bench_train $D20 --steps=6 --warmup-steps=2 --fp8

# 4. inference at d20
step bench-infer 40 infer.log python -m scripts.bench_infer --depth=20 --head-dim=128 --max-seq-len=2048 \
    --vocab-size=32768 --window-pattern=SSSL --prompt-len=512 --gen-tokens=128 --batch=32 --naive-tokens=32 --repeats=2

fi

# 5. tiny end to end on the GPU, from generated data (the test suite's offline workspace)
E2E="$LOGS/e2e"
export NANOCHAT_DATA_DIR="$E2E/data" NANOCHAT_BASE_DIR="$E2E/base"
[ "$DRY" = "1" ] || { rm -rf "$E2E" && mkdir -p "$E2E/base"; }
SFT_MIX="arc_easy@16,arc_challenge@16,gsm8k@16,smoltalk@100,identity,simplespelling@16,spellingbee@16"
step e2e-data 10 e2e_data.log python -c "import sys; sys.path.insert(0, 'tests'); from conftest import build_data_dir; build_data_dir('$E2E/data')"
step e2e-tok_train 15 e2e_tok.log python -m scripts.tok_train --vocab-size=384 --max-chars=200000
step e2e-base_train 40 e2e_base.log python -m scripts.base_train --depth=2 --head-dim=64 --max-seq-len=256 \
    --window-pattern=SL --device-batch-size=$E2E_BATCH --total-batch-size=4096 --num-iterations=40 --warmup-steps=4 \
    --eval-every=20 --eval-tokens=8192 --core-metric-every=-1 --sample-every=-1
step e2e-chat_sft 25 e2e_sft.log python -m scripts.chat_sft --source=base --max-seq-len=256 --device-batch-size=$E2E_BATCH \
    --target-examples-per-step=16 --num-iterations=20 --eval-every=10 --eval-steps=2 --eval-metrics-every=-1 \
    --mix="$SFT_MIX" --val-mix=smoltalk
step e2e-chat 15 e2e_chat.log python -m scripts.chat_cli -i sft -p "What is 2 plus 3?" -t 0 -m 24
