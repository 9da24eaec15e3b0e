#!/usr/bin/env bash
# Create .venv (or $NANOCHAT_VENV) and install nanochat with the right PyTorch build:
# the CUDA wheel on a node with an NVIDIA GPU (plus the `gpu` extra and the Flash Attention 3 kernel),
# the CPU wheel everywhere else.
set -euo pipefail
cd "$(dirname "$0")/.."
# The one place the GPU build of torch is pinned: a version/CUDA pair for which the HF kernel hub has
# Flash Attention 3 builds (varunneal/flash-attention-3 ships torch 2.9 + CUDA 12.8 builds).
# Override both together if you know another pair works.
CUDA_TORCH_VERSION="${CUDA_TORCH_VERSION:-2.9.1}"
CUDA_TORCH_INDEX="${CUDA_TORCH_INDEX:-https://download.pytorch.org/whl/cu128}"
CPU_TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VENV="${NANOCHAT_VENV:-.venv}"  # CI sets its own, so it never touches a developer's .venv
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "NVIDIA GPU found: installing torch $CUDA_TORCH_VERSION from $CUDA_TORCH_INDEX"
    $PIP install "torch==$CUDA_TORCH_VERSION" --index-url "$CUDA_TORCH_INDEX"
    $PIP install -e '.[dev,export,gpu]'
    # Fetch the FA3 kernel now, into the HF cache, so no training step ever downloads. Without network
    # (or on a non-Hopper GPU) this fails harmlessly and training uses FlexAttention / SDPA instead.
    "$VENV/bin/python" -c "
import torch, nanochat.attention as a
if torch.cuda.get_device_capability()[0] != 9:
    print('not a Hopper GPU: FA3 is not used here (attention falls back to FlexAttention)')
else:
    a.fetch_fa3_kernel(); print('FA3 kernel cached:', a.FA3_KERNEL_REPO)
" || echo "WARNING: could not fetch the FA3 kernel (offline?); training will use FlexAttention for sliding windows"
elif [ "$(uname)" = "Darwin" ]; then
    $PIP install "torch==$CPU_TORCH_VERSION"             # macOS wheels are CPU/MPS builds
    $PIP install -e '.[dev,export]'
else
    echo "no CUDA GPU: installing the CPU build of torch $CPU_TORCH_VERSION"
    # a local +cpu wheel (pip find-links) if there is one, else PyTorch's CPU index
    $PIP install "torch==$CPU_TORCH_VERSION+cpu" 2>/dev/null \
        || $PIP install "torch==$CPU_TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
    $PIP install -e '.[dev,export]'
fi
echo "done: activate with 'source $VENV/bin/activate'"
