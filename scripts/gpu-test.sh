#!/usr/bin/env bash
# The GPU suite, on a machine with a GPU: the CUDA backends' self-test, then real servers and
# clients attaching through CUDA IPC (both backends). Uses the binaries in $COMPANION_BUILD_DIR
# (default build/), and python3 with torch, safetensors, numpy and pytest.
# Results go to $OUT when set (junit XML).
set -euo pipefail
cd "$(dirname "$0")/.."
export COMPANION_BUILD_DIR=${COMPANION_BUILD_DIR:-$PWD/build}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
"$COMPANION_BUILD_DIR/src/cli/companion" devices
junit=()
[ -n "${OUT:-}" ] && junit=(--junitxml "$OUT/gpu-tests.xml")
PYTHONUNBUFFERED=1 "$PY" -m pytest -v -s -p no:cacheprovider tests/gpu "${junit[@]}"
