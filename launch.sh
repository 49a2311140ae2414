#!/usr/bin/env bash
# One entry point for users and CI.
#   ./launch.sh              set up .venv if needed, then run the default job
#   ./launch.sh test [ARGS]  set up .venv if needed, then run the test suite
#   ./launch.sh train ARGS   set up, then python -m trainer.train ARGS
#   ./launch.sh compat [ARGS]
#                            for contributors: the oldest supported torch in its own venv
#                            (.venv-torch2.11, Python 3.12 where there is one), then the test
#                            suite (ARGS passed to pytest) and gpu-check --device cpu there
#   ./launch.sh gpu-check [--device cpu] --out DIR
#                            the first-GPU check (benchmarks/gpu_check.py), with no set-up: see below
set -euo pipefail
cd "$(dirname "$0")"

# The supported torch range is setup.cfg's; these are its two ends.
NEWEST_TORCH="torch==2.14.1 torchvision==0.29.1"   # on this machine's disk: no download
OLDEST_TORCH="torch==2.11.0 torchvision==0.26.0"   # PyPI's wheels (several GB, kept in the venv)

setup() {  # setup VENV PYTHON "TORCH PINS"
    local venv=$1 python=$2 torch_pins=$3
    PY="$venv/bin/python"
    [ -x "$PY" ] || "$python" -m venv "$venv"
    # Reinstall only when the project's install files change.
    local stamp="$venv/.dpvision-installed"
    local want
    want=$(cat setup.cfg pyproject.toml launch.sh | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    # torch first, at an exact version (the project's range then keeps it), resolved with
    # the build tools so that setuptools stays within what that torch accepts.
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --upgrade pip setuptools wheel $torch_pins
    # deepspeed builds from source; without CUDA its ops stay uncompiled and
    # its setup must see the torch above (no isolated build environment).
    DS_BUILD_OPS=0 "$PY" -m pip install -q --no-build-isolation deepspeed==0.19.8
    "$PY" -m pip install -q -e ".[dev]"
    echo "$want" > "$stamp"
}

python312() {  # the GPU machines' Python where this machine has it (pyenv's too), else python3
    local p
    for p in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3; do
        if "$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            echo "$p"; return
        fi
    done
    echo python3
}

cmd=${1:-default}
[ $# -gt 0 ] && shift
if [ "$cmd" = gpu-check ]; then
    # The GPU machine has python3 with torch but no package registry, so no .venv can be set
    # up there: use its python3 (this checkout's venv where there is one), resolved to an
    # absolute path before PATH changes, and add what is missing from the wheels in .whl/
    # (deepspeed, webdataset, wids, dp-accounting, opacus and their small dependencies),
    # installed into a private folder made for this call alone.
    PY="${VENV:-.venv}/bin/python"
    [ -x "$PY" ] || PY=$(command -v python3)
    PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
    if [ -d .whl ] && ! "$PY" -c "import opacus, deepspeed, webdataset, dp_accounting" 2>/dev/null; then
        SITE=$(mktemp -d "${TMPDIR:-/tmp}/dpvision-site.XXXXXXXX")   # mode 0700
        trap 'rm -rf "$SITE"' EXIT
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$PATH:$SITE/bin"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -m benchmarks.gpu_check "$@"
    exit
fi
if [ "$cmd" = compat ]; then
    COMPAT_VENV=${COMPAT_VENV:-.venv-torch2.11}
    setup "$COMPAT_VENV" "${COMPAT_PYTHON:-$(python312)}" "$OLDEST_TORCH"
    "$PY" -c 'import sys, torch; print(f"compat: Python {sys.version.split()[0]}, torch {torch.__version__}")'
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" -m pytest "$@"
    out=$(mktemp -d "${TMPDIR:-/tmp}/dpvision-gpu-check.XXXXXXXX")
    VENV="$COMPAT_VENV" ./launch.sh gpu-check --device cpu --out "$out"
    echo "compat: tests and gpu-check --device cpu passed ($out/gpu_check.md)"
    exit
fi
setup "${VENV:-.venv}" python3 "$NEWEST_TORCH"
case "$cmd" in
    default) exec "$PY" -m trainer.train --config default "$@" ;;
    # One BLAS thread per process: the suite runs several processes on few cores.
    test)    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec "$PY" -m pytest "$@" ;;
    train)   exec "$PY" -m trainer.train "$@" ;;
    *)       echo "usage: ./launch.sh [test|train|compat|gpu-check] [ARGS...]" >&2; exit 2 ;;
esac
