#!/usr/bin/env bash
# The whole nanochat pipeline at toy scale on a CPU (or an Apple-silicon Mac): tokenizer, a depth-4
# base model, midtraining, SFT, chat evals, the report card and a chat reply. 11-15 minutes on
# 2 CPU cores. Offline with a data mirror:
#   NANOCHAT_DATA_DIR=../shared/data bash runs/runcpu.sh
# Online (downloads 2 pretraining shards, the eval bundle and the Hub datasets):
#   bash runs/runcpu.sh
# Every stage's command is printed before it runs; a failing stage stops the script with its name.
# The training stages pick their precision at start-up (logged as "precision: ..."): bf16 + torch.compile
# where this CPU's bf16 matmul measures >= 1.5x fp32, fp32 eager elsewhere; --dtype/--compile override it.
set -euo pipefail
cd "$(dirname "$0")/.."
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"
WANDB_RUN="${WANDB_RUN:-dummy}"
# OpenMP's idle threads sleep (PASSIVE) between parallel regions, leaving the cores to the evaluations' other
# threads and processes; the training stages run back-to-back ops, where threads that spin (ACTIVE) measured
# faster with the same losses (2 cores, 30-40 steps, interleaved: base_train 0.73-0.74 vs 0.77-0.79 min,
# mid_train 0.41 vs 0.48-0.55 min)
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
TRAIN=(env OMP_WAIT_POLICY="${TRAIN_OMP_WAIT_POLICY:-ACTIVE}")

stage() {  # stage NAME CMD...: print, run, and stop with the stage's name on failure
    local name="$1"; shift
    echo; echo "=== [$name] $*"
    local t0=$SECONDS
    "$@" || { echo "*** stage '$name' failed: $*"; exit 1; }
    echo "=== [$name] done in $((SECONDS - t0))s"
}

[ -x .venv/bin/python ] || stage setup bash runs/setup_env.sh
source .venv/bin/activate
stage report-reset python -m nanochat.report reset

MID_FLAGS=()
if [ -n "${NANOCHAT_DATA_DIR:-}" ]; then
    echo "offline: reading every dataset from NANOCHAT_DATA_DIR=$NANOCHAT_DATA_DIR"
    # mirrors may lack the 100K-row MMLU auxiliary_train set of the default mid mixture: teach the
    # multiple-choice format with ARC's train splits instead
    [ -f "$NANOCHAT_DATA_DIR/hub/cais/mmlu/all/auxiliary_train.jsonl" ] || \
        MID_FLAGS+=(--drop mmlu_aux --add-data arc_easy --add-data arc_challenge)
    # a small SmolTalk stand-in would be drowned by the 280K synthetic spelling rows: cap them
    [ -d "$NANOCHAT_DATA_DIR/hub/HuggingFaceTB/smol-smoltalk" ] || \
        MID_FLAGS+=(--cap simplespelling=3000 --cap spellingbee=2000)
else
    stage data python -m nanochat.dataset -n 2
    [ -f "$NANOCHAT_BASE_DIR/identity_conversations.jsonl" ] || stage identity-data curl -fsSL \
        -o "$NANOCHAT_BASE_DIR/identity_conversations.jsonl" \
        https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl
fi

# tokenizer: 8,192 tokens on up to 50M characters (seconds)
stage tok_train python -m scripts.tok_train --vocab-size=8192 --max-chars=50000000
stage tok_eval python -m scripts.tok_eval

# base model: depth 4 (width 256, 4 heads of 64), 512-token context, 16K-token steps, ~2.3M tokens
stage base_train "${TRAIN[@]}" python -m scripts.base_train --depth=4 --head-dim=64 --window-pattern=L --max-seq-len=512 \
    --device-batch-size=32 --total-batch-size=16384 --num-iterations=140 --warmup-steps=10 \
    --eval-every=35 --eval-tokens=131072 --core-metric-every=-1 --sample-every=140 --save-every=35 --run=$WANDB_RUN
stage base_loss python -m scripts.base_loss --device-batch-size=16 --split-tokens=131072
stage base_eval python -m scripts.base_eval --max-per-task=16

# chat stages
stage mid_train "${TRAIN[@]}" python -m scripts.mid_train --max-seq-len=512 --device-batch-size=16 --total-batch-size=8192 \
    --num-iterations=150 --eval-every=50 --eval-tokens=65536 --save-every=50 "${MID_FLAGS[@]}" --run=$WANDB_RUN
stage chat_eval-mid python -m scripts.chat_eval -i mid -x 32 -m 128
stage chat_sft "${TRAIN[@]}" python -m scripts.chat_sft --device-batch-size=8 --target-examples-per-step=16 \
    --num-iterations=100 --max-seq-len=512 --eval-every=50 --eval-steps=8 --eval-metrics-every=-1 \
    --eval-metrics-max-problems=64 --save-every=50 --run=$WANDB_RUN
stage chat_eval-sft python -m scripts.chat_eval -i sft -x 32 -m 128

stage report python -m nanochat.report generate
stage chat python -m scripts.chat_cli -p "What is the capital of France?"
echo
echo "done: report card in ./report.md (plots in $NANOCHAT_BASE_DIR/report/)"
# the figures a change that costs quality moves first, on one line (also in the report's summary table)
python -m nanochat.report quality
