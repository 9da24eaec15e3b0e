#!/usr/bin/env bash
# Create .venv (or $NANOCHAT_VENV) and install nanochat with every dependency at the version requirements.lock
# pins, and the right PyTorch build: the CUDA wheel on a node with an NVIDIA GPU (plus the `gpu` extra and the
# Flash Attention 3 kernel, fetched into the kernel cache so training never downloads), the CPU wheel elsewhere.
#   bash runs/setup_env.sh
#   NANOCHAT_WHEELHOUSE=DIR bash runs/setup_env.sh   # no network: every wheel from DIR (runs/wheelhouse.sh makes
#                                                    # it); an installed torch that fits is reused
#   NANOCHAT_SETUP_DRY=1 bash runs/setup_env.sh      # print what it would do, change nothing
#   NANOCHAT_SETUP_VENV_ONLY=1 bash runs/setup_env.sh # only create the virtual environment (with pip)
# NANOCHAT_PYTHON picks the interpreter (default python3, >= 3.10). Without its venv module's pip (bare Debian and
# Ubuntu images lack python3-venv) it falls back to virtualenv, else to a venv without pip plus pip from a wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
# The one place the torch builds are pinned. GPU: a version/CUDA pair for which the HF kernel hub has Flash
# Attention 3 builds (kernels-community/flash-attn3 ships torch 2.9 + CUDA 12.8). Override both together if you
# know another pair works. CPU (and macOS): the version requirements.lock was resolved against (runs/lock.sh).
CUDA_TORCH_VERSION="${CUDA_TORCH_VERSION:-2.9.1}"
CUDA_TORCH_INDEX="${CUDA_TORCH_INDEX:-https://download.pytorch.org/whl/cu128}"
CPU_TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
MIN_TORCH="2.9"  # pyproject.toml's floor: an installed torch below it is not reused
VENV="${NANOCHAT_VENV:-.venv}"  # CI sets its own, so it never touches a developer's .venv
PY="${NANOCHAT_PYTHON:-python3}"
WHEELHOUSE="${NANOCHAT_WHEELHOUSE:-}"
DRY="${NANOCHAT_SETUP_DRY:-0}"
LOCK=requirements.lock

say() { echo "setup: $*"; }
run() { if [ "$DRY" = "1" ]; then echo "setup (dry run): $*"; else "$@"; fi; }

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
    || { echo "setup: $PY is missing or older than Python 3.10; set NANOCHAT_PYTHON to a newer one"; exit 1; }
PIP_OPTS=(-c "$LOCK")
if [ -n "$WHEELHOUSE" ]; then
    [ -d "$WHEELHOUSE" ] || { echo "setup: NANOCHAT_WHEELHOUSE=$WHEELHOUSE is not a directory (make one with runs/wheelhouse.sh)"; exit 1; }
    WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
    PIP_OPTS+=(--no-index --find-links "$WHEELHOUSE")
    say "offline: every package from the wheelhouse $WHEELHOUSE"
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    MACHINE=cuda; EXTRAS="dev,export,gpu"; TORCH_SPEC="torch==$CUDA_TORCH_VERSION"
elif [ "$(uname)" = "Darwin" ]; then
    MACHINE=macos; EXTRAS="dev,export"; TORCH_SPEC="torch==$CPU_TORCH_VERSION"  # macOS wheels are CPU/MPS builds
else
    MACHINE=cpu; EXTRAS="dev,export"; TORCH_SPEC="torch==$CPU_TORCH_VERSION"
fi

# Offline, a torch the interpreter already has (a GPU image's CUDA build, say) is reused when it fits: a venv with
# system site packages sees it, and pip installs only what is missing or pinned differently, into the venv.
SYSTEM_TORCH=""
if [ -n "$WHEELHOUSE" ]; then
    SYSTEM_TORCH=$("$PY" - "$MIN_TORCH" "$MACHINE" <<'PY' 2>/dev/null || true
import sys
if sys.prefix != sys.base_prefix:
    sys.exit()  # a venv's own packages are no system site packages: a venv made from it would not see them
try:
    import torch
except Exception:
    sys.exit()
want = tuple(int(x) for x in sys.argv[1].split("."))
have = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
if have >= want and (sys.argv[2] != "cuda" or torch.version.cuda):
    print(f"{torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else ""))
PY
)
fi

bootstrap_pip() {  # a venv made without pip: pip from a pip wheel (a wheel runs as a zip: pip installs itself)
    local whl
    whl=$(ls "${WHEELHOUSE:-/nonexistent}"/pip-*.whl 2>/dev/null | sort -V | tail -1 || true)
    if [ -z "$whl" ]; then
        whl=$("$VENV/bin/python" - <<'PY'
import json, os, tempfile, urllib.request
with urllib.request.urlopen("https://pypi.org/pypi/pip/json", timeout=60) as r:
    url = next(f["url"] for f in json.load(r)["urls"] if f["packagetype"] == "bdist_wheel")
path = os.path.join(tempfile.mkdtemp(), url.rsplit("/", 1)[1])
urllib.request.urlretrieve(url, path)
print(path)
PY
)
    fi
    "$VENV/bin/python" "$whl/pip" install -q --no-index --ignore-installed "$whl"  # into the venv itself
}

make_venv() {  # make_venv [--system-site-packages]: the first method that yields a venv with a working pip
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        say "reusing the virtual environment $VENV"; return
    fi
    if [ "$DRY" = "1" ]; then say "would create $VENV with $PY -m venv $* (or a fallback)"; return; fi
    if "$PY" -m venv "$@" "$VENV" >/dev/null 2>&1; then
        say "created $VENV with $PY -m venv"
    elif "$PY" -m virtualenv --version >/dev/null 2>&1 && "$PY" -m virtualenv -q "$@" "$VENV"; then
        say "$PY -m venv failed (no python3-venv?): created $VENV with virtualenv instead"
    else
        rm -rf "$VENV"
        "$PY" -m venv --without-pip "$@" "$VENV"
        bootstrap_pip
        say "$PY -m venv failed and virtualenv is missing (no python3-venv?): created $VENV with" \
            "\`venv --without-pip\` and installed pip from a wheel ($([ -n "$WHEELHOUSE" ] && echo the wheelhouse || echo PyPI))"
    fi
}

if [ -n "$SYSTEM_TORCH" ]; then
    say "$MACHINE machine: reusing the installed torch $SYSTEM_TORCH of $PY (a venv with system site packages)"
    make_venv --system-site-packages
else
    say "$MACHINE machine: installing $TORCH_SPEC"
    make_venv
fi
[ "${NANOCHAT_SETUP_VENV_ONLY:-0}" = "1" ] && { say "done: created $VENV only (NANOCHAT_SETUP_VENV_ONLY)"; exit 0; }
PIP=("$VENV/bin/python" -m pip)
if [ -z "$SYSTEM_TORCH" ]; then
    if [ "$MACHINE" = cuda ] && [ -z "$WHEELHOUSE" ]; then
        run "${PIP[@]}" install "${PIP_OPTS[@]}" "$TORCH_SPEC" --index-url "$CUDA_TORCH_INDEX"
    elif [ "$MACHINE" = cpu ] && [ -z "$WHEELHOUSE" ]; then
        # a local +cpu wheel (pip find-links) if there is one, else PyTorch's CPU index
        run "${PIP[@]}" install "${PIP_OPTS[@]}" "$TORCH_SPEC+cpu" 2>/dev/null \
            || run "${PIP[@]}" install "${PIP_OPTS[@]}" "$TORCH_SPEC" --index-url https://download.pytorch.org/whl/cpu
    else  # macOS, or offline: a torch wheel from the wheelhouse (or pip's configured find-links)
        run "${PIP[@]}" install "${PIP_OPTS[@]}" "$TORCH_SPEC" || { [ -z "$WHEELHOUSE" ] || echo "setup: no $TORCH_SPEC" \
            "wheel in $WHEELHOUSE: add one (pip download $TORCH_SPEC --no-deps -d DIR, from PyTorch's index for" \
            "your CUDA) or run with a python that has torch >= $MIN_TORCH installed (NANOCHAT_PYTHON)"; exit 1; }
    fi
fi
run "${PIP[@]}" install "${PIP_OPTS[@]}" -e ".[$EXTRAS]"
# the lock is complete: every installed package's requirements are met (a reused system site is not ours to check)
[ -n "$SYSTEM_TORCH" ] || run "${PIP[@]}" check
run "$VENV/bin/python" -c "import torch, nanochat.gpt; print('setup: torch', torch.__version__, '| nanochat imports')"

if [ "$MACHINE" = cuda ]; then
    # Fetch the FA3 kernel now, into the kernel cache, so no training step ever downloads (the loader reads the
    # cache only). Offline it must already be in the cache (KERNELS_CACHE); training says so if not.
    if [ -n "$WHEELHOUSE" ]; then
        say "offline: not fetching the FA3 kernel; training uses it if the kernel cache has it, else FlexAttention"
    else
        run "$VENV/bin/python" -c "
import torch, nanochat.attention as a
if torch.cuda.get_device_capability()[0] != 9:
    print('setup: not a Hopper GPU: FA3 is not used here (attention uses FlexAttention)')
else:
    a.fetch_fa3_kernel(); print('setup: FA3 kernel cached:', a.FA3_KERNEL_REPO, 'version', a.FA3_KERNEL_VERSION)
" || echo "setup: WARNING: could not fetch the FA3 kernel; training will use FlexAttention for sliding windows"
        [ -f kernels.lock ] || say "to pin the exact FA3 build, run \`$VENV/bin/kernels lock .\` once and commit kernels.lock"
    fi
fi
say "done: activate with 'source $VENV/bin/activate'"
