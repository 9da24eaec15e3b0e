#!/usr/bin/env bash
# Create .venv (or $NANOCHAT_VENV) and install nanochat with the right PyTorch build:
# the CUDA wheel on a node with an NVIDIA GPU, the CPU wheel everywhere else.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VENV="${NANOCHAT_VENV:-.venv}"  # CI sets its own, so it never touches a developer's .venv
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "NVIDIA GPU found: installing the CUDA build of torch $TORCH_VERSION"
    $PIP install "torch==$TORCH_VERSION"                 # PyPI's Linux wheel is the CUDA build
elif [ "$(uname)" = "Darwin" ]; then
    $PIP install "torch==$TORCH_VERSION"                 # macOS wheels are CPU/MPS builds
else
    echo "no CUDA GPU: installing the CPU build of torch $TORCH_VERSION"
    # a local +cpu wheel (pip find-links) if there is one, else PyTorch's CPU index
    $PIP install "torch==$TORCH_VERSION+cpu" 2>/dev/null \
        || $PIP install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
fi
$PIP install -e '.[dev,export]'
echo "done: activate with 'source $VENV/bin/activate'"
