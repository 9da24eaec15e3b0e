#!/usr/bin/env bash
# The whole pipeline on one 8xH100 node: tokenizer, d20 base model, midtraining, SFT, evals and the
# report card, in about 4 hours (~$100 at $24/h). Every stage's command is printed before it runs and
# a failing stage stops the script with its name.
#   bash speedrun.sh
#   WANDB_RUN=speedrun bash speedrun.sh                       # with wandb logging (after `wandb login`)
#   screen -L -Logfile speedrun.log -S speedrun bash speedrun.sh
#   NANOCHAT_DATA_DIR=/data/mirror NANOCHAT_WHEELHOUSE=/data/wheels bash speedrun.sh   # air-gapped node: data from a
#       mirror (python -m scripts.data_mirror DIR --shards 370) and packages from a wheelhouse (runs/wheelhouse.sh)
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"
WANDB_RUN="${WANDB_RUN:-dummy}"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "speedrun.sh needs NVIDIA GPUs and none were found."
    echo "On a CPU (or a Mac) run the toy-scale recipe instead:  bash runs/runcpu.sh"
    exit 1
fi
# GPUs to use: the ones CUDA_VISIBLE_DEVICES exposes where it is set (a shared node), else every GPU
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    NGPU=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
else
    NGPU=$(nvidia-smi -L | wc -l)
fi
NPROC_PER_NODE="${NPROC_PER_NODE:-$NGPU}"
echo "using $NPROC_PER_NODE GPU(s)"

stage() {  # stage NAME CMD...: print, run, and stop with the stage's name on failure
    local name="$1"; shift
    echo; echo "=== [$name] $*"
    "$@" || { echo "*** stage '$name' failed (exit $?): $*"; exit 1; }
}
TORCHRUN="torchrun --standalone --nproc_per_node=$NPROC_PER_NODE"

stage setup bash runs/setup_env.sh
source .venv/bin/activate
stage report-reset python -m nanochat.report reset

# data: 8 shards (~2B chars) for the tokenizer now, the rest in the background while it trains (nothing to fetch
# with an offline mirror: every stage reads NANOCHAT_DATA_DIR)
if [ -n "${NANOCHAT_DATA_DIR:-}" ]; then
    echo "offline: reading every dataset from NANOCHAT_DATA_DIR=$NANOCHAT_DATA_DIR"
    DATASET_DOWNLOAD_PID=""
else
    stage data python -m nanochat.dataset -n 8
    python -m nanochat.dataset -n 370 &
    DATASET_DOWNLOAD_PID=$!
fi
stage tok_train python -m scripts.tok_train --max-chars=2000000000 --vocab-size=32768
stage tok_eval python -m scripts.tok_eval
if [ -n "$DATASET_DOWNLOAD_PID" ]; then
    echo "waiting for the background data download..."
    wait $DATASET_DOWNLOAD_PID || { echo "*** stage 'data (background)' failed"; exit 1; }
fi

# base model: d20 at 20 tokens per scaling parameter. Every training stage sizes its per-GPU batch from
# the memory estimate (--device-batch-size=auto, printed at start); gradient accumulation keeps the total.
stage base_train $TORCHRUN -m scripts.base_train -- --depth=20 --target-param-data-ratio=20 --device-batch-size=auto \
    --run=$WANDB_RUN
stage base_loss $TORCHRUN -m scripts.base_loss
stage base_eval $TORCHRUN -m scripts.base_eval

# chat stages
[ -n "${NANOCHAT_DATA_DIR:-}" ] || stage identity-data curl -fsSL -o "$NANOCHAT_BASE_DIR/identity_conversations.jsonl" \
    https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl
stage mid_train $TORCHRUN -m scripts.mid_train -- --device-batch-size=auto --run=$WANDB_RUN
stage chat_eval-mid $TORCHRUN -m scripts.chat_eval -- -i mid
stage chat_sft $TORCHRUN -m scripts.chat_sft -- --device-batch-size=auto --run=$WANDB_RUN
stage chat_eval-sft $TORCHRUN -m scripts.chat_eval -- -i sft
# optional RL on GSM8K:
# stage chat_rl $TORCHRUN -m scripts.chat_rl -- --run=$WANDB_RUN
# stage chat_eval-rl $TORCHRUN -m scripts.chat_eval -- -i rl -a GSM8K

stage report python -m nanochat.report generate
stage chat python -m scripts.chat_cli -p "Why is the sky blue?"
echo "done: see report.md; chat with 'python -m scripts.chat_web'"
