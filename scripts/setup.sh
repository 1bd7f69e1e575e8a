#!/usr/bin/env bash
# Sets up a fresh machine: the offline data sets (Debian packages) and a virtualenv in .venv.
# Safe to re-run; nothing here downloads model weights or data at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# Two of the six offline data sets come as Debian packages (the others ship inside pip packages).
need=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
[ -f /usr/share/doc/opencv-doc/examples/data/digits.png ] || need+=(opencv-doc)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    if command -v apt-get >/dev/null; then
        echo "setup: installing ${need[*]} (offline data sets)"
        $SUDO apt-get update -qq || echo "setup: apt-get update failed; trying the cached package index" >&2
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    else
        echo "setup: no apt-get; data sets ${need[*]} will be reported missing and skipped" >&2
    fi
fi

pip_install() {  # quiet on success; the whole log on failure
    local log; log=$(mktemp)
    if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" >"$log" 2>&1; then
        grep -v "^WARNING: Location" "$log" >&2; rm -f "$log"; echo "setup: pip install $* failed" >&2; exit 1
    fi
    rm -f "$log"
}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install -e ".[test,docs]"
# animal-mnist declares tensorflow as a dependency it does not need for its data files.
pip_install --no-deps animal-mnist==0.4
.venv/bin/python -c "import harness, torch, open_clip, nevergrad, ray, pandas" 
echo "setup: done (.venv ready)"
