#!/usr/bin/env bash
# The air-gapped install, end to end on this machine, timed (about 2-3 minutes on 2 cores, too slow for the test
# suite, which checks the pieces): a wheelhouse from the local pip index and cache (runs/wheelhouse.sh), then
# runs/setup_env.sh with no network at all (dead proxies, --no-index) from a python3 whose venv module cannot
# install pip (like a bare Ubuntu image without python3-venv), then a few test files in the new environment.
#   bash runs/check_offline_install.sh [WORKDIR]      # default: a new temp dir; removed at the end if it was ours
# Needs a torch wheel that pip finds without an index (a find-links directory, e.g. pip.conf's), or network for
# the wheelhouse step to fetch one.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-}"
OWN=0
[ -n "$WORK" ] || { WORK=$(mktemp -d /tmp/nanochat_offline.XXXXXX); OWN=1; }
mkdir -p "$WORK"
REAL_PY=$(python3 -c 'import sys; print(sys.executable)')
TORCH=$(sed -n 's/^CPU_TORCH_VERSION="${TORCH_VERSION:-\(.*\)}"$/\1/p' runs/setup_env.sh)
declare -a TIMES=()
timed() {  # timed NAME CMD...
    local name="$1" t0=$SECONDS; shift
    echo "=== [$name] $*"
    "$@"
    TIMES+=("$name: $((SECONDS - t0))s")
}

timed wheelhouse bash runs/wheelhouse.sh "$WORK/wheelhouse"
# torch is not in a wheelhouse (set-up reuses a node's torch, or the user adds its wheel): add this machine's
timed torch-wheel "$REAL_PY" -m pip download -q --no-deps "torch==$TORCH+cpu" -d "$WORK/wheelhouse"

# python3 as on a bare Ubuntu image: `-m venv` cannot install pip, and there is no virtualenv
mkdir -p "$WORK/bin"
cat > "$WORK/bin/python3" <<EOF
#!/usr/bin/env bash
if [ "\${1:-}" = "-m" ] && [ "\${2:-}" = "venv" ] && [[ " \$* " != *" --without-pip "* ]]; then
    "$REAL_PY" -m venv --without-pip "\${@:3}" >/dev/null 2>&1
    echo "The virtual environment was not created successfully because ensurepip is not available." >&2
    exit 1
fi
if [ "\${1:-}" = "-m" ] && [ "\${2:-}" = "virtualenv" ]; then echo "No module named virtualenv" >&2; exit 1; fi
exec "$REAL_PY" "\$@"
EOF
chmod +x "$WORK/bin/python3"

DEAD=http://127.0.0.1:9  # nothing listens there: any download fails at once
offline_setup() {
    rm -rf "$WORK/venv"
    env http_proxy=$DEAD https_proxy=$DEAD HTTP_PROXY=$DEAD HTTPS_PROXY=$DEAD no_proxy= NO_PROXY= \
        NANOCHAT_PYTHON="$WORK/bin/python3" NANOCHAT_WHEELHOUSE="$WORK/wheelhouse" NANOCHAT_VENV="$WORK/venv" \
        bash runs/setup_env.sh > "$WORK/setup.log" 2>&1 || { tail -40 "$WORK/setup.log"; return 1; }
    grep "^setup:" "$WORK/setup.log"
}
timed offline-setup offline_setup
grep -q -- "--without-pip" "$WORK/setup.log" || { echo "FAILED: set-up did not report its venv fallback"; exit 1; }
timed tests env http_proxy=$DEAD https_proxy=$DEAD "$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_attention.py tests/test_fa3_loader.py tests/test_lock.py

echo
echo "offline install check: ok | $(IFS='|'; echo "${TIMES[*]}") | wheelhouse $(du -sh "$WORK/wheelhouse" | cut -f1)"
[ "$OWN" = 0 ] || rm -rf "$WORK"
