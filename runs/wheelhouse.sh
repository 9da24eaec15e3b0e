#!/usr/bin/env bash
# Download a wheel of every package requirements.lock pins (all extras, the build backend and pip; not torch)
# into DIR, for a target Python, on a machine with network. Copy DIR and the repository to an air-gapped node
# and install there with no network:  NANOCHAT_WHEELHOUSE=DIR bash runs/setup_env.sh
#   bash runs/wheelhouse.sh DIR                      # for this machine's Python and platform
#   bash runs/wheelhouse.sh DIR --python 3.12        # for a GPU node whose python3.12 has a CUDA torch installed
#   bash runs/wheelhouse.sh DIR --python 3.12 --platform manylinux_2_28_aarch64
# torch is left out: set-up reuses the node's installed torch when it fits, else put a torch wheel in DIR
# (e.g. pip download torch==2.9.1 --no-deps -d DIR --index-url https://download.pytorch.org/whl/cu128).
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: bash runs/wheelhouse.sh DIR [--python X.Y] [--platform TAG]"; exit 1; }
DIR=""; PYVER=""; PLATFORM=""
while [ $# -gt 0 ]; do
    case "$1" in
        --python) [ $# -ge 2 ] || usage; PYVER="$2"; shift 2 ;;
        --platform) [ $# -ge 2 ] || usage; PLATFORM="$2"; shift 2 ;;
        -*) usage ;;
        *) [ -z "$DIR" ] || usage; DIR="$1"; shift ;;
    esac
done
[ -n "$DIR" ] || usage
[ -z "$PYVER" ] || [[ "$PYVER" =~ ^3\.[0-9]+$ ]] || { echo "--python takes a version like 3.12, got '$PYVER'"; exit 1; }
PY="${NANOCHAT_PYTHON:-python3}"
PYVER="${PYVER:-$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}"
mkdir -p "$DIR"
# the lock's lines whose environment markers hold on the target (its Python version and platform)
reqs="$DIR/.requirements-$PYVER.txt"
"$PY" - "$PYVER" "$PLATFORM" requirements.lock > "$reqs" <<'PY'
import sys
from pip._vendor.packaging.requirements import Requirement
pyver, platform_tag, lock = sys.argv[1:]
env = {"python_version": pyver, "python_full_version": pyver + ".0"}
if platform_tag:
    env["sys_platform"] = "darwin" if platform_tag.startswith("macosx") else "linux" if "linux" in platform_tag else "win32"
    env["platform_system"] = {"darwin": "Darwin", "linux": "Linux", "win32": "Windows"}[env["sys_platform"]]
    env["platform_machine"] = next((m for m in ("x86_64", "aarch64", "arm64") if platform_tag.endswith(m)), "x86_64")
for line in open(lock):
    line = line.split("#", 1)[0].strip()
    if line:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            print(f"{req.name}{req.specifier}")
PY
target=(--python-version "$PYVER" --implementation cp)
[ -z "$PLATFORM" ] || target+=(--platform "$PLATFORM")
echo "wheelhouse: $(wc -l < "$reqs") packages for Python $PYVER${PLATFORM:+ ($PLATFORM)} -> $DIR"
# (pip's notes about configured local indexes lacking a package are noise here: the download is what counts)
"$PY" -m pip download -q --no-deps --only-binary=:all: "${target[@]}" -r "$reqs" -d "$DIR" 2>&1 \
    | { grep -v "^WARNING: Location '.*' is ignored" || true; }
[ "${PIPESTATUS[0]}" = 0 ] || { echo "wheelhouse: pip download failed"; exit 1; }
echo "wheelhouse: done, $(ls "$DIR"/*.whl | wc -l) wheels ($(du -sh "$DIR" | cut -f1)). On the node:" \
     "NANOCHAT_WHEELHOUSE=$DIR bash runs/setup_env.sh"
