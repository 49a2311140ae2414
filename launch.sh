#!/usr/bin/env bash
# One entry point for users and CI.
#   ./launch.sh              set up .venv if needed, then run the default job
#   ./launch.sh test [ARGS]  set up .venv if needed, then run the test suite
#   ./launch.sh train ARGS   set up, then python -m trainer.train ARGS
#   ./launch.sh gpu-check [--device cpu] --out DIR
#                            the first-GPU check (trainer/gpu_check.py), with no set-up: see below
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
if [ "$cmd" = gpu-check ]; then
    # The GPU machine has python3 with torch (2.11) but no package registry, so no .venv can be
    # set up there: use its python3 (this checkout's venv where there is one) and add what is
    # missing from the wheels copied into .whl/ (see ../shared/gpu-wheels/README.md).
    [ -x "$PY" ] || PY=python3
    if [ -d .whl ] && ! "$PY" -c "import opacus, deepspeed, webdataset, dp_accounting" 2>/dev/null; then
        SITE=${GPU_CHECK_SITE:-/tmp/dpvision-site}
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    exec "$PY" -m trainer.gpu_check "$@"
fi
setup
case "$cmd" in
    default) exec "$PY" -m trainer.train --config default "$@" ;;
    # One BLAS thread per process: the suite runs several processes on few cores.
    test)    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec "$PY" -m pytest "$@" ;;
    train)   exec "$PY" -m trainer.train "$@" ;;
    *)       echo "usage: ./launch.sh [test|train|gpu-check] [ARGS...]" >&2; exit 2 ;;
esac
