#!/usr/bin/env bash
# One entry point for users and CI.
#   ./launch.sh              set up .venv if needed, then run the default job
#   ./launch.sh test [ARGS]  set up .venv if needed, then run the test suite
#   ./launch.sh train ARGS   set up, then python -m trainer.train ARGS
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
PY="$VENV/bin/python"

setup() {
    [ -x "$PY" ] || python3 -m venv "$VENV"
    # Reinstall only when the project's install files change.
    local stamp="$VENV/.dpvision-installed"
    local want
    want=$(cat setup.cfg pyproject.toml launch.sh | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    "$PY" -m pip install -q --upgrade pip setuptools wheel
    # torch first: these exact versions install from this machine's disk.
    "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
    # deepspeed builds from source; without CUDA its ops stay uncompiled and
    # its setup must see the torch above (no isolated build environment).
    DS_BUILD_OPS=0 "$PY" -m pip install -q --no-build-isolation deepspeed==0.19.8
    "$PY" -m pip install -q -e ".[dev]"
    echo "$want" > "$stamp"
}

cmd=${1:-default}
[ $# -gt 0 ] && shift
setup
case "$cmd" in
    default) exec "$PY" -m trainer.train --config default "$@" ;;
    # One BLAS thread per process: the suite runs several processes on few cores.
    test)    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec "$PY" -m pytest "$@" ;;
    train)   exec "$PY" -m trainer.train "$@" ;;
    *)       echo "usage: ./launch.sh [test|train] [ARGS...]" >&2; exit 2 ;;
esac
